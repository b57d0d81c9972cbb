"""Multi-device CPU test processes run on one CPU, where XLA's rendezvous hang was not seen.

With more simulated devices (``--xla_force_host_platform_device_count``) than cores, XLA's
CPU runtime can hang at a rendezvous: in CI's 3-device trainer run (2 cores, both busy)
devices 0 and 1 waited in the step's all-reduce on Eigen intra-op pool threads that had
finished a parallel contraction and gone on into it, device 2 never arrived, and XLA
aborted after 40 s. Every abort seen here has that shape (same key, op_id=1, device 2
missing). The pool is not simply too small: it has one thread per device (3 here, pinned
or not, counted from the thread names), so which wait starves device 2 is not established.
What is measured: the 3-device trainer (batch 96, one epoch of the sample) beside two
busy loops on this 2-core machine aborted in 8 of 22 runs on both cores (1 of 4 with
``--xla_cpu_multi_thread_eigen=false``, which does not prevent it) and in 0 of 22 runs
pinned to one CPU (10 of each interleaved: 2 aborts against 0). So multi-device test
processes run on one CPU.

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
