"""How many threads torch computes with in each process of a stage; no stage logic.

Every stage's floats depend on it: torch's CPU matmuls and reductions split their sums by
thread, so the same inputs summed on 1 or 2 threads round differently (the tiny LM trained on
1 thread and on 2 differs in its weights' last bits, and everything downstream with it). So
the count is set from what the config asks for, never inherited from the environment, where
it depends on the process a stage happens to land in: Ray sets OMP_NUM_THREADS in a worker
from its CPU reservation, and a job's driver inherits `--entrypoint-num-cpus` that way from
Ray's job supervisor, while the same code run from a shell gets every core.

The rule: a Ray worker (an actor, a task, a Tune trial) computes on as many threads as the CPUs
it reserved, which the config sets (`cpus_per_actor`, `cpus_per_trial`, ...); a driver on
every core of its machine. A stage option overrides it (`--acts.threads_per_actor`,
`--train_lm.threads`). Runs of one config on one kind of machine are then bit-identical
wherever their processes land; another CPU, another thread count or a GPU may round otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, not OMP_NUM_THREADS)."""
    return len(os.sched_getaffinity(0))


def default() -> int:
    """The rule's count for this process (module doc): in a Ray worker, its reserved CPUs
    (at least 1), else every core."""
    import ray

    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        if ctx.worker.mode == ray.WORKER_MODE:
            cpus = ctx.get_assigned_resources().get("CPU")
            return max(1, math.floor(cpus)) if cpus else 1
    return cores()


def pin(n: int = 0) -> int:
    """Compute on n threads in this process from now on (0: `default()`); -> the count."""
    n = n or default()
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def pinned(n: int = 0) -> Iterator[int]:
    """`pin(n)` for the block, then the count before it again (a library call must not leave
    its caller's process changed)."""
    before = torch.get_num_threads()
    try:
        yield pin(n)
    finally:
        torch.set_num_threads(before)
