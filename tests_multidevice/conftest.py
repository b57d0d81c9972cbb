"""The multi-device tier: every op sharded over 8 CPU devices.

XLA's host platform is split into 8 devices, which must happen before jax is first
imported -- so this directory runs in its own process: ``tests/test_multidevice_suite.py``
starts ``python -m pytest tests_multidevice`` (CI runs it as part of the README's test
command), or run it alone the same way.
"""

from __future__ import annotations

import os

# Single-threaded ops: with 8 devices on few cores, devices blocked in an all-reduce can
# otherwise hold every thread of Eigen's shared pool that the last device needs
# (a rendezvous deadlock seen under load).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    if jax.device_count() != 8:
        pytest.fail(f"expected 8 CPU devices (XLA_FLAGS={os.environ['XLA_FLAGS']!r}), got {jax.devices()}")
