"""How many CPU threads a training process uses.

torch starts one intra-op thread per core. When another program keeps a core busy, those
threads wait for each other at every operation: on 2 cores with one busy, a 60-step run took
79.8 s with torch's default threads and 7.8 s with one thread (a 10x cliff). So the trainer
takes at most its share of the cores (cores / processes on this machine) and leaves out the
cores the 1-minute load average says are busy, and says so. ``OMP_NUM_THREADS`` or
``train.threads`` set by hand are obeyed (with the same warning when the cores look busy);
pin one of them when an exact resume must reproduce the same float reductions.
"""
from __future__ import annotations

import os

import torch


def choose_threads(*, torch_default: int, cores: int, local_world_size: int = 1, load_1min: float | None = None,
                   requested: int = 0) -> tuple[int, str | None]:
    """``(threads, warning)`` for one of ``local_world_size`` processes on ``cores`` cores.

    ``requested`` > 0 is used as given. Otherwise: ``min(torch_default, cores // processes,
    free cores // processes)``, at least 1, where the free cores are ``cores`` minus the
    rounded 1-minute load average. ``warning`` is a sentence when the load leaves fewer free
    cores than the threads this run would otherwise use, else ``None``.
    """
    processes = max(1, local_world_size)
    share = max(1, min(torch_default, cores // processes))
    busy = 0 if load_1min is None else min(cores, int(load_1min + 0.5))
    free = max(1, (cores - busy) // processes)
    threads = requested if requested > 0 else min(share, free)
    warning = None
    if busy and free < (requested or share):
        warning = (f"the 1-minute load average is {load_1min:.1f} on {cores} cores: other programs keep about {busy} "
                   f"busy. " + (f"This run uses {threads} thread(s) per process as requested; threads that wait for a "
                                "busy core can make every step ~10x slower." if requested else
                                f"This run uses {threads} thread(s) per process instead of {share} to avoid waiting for "
                                "them (set train.threads or OMP_NUM_THREADS to choose)."))
    return threads, warning


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_training_threads(requested: int = 0) -> tuple[int, str | None]:
    """Apply :func:`choose_threads` to this process; returns ``(threads, warning)``.

    ``OMP_NUM_THREADS`` in the environment counts as a request, as torch reads it.
    """
    if requested <= 0 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        requested = int(os.environ["OMP_NUM_THREADS"])
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    threads, warning = choose_threads(torch_default=torch.get_num_threads(), cores=available_cores(),
                                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), load_1min=load,
                                      requested=requested)
    torch.set_num_threads(threads)
    return threads, warning
