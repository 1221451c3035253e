"""The capstone trainer's configuration: TOML files validated into dataclasses.

A config has top-level keys (``out_dir``, ``seed``, ``device``, ``parallel``,
``allow_config_change``) and four sections, ``[model]``, ``[data]``, ``[train]``,
``[checkpoint]``. ``parallel`` is a strategy's name (``"none"``, ``"ddp"``, ``"fsdp"``) or a table of
device-mesh sizes (chapter 9.1): ``[parallel]`` with ``dp = 2`` and ``tp = 2`` trains FSDP over dp and
tensor parallelism over tp on ``dp × tp`` ranks; it is stored as ``parallel = "mesh"`` plus ``[mesh]``. Every key has a default, so a file names only what differs. Validation
is strict because a typo in a config otherwise trains for hours with the default: an
unknown key is an error that names the valid ones, a wrong type or an impossible value
says which key and why.

    cfg = load_config("configs/gpt-char-tiny.toml", overrides=["train.steps=300"])

Paths. Every relative path a config names (``out_dir``, ``data.folder``, ``data.cache_dir``), like
the ``--config`` path itself, is relative to the working directory, as for any command-line tool;
``~`` and absolute paths are taken as given. :func:`resolve_paths` makes them absolute when a run
starts, so its checkpoints record where its data and output really were. ``data.cache_dir`` left
empty (the default) is the course's own ``build/data``, which every run and notebook shares.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that cannot be trained: unknown key, wrong type, impossible value."""


@dataclass
class ModelSection:
    kind: str = "gpt"                 # "gpt" (causal decoder, CLM) | "bert" (bidirectional encoder, MLM)
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_ff: int = 0                     # 0: 4 * d_model
    seq_len: int = 64                 # context: tokens the model predicts from per window
    dropout: float = 0.0
    position: str = "learned"         # "learned" (a table of positions) | "rope" (rotary: relative, no table)
    # mixture of experts (pretrain_lib.moe; ModelConfig's moe_* fields): 0 experts is the dense MLP
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float = 0.0  # 0: no capacity limit
    moe_shared_experts: int = 0
    moe_aux_loss_coef: float = 0.01   # Switch/GShard balancing loss weight
    moe_bias_rate: float = 0.0        # DeepSeek-V3 auxiliary-loss-free bias step
    # chapter 8.2's options (pretrain_lib.model_options); the defaults are the course GPT
    norm: str = "layernorm"           # "layernorm" | "rmsnorm"
    mlp: str = "gelu"                 # "gelu" | "swiglu" (gated) | "relu2" (squared ReLU)
    qk_norm: bool = False             # RMS-normalise queries and keys per head
    tie_embeddings: bool = True       # the GPT's output layer is its token embedding (false: a table of its own)

    CHOICES = {"kind": ("gpt", "bert"), "position": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
               "mlp": ("gelu", "swiglu", "relu2")}

    def check(self) -> None:
        _positive(self, "n_layers", "n_heads", "d_model", "seq_len")
        if self.d_ff < 0:
            raise ConfigError(f"model.d_ff must be >= 0 (0 means 4 * d_model), got {self.d_ff}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.kind == "bert" and not self.tie_embeddings:
            raise ConfigError("model.kind = 'bert' ties its decoder to the token embedding: set model.tie_embeddings = "
                              "true")
        if self.moe_experts:
            if self.moe_experts < 2 or not 1 <= self.moe_top_k <= self.moe_experts:
                raise ConfigError(f"model.moe_experts must be 0 or >= 2 and model.moe_top_k in [1, moe_experts]; "
                                  f"got moe_experts={self.moe_experts}, moe_top_k={self.moe_top_k}")
            _non_negative(self, "moe_capacity_factor", "moe_shared_experts", "moe_aux_loss_coef", "moe_bias_rate")


@dataclass
class DataSection:
    corpus: str = "shakespeare"       # "shakespeare" | "code" (the Python standard library) | "folder"
    folder: str = ""                  # the folder of .txt files when corpus = "folder" (relative: to the working dir)
    max_docs: int = 0                 # 0: every document
    tokenizer: str = "char"           # "char" | "bpe" | "wordpiece"
    vocab_size: int = 0               # bpe / wordpiece only; a char vocabulary is the corpus's characters
    val_fraction: float = 0.1         # the validation split's share of the tokens (see split)
    # "documents": whole documents, chosen by a hash of their names, make up ~val_fraction of the tokens;
    # "tail": the last val_fraction of the token stream; "auto": "tail" for the Shakespeare corpus (its last
    # plays are the benchmark's held-out text) and for a single document, "documents" otherwise.
    split: str = "auto"
    tokens_per_shard: int = 1_000_000
    num_workers: int = 0              # DataLoader worker processes
    mlm_probability: float = 0.15
    cache_dir: str = ""               # prepared shards, one folder per data fingerprint ("": the course's build/data)
    # Cleaning thresholds (chapter 2.1's rules; 0 keeps the rule's default). A document failing one is dropped,
    # and preparation prints which files were dropped and by which rule.
    min_words: int = 0                # prose: fewest words (default 50)
    max_symbol_ratio: float = 0.0     # prose: (# + ellipses) / words (default 0.1)
    max_duplicate_lines: float = 0.0  # share of repeated lines (default 0.3 for prose, 0.5 for code)
    min_lines: int = 0                # code: fewest non-empty lines (default 5)

    CHOICES = {"corpus": ("shakespeare", "code", "folder"), "tokenizer": ("char", "bpe", "wordpiece"),
               "split": ("auto", "documents", "tail")}

    def check(self) -> None:
        if self.corpus == "folder" and not self.folder:
            raise ConfigError('data.corpus = "folder" needs data.folder, the path of your .txt files')
        if self.folder and self.corpus != "folder":
            raise ConfigError(f'data.folder = {self.folder!r} is set but data.corpus = {self.corpus!r}, so the folder '
                              f'would be ignored: set data.corpus = "folder" to train on it, or remove data.folder '
                              f'(on the command line, --set data.folder=... alone also selects the folder)')
        if self.tokenizer != "char" and self.vocab_size < 261:
            raise ConfigError(f"data.tokenizer = {self.tokenizer!r} needs data.vocab_size >= 261 (256 bytes + 5 "
                              f"special tokens), got {self.vocab_size}")
        if self.tokenizer == "char" and self.vocab_size:
            raise ConfigError("data.vocab_size is set but data.tokenizer = 'char' takes its vocabulary from the "
                              "corpus; remove vocab_size or choose 'bpe'")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must lie in (0, 0.5), got {self.val_fraction}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability must lie in (0, 1), got {self.mlm_probability}")
        _positive(self, "tokens_per_shard")
        _non_negative(self, "max_docs", "num_workers", "min_words", "max_symbol_ratio", "min_lines")
        if not 0.0 <= self.max_duplicate_lines <= 1.0:
            raise ConfigError(f"data.max_duplicate_lines must lie in [0, 1] (0: the rule's default), got "
                              f"{self.max_duplicate_lines}")


@dataclass
class TrainSection:
    steps: int = 2000
    batch_size: int = 12              # windows per micro-batch
    grad_accum_steps: int = 1
    lr: float = 1e-3                  # peak learning rate
    min_lr: float = 1e-4              # floor of the decay
    schedule: str = "cosine"          # "cosine" | "wsd" | "constant"
    warmup_steps: int = 100
    decay_steps: int = 0              # cosine: the step the decay ends (0: steps); wsd: decay length (0: steps/5)
    optimizer: str = "adamw"          # "adamw" | "muon" (Muon on the hidden matrices, AdamW at train.lr on the rest)
    muon_lr: float = 0.02             # muon only: the matrices' peak learning rate (the schedule scales it with lr)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0            # 0: no clipping
    dtype: str = "fp32"               # "fp32" | "bf16" | "fp16"
    compile: str = "auto"             # "auto" (on CUDA only) | "on" | "off"
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 20            # validation batches per evaluation (fixed windows, same every time)
    sample_tokens: int = 200          # GPT: tokens sampled at each evaluation (0: none)
    progress: str = "auto"            # "auto" (a bar in a terminal) | "on" | "off"
    tensorboard: bool = True          # also write TensorBoard events when it is installed
    threads: int = 0                  # CPU threads per process; 0: automatic (never more than the idle cores)

    CHOICES = {"schedule": ("cosine", "wsd", "constant"), "dtype": ("fp32", "bf16", "fp16"),
               "compile": ("auto", "on", "off"), "progress": ("auto", "on", "off"), "optimizer": ("adamw", "muon")}

    def check(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum_steps", "log_every", "eval_every", "eval_batches")
        _non_negative(self, "warmup_steps", "decay_steps", "sample_tokens", "threads")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not self.muon_lr > 0:
            raise ConfigError(f"train.muon_lr must be positive, got {self.muon_lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr must lie in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be smaller than train.steps={self.steps}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0 (grad_clip = 0: no clipping)")


@dataclass
class CheckpointSection:
    every: int = 500                  # steps between checkpoints (one is always written at the end)
    keep: int = 2                     # checkpoints kept; older ones are deleted once a newer one is safe

    def check(self) -> None:
        _positive(self, "every", "keep")


@dataclass
class MeshSection:
    dp: int = 1                       # FSDP2 ranks (each holds a shard; each reads its own batches)
    tp: int = 1                       # tensor-parallel ranks (inside a dp rank: they read the same batches)

    def check(self) -> None:
        _positive(self, "dp", "tp")


@dataclass
class RunConfig:
    out_dir: str = "build/runs/default"   # relative: to the working directory
    seed: int = 1337
    device: str = "auto"
    parallel: str = "none"            # "none" | "ddp" | "fsdp" | "mesh" (under torchrun; mesh: the [mesh] sizes)
    allow_config_change: bool = False  # resume even when an exactness-breaking key changed
    overwrite: bool = False           # a new run may delete the earlier run in out_dir (same as --overwrite)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    mesh: MeshSection = field(default_factory=MeshSection)

    CHOICES = {"parallel": ("none", "ddp", "fsdp", "mesh")}

    def check(self) -> None:
        _non_negative(self, "seed")
        for section in SECTIONS:
            getattr(self, section).check()
        if self.model.moe_experts and self.parallel != "none":
            raise ConfigError(f"model.moe_experts with parallel = {self.parallel!r} is not supported by the capstone "
                              "(a rank's expert may get no token in a step, which DDP and FSDP do not expect); "
                              "expert parallelism is pretrain_lib.distributed.expert_parallel")
        if self.parallel == "mesh":
            self._check_mesh()
        if self.train.log_every > self.train.steps:
            self.train.log_every = self.train.steps  # a short --set run still logs its last step
        if self.checkpoint.every % self.train.log_every:
            raise ConfigError(f"checkpoint.every={self.checkpoint.every} must be a multiple of train.log_every="
                              f"{self.train.log_every}: a checkpoint then follows a logged step, and a resumed run "
                              "neither repeats nor skips a line of metrics.jsonl")

    def _check_mesh(self) -> None:
        m, mesh = self.model, self.mesh
        if mesh.dp * mesh.tp < 2:
            raise ConfigError(f"parallel = 'mesh' needs at least 2 ranks; [parallel] has dp = {mesh.dp}, tp = {mesh.tp}")
        if mesh.tp > 1:
            if (m.kind != "gpt" or m.position != "learned" or m.mlp != "gelu" or m.qk_norm or m.moe_experts
                    or not m.tie_embeddings):
                raise ConfigError("tensor parallelism (parallel.tp > 1) splits the course GPT's default block: "
                                  "model.kind = 'gpt', position = 'learned', mlp = 'gelu', qk_norm = false, no experts, "
                                  "tie_embeddings = true")
            if m.n_heads % mesh.tp:
                raise ConfigError(f"model.n_heads = {m.n_heads} cannot be split over parallel.tp = {mesh.tp} ranks")
            if m.dropout:
                raise ConfigError("parallel.tp > 1 needs model.dropout = 0: the tensor-parallel ranks of a layer "
                                  "would draw different dropout masks for the same activations")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "train", "checkpoint", "mesh")

# Keys whose change makes a resumed run differ from the uninterrupted one: the batches, the
# model's shape, the data or the tokenizer. A resume that changes one is refused unless
# allow_config_change = true.
EXACTNESS_KEYS = ("seed", "parallel", "mesh.*", "model.*", "data.corpus", "data.folder", "data.max_docs", "data.tokenizer",
                  "data.vocab_size", "data.val_fraction", "data.split", "data.tokens_per_shard", "data.mlm_probability",
                  "data.min_words", "data.max_symbol_ratio", "data.max_duplicate_lines", "data.min_lines",
                  "train.batch_size", "train.grad_accum_steps")


# ----------------------------------------------------------------------------- paths

COURSE_ROOT = Path(__file__).resolve().parents[2]
COURSE_DATA_CACHE = COURSE_ROOT / "build" / "data"   # data.cache_dir = "" (the default)


def resolve_path(path: str | Path) -> Path:
    """The one rule for a path in a config: ``~`` expanded, a relative path taken from the working
    directory (as the command line takes ``--config``), the result absolute and normalised."""
    return Path(os.path.abspath(Path(path).expanduser()))


def data_cache_dir(data: "DataSection") -> Path:
    """Where prepared data is cached: ``data.cache_dir``, or the course's ``build/data`` when it is empty."""
    return resolve_path(data.cache_dir) if data.cache_dir else COURSE_DATA_CACHE


def resolve_paths(config: "RunConfig") -> "RunConfig":
    """A copy of ``config`` with ``out_dir``, ``data.folder`` and ``data.cache_dir`` absolute (see
    :func:`resolve_path`): what the trainer runs with and records in its checkpoints, so that
    ``generate`` or ``evaluate`` started from another folder still find the run's data."""
    out = copy.deepcopy(config)
    out.out_dir = str(resolve_path(config.out_dir))
    out.data.folder = str(resolve_path(config.data.folder)) if config.data.folder else ""
    out.data.cache_dir = str(data_cache_dir(config.data))
    return out


# ----------------------------------------------------------------------------- validation

def _positive(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{_section_of(obj)}{name} must be a positive integer, got {getattr(obj, name)}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{_section_of(obj)}{name} must be >= 0, got {getattr(obj, name)}")


def _section_of(obj) -> str:
    for name, cls in _SECTION_CLASSES.items():
        if type(obj) is cls:
            return f"{name}."
    return ""


def _type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _build(cls, table: dict, where: str):
    """``cls(**table)`` with every key and type checked; ``where`` is the section prefix for messages."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{where.rstrip('.')}] must be a table of keys, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields_:
            close = difflib.get_close_matches(key, fields_, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {where}{key}{hint}; valid keys{' in [' + where.rstrip('.') + ']' if where else ''}"
                              f" are: {', '.join(sorted(fields_))}")
        expected = hints[key]
        if key in SECTIONS and not where:
            values[key] = _build(_SECTION_CLASSES[key], value, f"{key}.")
            continue
        if isinstance(expected, types.UnionType) or typing.get_origin(expected) is typing.Union:
            expected = tuple(t for t in typing.get_args(expected) if t is not type(None))[0]
        if not _type_ok(value, expected):
            raise ConfigError(f"{where}{key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
        choices = getattr(cls, "CHOICES", {}).get(key)
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}{key} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        values[key] = float(value) if expected is float else value
    return cls(**values)


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "train": TrainSection,
                    "checkpoint": CheckpointSection, "mesh": MeshSection}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=300"`` → ``(["train", "steps"], 300)``; the value is read as TOML
    (numbers, ``true``, quoted strings), else kept as a bare string (``parallel=ddp``)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (for example train.steps=300), got {item!r}")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    path = key.split(".")
    if not all(path) or len(path) > 2:
        raise ConfigError(f"--set key must be 'name' or 'section.name', got {key!r}")
    return path, value


def config_from_dict(table: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a parsed TOML table (plus ``key=value`` overrides) into a :class:`RunConfig`."""
    table = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    if isinstance(table.get("parallel"), dict):   # [parallel] dp = 2, tp = 2: the device mesh's sizes
        table["mesh"] = {**table.get("mesh", {}), **table.pop("parallel")}
        table["parallel"] = "mesh"
    overridden = set()
    for item in overrides:
        path, value = parse_override(item)
        if path[0] == "parallel" and len(path) == 2:   # --set parallel.tp=2 sets a mesh size
            path = ["mesh", path[1]]
            table["parallel"] = "mesh"
        overridden.add(".".join(path))
        if len(path) == 2:
            if path[0] not in SECTIONS:
                raise ConfigError(f"--set {item!r}: unknown section {path[0]!r}; sections are {', '.join(SECTIONS)}")
            table.setdefault(path[0], {})[path[1]] = value
        else:
            table[path[0]] = value
    if "data.folder" in overridden and "data.corpus" not in overridden and isinstance(table.get("data"), dict):
        table["data"]["corpus"] = "folder"   # pointing at a folder means training on it
    config = _build(RunConfig, table, "")
    config.check()
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML config file and validate it (see :func:`config_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.stem for p in (COURSE_ROOT / "configs").glob("*.toml"))
        where = "" if path.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"
        raise ConfigError(f"no config file at {path}{where}; the shipped configs are "
                          f"{COURSE_ROOT / 'configs'}/{{{','.join(shipped)}}}.toml")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return config_from_dict(table, overrides)


def toml_value(value: Any) -> str:
    """One value written as TOML: strings quoted (JSON's escapes are TOML's), booleans lower case, lists bracketed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r} ({type(value).__name__})")


def edit_toml(text: str, changes: dict[str, Any], *, note: str = "") -> str:
    """A config file's ``text`` with ``changes`` (``{"data.corpus": "folder", "out_dir": "runs/x"}``) made the
    way a person edits a copy: a key's line gets its new value, a key the file lacks is added at the end of its
    section (a missing section at the end of the file), and every other line, comments included, stays.
    ``note``: a comment put after each changed line."""
    pending: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        pending.setdefault(section, {})[key] = value
    out: list[str] = []
    section = ""

    def line_of(key: str, value: Any) -> str:
        return f"{key} = {toml_value(value)}" + (f"   # {note}" if note else "")

    def close(name: str) -> None:   # the keys of section ``name`` that no line held, before its trailing blanks
        end = len(out)
        while end and not out[end - 1].strip():
            end -= 1
        out[end:end] = [line_of(k, v) for k, v in pending.pop(name, {}).items()]

    for line in text.splitlines():
        header = re.match(r"^\s*\[([A-Za-z0-9_]+)\]\s*(#.*)?$", line)
        if header:
            close(section)
            section = header.group(1)
        else:
            m = re.match(r"^(\s*)([A-Za-z0-9_]+)(\s*=)", line)
            if m and m.group(2) in pending.get(section, {}):
                line = m.group(1) + line_of(m.group(2), pending[section].pop(m.group(2)))
        out.append(line)
    close(section)
    for name in list(pending):
        if not name:
            out[:0] = [line_of(k, v) for k, v in pending.pop(name).items()]
        else:
            out += ["", f"[{name}]"] + [line_of(k, v) for k, v in pending.pop(name).items()]
    return "\n".join(out) + "\n"


def schedule_warnings(config: RunConfig) -> list[str]:
    """Settings that are valid but probably not what was meant, one sentence each (printed at the start)."""
    t = config.train
    out = []
    if t.schedule == "cosine" and t.decay_steps > t.steps:
        out.append(f"train.decay_steps={t.decay_steps} is beyond train.steps={t.steps}: the cosine decay is cut off and "
                   f"the run ends well above min_lr={t.min_lr:g}; remove decay_steps (0 follows train.steps) or set it "
                   f"to {t.steps}")
    if t.schedule == "wsd" and t.decay_steps > t.steps - t.warmup_steps:
        out.append(f"train.decay_steps={t.decay_steps} is longer than the {t.steps - t.warmup_steps} steps after "
                   f"warmup: the decay starts at once and is cut off; remove decay_steps (0: steps / 5)")
    return out


_ABSENT = object()   # a key the saved config lacks: written before the key existed, so it had the default


def exactness_differences(saved: dict, current: dict) -> list[str]:
    """The exactness-breaking keys (:data:`EXACTNESS_KEYS`) whose values differ, as
    ``"key: saved -> current"`` lines; empty when a resume would be exact."""
    out = []
    for pattern in EXACTNESS_KEYS:
        if pattern.endswith(".*"):
            section = pattern[:-2]
            keys = sorted(set(saved.get(section, {})) | set(current.get(section, {})))
            pairs = [(f"{section}.{k}", saved.get(section, {}).get(k, _ABSENT), current.get(section, {}).get(k))
                     for k in keys]
        elif "." in pattern:
            section, key = pattern.split(".")
            pairs = [(pattern, saved.get(section, {}).get(key, _ABSENT), current.get(section, {}).get(key))]
        else:
            pairs = [(pattern, saved.get(pattern, _ABSENT), current.get(pattern))]
        out += [f"{name}: {a!r} -> {b!r}" for name, a, b in pairs if a != b and a is not _ABSENT]
    return out
