# Hidden probes of exercises/03_distributed.ipynb. The three functions run on 2 ranks under
# torchrun (pretrain_lib.grading.rank_probe), once per submission, on inputs from the secret
# seed; rank 0 returns every rank's values and the judge compares them with the solution's.
FORBIDDEN = {"gpipe_order", "pretrain_lib.distributed.pipeline_parallel", "pretrain_lib.distributed.pipeline_stages",
             "pretrain_lib.distributed.tensor_parallel", "pretrain_lib.distributed.tensor_parallel_layers",
             "pretrain_lib.distributed.data_parallel", "pretrain_lib.distributed.exercise_check", "exercise_check",
             "DistributedDataParallel", "all_reduce_gradients", "ColwiseParallel"}


def _ranks(ns, seed, ctx):
    if "ranks" not in ctx["cache"]:
        import tempfile
        from pathlib import Path
        from pretrain_lib.distributed.launch import run_torchrun
        with tempfile.TemporaryDirectory(prefix="probe3-") as tmp:
            (Path(tmp) / "answers.py").write_text(ctx["script"])
            result = run_torchrun("pretrain_lib.grading.rank_probe", nproc_per_node=2, stream=False, timeout_s=180,
                                  args=["--solution", str(Path(tmp) / "answers.py"), "--seed", str(int(seed) % 10**6)],
                                  run_dir=Path(tmp) / "run")
            ctx["cache"]["ranks"] = result.metrics["values"]
    return ctx["cache"]["ranks"]


def _on_ranks(name):
    def run(ns, seed, ctx):
        per_rank = _ranks(ns, seed, ctx)[name]
        errors = [v["error"] for v in per_rank if "error" in v]
        if errors:
            raise RuntimeError(f"on 2 ranks: {errors[0]}")
        return [v["value"] for v in per_rank]
    return run


def _gpipe_local(ns, seed, ctx):
    r = rng(seed, 80)
    return [[list(step) for step in ns["gpipe_micro_steps"](int(m))] for m in r.integers(1, 9, 3)]


PROBES = {
    "gpipe-order-local": {"answer": "gpipe_micro_steps", "run": _gpipe_local, "judge": equal},
    "average-gradients-2-ranks": {"answer": "average_gradients", "run": _on_ranks("average_gradients"),
                                  "judge": lambda s, r, seed: close(s, r, 1e-4, 1e-6)},
    "column-parallel-2-ranks": {"answer": "column_parallel_forward", "run": _on_ranks("column_parallel_forward"),
                                "judge": lambda s, r, seed: close(s, r, 1e-4, 1e-5)},
    "gpipe-order-2-ranks": {"answer": "gpipe_micro_steps", "run": _on_ranks("gpipe_micro_steps"), "judge": equal},
}

describe_inputs(PROBES, {
    "gpipe-order-local": "3 random numbers of micro-batches on one process",
    "average-gradients-2-ranks": "a small random model's gradients on 2 ranks (each rank its half of a batch)",
    "column-parallel-2-ranks": "random x, weight and bias of drawn sizes on 2 ranks",
    "gpipe-order-2-ranks": "2 drawn numbers of micro-batches on 2 ranks",
})
