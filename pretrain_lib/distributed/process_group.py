"""Join and leave the process group that torchrun describes.

A strategy's ``main`` runs on every rank under torchrun. Backend and device follow the
hardware: NCCL and ``cuda:LOCAL_RANK`` when each local rank can have its own GPU, gloo and
the CPU otherwise. Everything else a strategy module shares lives in its own small module:
``arguments`` (command line), ``faults`` (failure injection), ``reference`` (the model, the
optimiser and the single-process run), ``metrics`` (what rank 0 writes), ``errors`` (a
rank's traceback for the launcher).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(init_timeout_s: float = 60.0) -> DistContext:
    """Join the process group that torchrun describes through environment variables.

    ``init_timeout_s`` bounds both the rendezvous and every later collective, so a missing
    or dead peer fails within that time instead of hanging forever.
    """
    missing = [k for k in TORCHRUN_VARIABLES if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: start this module with torchrun, e.g. "
                           "python -m torch.distributed.run --standalone --nproc_per_node=2 -m <module>, or from "
                           "Python with pretrain_lib.distributed.launch.run_torchrun")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        device = torch.device("cuda", local_rank)  # one GPU per process: NCCL refuses two ranks on one GPU
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        if torch.cuda.is_available() and local_rank == 0:
            print(f"{local_world} processes per node but {torch.cuda.device_count()} GPU(s): running on the CPU with gloo",
                  flush=True)
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=init_timeout_s)
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None,
                            **_attempt_store(timeout))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def teardown() -> None:
    """Wait for every rank, then leave the process group.

    Without the barrier a rank can tear down its communicator while a peer is still
    inside a collective; under load that aborts the process at exit (SIGABRT) even
    though every result was correct.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _attempt_store(timeout: timedelta) -> dict:
    """Under torchrun's elastic restart, the rendezvous keys of this attempt only.

    The agent's key-value store outlives a restart (same port), and the process group's keys are
    the same in every attempt: a restarted rank could read the address a killed rank of the previous
    attempt left there and fail to connect to it ("Connection refused"), depending on which rank writes
    first. A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps the attempts apart. Outside an
    elastic agent's store, ``init_process_group`` reads the environment as usual (``{}``).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"course/attempt_{attempt}", agent_store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
