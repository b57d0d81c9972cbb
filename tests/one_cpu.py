"""Pin a multi-device CPU process to one CPU, so that XLA cannot deadlock at a rendezvous.

XLA's CPU runtime evaluates a large dot on Eigen's intra-op pool (one thread per CPU the
process may use) and continues that device's program on the pool thread that finishes
it -- into an all-reduce, where the thread blocks until every device arrives. With more
simulated devices than pool threads, the waiting devices can hold every pool thread while
the last device's dot waits for one: a deadlock, which XLA ends by aborting after 40 s.
It aborted CI's 3-device trainer run (2 cores, both busy). Measured here, the 3-device
trainer (batch 96, one epoch of the sample) beside two busy loops: 6 of 12 runs aborted
(1 of 4 with ``--xla_cpu_multi_thread_eigen=false``, which the thunk runtime does not
read: the stuck thread is an Eigen pool worker in a parallel contraction, 5 of 8
without). A process allowed one CPU gets a one-thread pool, and Eigen evaluates every
contraction inline on the calling device's own thread: 0 of 12 pinned runs aborted under
the same load.

Subprocesses are started under ``taskset`` (a ``preexec_fn`` would fork the multi-threaded
pytest process); the multi-device conftest pins its own process before jax starts, which
is why nothing here imports jax.
"""

from __future__ import annotations

import os


def one_cpu() -> int:
    """The CPU for this pytest-xdist worker's multi-device processes: worker gwN takes the
    N-th CPU this process may use (wrapping), so the two workers' runs do not share one."""
    cpus = sorted(os.sched_getaffinity(0))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    return cpus[index % len(cpus)]


def pin_to_one_cpu() -> None:
    """Restricts this process (and the threads it starts from now on) to ``one_cpu()``."""
    os.sched_setaffinity(0, {one_cpu()})


def on_one_cpu(cmd: list[str]) -> list[str]:
    """``cmd`` run under ``taskset`` on ``one_cpu()``."""
    return ["taskset", "--cpu-list", str(one_cpu()), *cmd]
