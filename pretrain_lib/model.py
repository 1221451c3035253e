"""A small pre-LayerNorm Transformer: one block, a causal GPT and a bidirectional MaskedLM.

Shapes: ``input_ids`` ``(batch, seq)`` → logits ``(batch, seq, vocab)``. Attention goes through
``torch.nn.functional.scaled_dot_product_attention``, which picks a fused kernel (flash
attention on recent GPUs, a memory-efficient kernel on the CPU).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_options import (MLPS, NORMS, POSITIONS, GatedMLP, ReLU2MLP, apply_rope, make_norm,
                            prefix_attention_mask, rope_tables, swiglu_hidden)
from .moe import MoEFeedForward, auxiliary_loss, inactive_expert_params, moe_layers
from .mup import attention_scale, check_config, hidden_init_scale, is_hidden_matrix, output_multiplier, owners


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None  # None means 4 * d_model
    max_seq_len: int = 256
    dropout: float = 0.0
    causal: bool = True
    # Speed-run options (chapter 8.2, pretrain_lib.model_options); the defaults are the course GPT.
    norm: str = "layernorm"       # "layernorm" | "rmsnorm"
    mlp: str = "gelu"             # "gelu" | "swiglu" (gated) | "relu2" (squared ReLU)
    position: str = "learned"     # "learned" (a table of positions) | "rope" (rotary, no table)
    qk_norm: bool = False         # RMS-normalise queries and keys per head
    # Mixture of experts (chapter 9.3, pretrain_lib.moe): 0 experts is the dense MLP. Each expert is
    # the ``mlp`` kind at width ``d_ff``; a token goes through ``moe_top_k`` of them.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float = 0.0  # 0: no capacity limit (no token dropped)
    moe_shared_experts: int = 0       # experts every token goes through (DeepSeek-MoE)
    moe_aux_loss_coef: float = 0.01   # weight of the Switch/GShard balancing loss (0: off)
    moe_bias_rate: float = 0.0        # DeepSeek-V3 auxiliary-loss-free bias step (0: off; they use 1e-3)
    # μP (chapter 9.5, pretrain_lib.mup): the width the hyperparameters were tuned at; 0 is the standard
    # parametrisation. Changes the init, the attention scale and the logits; build_optimizer sets the LRs.
    mup_base_width: int = 0
    # The GPT's output layer is its token embedding (tied, as in GPT-2); False gives it its own table
    # (Llama, μP's derivation). The MLM decoder, pipeline stages, tensor parallel and export need tied.
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_ff is None:  # SwiGLU's three matrices get the parameters of a 4·d GELU MLP
            self.d_ff = swiglu_hidden(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model
        if not isinstance(self.d_ff, int) or self.d_ff <= 0:
            raise ValueError(f"ModelConfig.d_ff must be a positive integer, got {self.d_ff!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: each head gets "
                f"d_model / n_heads dimensions; pick n_heads among the divisors of {self.d_model}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' rotates pairs of channels: head_dim={self.head_dim} must be even")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.moe_experts:
            if not isinstance(self.moe_experts, int) or self.moe_experts < 2:
                raise ValueError(f"ModelConfig.moe_experts must be 0 (dense) or an integer >= 2, got {self.moe_experts!r}")
            if not isinstance(self.moe_top_k, int) or not 1 <= self.moe_top_k <= self.moe_experts:
                raise ValueError(f"ModelConfig.moe_top_k must lie in [1, moe_experts={self.moe_experts}], "
                                 f"got {self.moe_top_k!r}")
            for name in ("moe_capacity_factor", "moe_shared_experts", "moe_aux_loss_coef", "moe_bias_rate"):
                if not getattr(self, name) >= 0:
                    raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        check_config(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Reject out-of-range ids on the host copy, with NumPy (no per-element tensor reads)."""
    if ids.device.type != "cpu" or ids.numel() == 0 or ids.dtype.is_floating_point:
        return
    arr = ids.numpy()
    arr = arr[arr != -100] if arr.min() == -100 else arr  # -100: an ignored label position
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); this batch spans [{arr.min()}, {arr.max()}]")


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.causal = config.causal
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.rope = config.position == "rope"
        self.scale = attention_scale(config)  # None: SDPA's 1/sqrt(head_dim); μP: ∝ 1/head_dim
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm("rmsnorm", config.head_dim), make_norm("rmsnorm", config.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``(batch, seq, d_model)``; key_padding_mask: ``(batch, seq)`` bool, True = real token;
        prefix_len: ``(batch,)``, a causal model attends bidirectionally over that many first tokens."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (batch, heads, seq, head_dim)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            cos, sin = rope_tables(t, d // self.n_heads, device=x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn_mask = None
        if prefix_len is not None and self.causal:
            attn_mask = prefix_attention_mask(t, prefix_len.to(x.device))
        if key_padding_mask is not None:
            padding = key_padding_mask[:, None, None, :].to(torch.bool)
            if attn_mask is not None:
                attn_mask = attn_mask & padding
            elif self.causal:
                attn_mask = padding & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            else:
                attn_mask = padding
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
            scale=self.scale,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``down(gelu(up(x)))``: the course GPT's MLP (``mlp="gelu"``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(config.norm, config.d_model)
        self.attn = SelfAttention(config)
        self.ln2 = make_norm(config.norm, config.d_model)
        mlp_class = {"gelu": MLP, "swiglu": GatedMLP, "relu2": ReLU2MLP}[config.mlp]

        def make_mlp() -> nn.Module:
            return MLP(config) if config.mlp == "gelu" else mlp_class(config.d_model, config.d_ff)
        if config.moe_experts:
            self.mlp = MoEFeedForward(config.d_model, config.moe_experts, config.moe_top_k, make_mlp,
                                      capacity_factor=config.moe_capacity_factor,
                                      n_shared=config.moe_shared_experts, aux_loss_coef=config.moe_aux_loss_coef,
                                      bias_rate=config.moe_bias_rate)
        else:
            self.mlp = make_mlp()
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_padding_mask, prefix_len))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerBackbone(nn.Module):
    """Token + learned position embeddings (none with rotary), ``n_layers`` blocks, a final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # Rotary embeddings put the position into attention itself: no table to learn.
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = make_norm(config.norm, config.d_model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        t = input_ids.size(1)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
        # On the CPU the ids are checked with NumPy (no tensor reads). A GPU tensor is not
        # checked here, since reading its min/max would stall the device on every forward:
        # the engine checks each batch's host copy before moving it (train._to_device).
        if not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.config.vocab_size)
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=input_ids.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, attention_mask, prefix_len)
        return self.ln_f(x)


def _init_weights(model: nn.Module, config: ModelConfig) -> None:
    hidden_scale = hidden_init_scale(config)  # 1 under SP; μP: sqrt(base/width) on hidden matrices
    module_of = owners(model)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02
            # GPT-2: scale the projections that write into the residual stream so its
            # variance does not grow with depth (an MoE layer's experts: mlp.experts.3.down.weight).
            if name.endswith(("attn.proj.weight", "down.weight")):
                std = 0.02 / math.sqrt(2 * config.n_layers)
            if hidden_scale != 1.0 and is_hidden_matrix(module_of, p):
                std *= hidden_scale
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def materialise(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Give a model built on the meta device (``with torch.device("meta"): GPT(config)``) real
    storage on ``device`` and initialise it as the constructor would (norm gains 1, matrices
    normal, biases 0, buffers 0); returns ``model``.

    Applied after FSDP2's ``fully_shard``, each rank allocates and initialises only its own
    shard of every parameter: a model larger than one rank's memory can be built that way.
    Random draws then come from each shard's generator, so the values differ from
    ``seeded_model``'s; the distributions are the same.
    """
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()        # LayerNorm/RMSNorm gains to 1; Linear and Embedding drawn
        for buffer in model.buffers():
            buffer.zero_()                       # the MoE layers' bias and load counters start at 0
        _init_weights(model, model.config)       # the course's own init overwrites matrices and biases
    return model


class OutputLayer(nn.Module):
    """An untied output layer: a ``(vocab, d_model)`` table the hidden state is multiplied by. Like an
    embedding, one dimension grows with the width and the other (the vocabulary) does not, so μP
    gives it the embedding's rules (``readout = True`` tells ``mup.is_hidden_matrix``)."""

    readout = True

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))


class _LanguageModel(nn.Module):
    config: ModelConfig
    backbone: TransformerBackbone

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Number of parameters (tied weights counted once); ``non_embedding`` drops the
        token and position embeddings, the count Kaplan et al. and Chinchilla use."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.backbone.tok_emb.weight.numel()
            if self.backbone.pos_emb is not None:
                n -= self.backbone.pos_emb.weight.numel()
        return n

    def matmul_params(self) -> int:
        """The N of C ≈ 6 N D: the non-embedding parameters plus the (tied) output projection
        onto the vocabulary. Most of N is weight matrices, which take part in a matrix multiply;
        N also counts the blocks' biases and the LayerNorm gains and biases (final LayerNorm
        included), which do not: 13·d_model of them per block beside 12·d_model² matrix weights,
        under 2 % of N from d_model = 64 on (notebook 6.1 checks the split). Position
        embeddings are a lookup, not a multiply, so they are left out. With mixture-of-experts layers
        N counts the *active* parameters: a token multiplies by k of the E experts, not all."""
        tied_head = self.config.vocab_size * self.config.d_model if self.config.tie_embeddings else 0
        return self.num_params(non_embedding=True) + tied_head - inactive_expert_params(self)

    def _readout(self, logits: torch.Tensor) -> torch.Tensor:
        """μP's output multiplier base_width/width on the logits (nothing under SP)."""
        mult = output_multiplier(self.config)
        return logits if mult == 1.0 else logits * mult

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss the last forward adds to the objective's (the MoE balancing loss), or None. The
        engine's ``default_forward_backward`` calls this after each micro-batch's objective."""
        return auxiliary_loss(self)

    def after_optimizer_step(self, all_reduce=None) -> None:
        """Called by ``train_step`` after each optimiser step (MoE: the bias balancing step);
        ``all_reduce`` sums a tensor over the data-parallel ranks, or is None in one process."""
        for layer in moe_layers(self):
            layer.update_bias(all_reduce)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus the attention scores.

        N is :meth:`matmul_params`; each multiply-add is 2 FLOPs forward and 4 backward.
        The attention term, 6 · 2 · n_layers · seq_len · d_model, covers QKᵀ and the
        weighted sum of V, which have no parameters (Hoffmann et al., 2022, Appendix F).
        """
        c = self.config
        t = c.max_seq_len if seq_len is None else seq_len
        return 6.0 * self.matmul_params() + 12.0 * c.n_layers * t * c.d_model


class GPT(_LanguageModel):
    """Decoder-only causal language model; its output projection is the token embedding unless
    ``config.tie_embeddings`` is False, when it is a table of its own (``head``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.causal:
            raise ValueError("GPT is a causal decoder: build it from a ModelConfig with causal=True")
        self.config = config
        self.backbone = TransformerBackbone(config)
        self.head = None if config.tie_embeddings else OutputLayer(config.vocab_size, config.d_model)
        _init_weights(self, config)

    def readout_weight(self) -> torch.Tensor:
        """The ``(vocab, d_model)`` matrix the last hidden state is multiplied by."""
        return self.backbone.tok_emb.weight if self.head is None else self.head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """``prefix_len`` ``(batch,)`` (prefix LM): the first ``prefix_len`` tokens of each row
        attend to each other in both directions; None (the default) is a plain causal decoder."""
        h = self.backbone(input_ids, attention_mask, prefix_len)
        return self._readout(h @ self.readout_weight().T)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``input_ids`` ``(batch, seq)`` by sampling; ``temperature=0`` means greedy."""
        check_token_ids(input_ids, self.config.vocab_size)
        was_training = self.training
        self.eval()
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_seq_len:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
            ids = torch.cat([ids, nxt], dim=1)
        self.train(was_training)
        return ids


class MaskedLM(_LanguageModel):
    """Bidirectional encoder with a BERT-style MLM head (dense → GELU → LayerNorm → tied decoder)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.causal:
            raise ValueError("MaskedLM is a bidirectional encoder: build it from a ModelConfig with causal=False")
        if not config.tie_embeddings:
            raise ValueError("the MaskedLM's decoder is tied to its token embedding (BERT's layout); "
                             "build it with tie_embeddings=True")
        self.config = config
        self.backbone = TransformerBackbone(config)
        self.head_dense = nn.Linear(config.d_model, config.d_model)
        self.head_ln = nn.LayerNorm(config.d_model)
        self.head_bias = nn.Parameter(torch.zeros(config.vocab_size))
        _init_weights(self, config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask)
        h = self.head_ln(F.gelu(self.head_dense(h)))
        return self._readout(h @ self.backbone.tok_emb.weight.T) + self.head_bias


def seeded_model(config: ModelConfig, seed: int) -> GPT | MaskedLM:
    """The course model for ``config`` (a GPT when ``config.causal``, else a MaskedLM), initialised from
    ``seed``: two calls with one config and one seed give identical weights, in any process."""
    torch.manual_seed(seed)
    return GPT(config) if config.causal else MaskedLM(config)
