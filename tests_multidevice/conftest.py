"""The multi-device tier: every op sharded over 8 CPU devices.

XLA's host platform is split into 8 devices, which must happen before jax is first
imported -- so this directory runs in its own process: ``tests/test_multidevice_suite.py``
starts ``python -m pytest tests_multidevice`` (CI runs it as part of the README's test
command), or run it alone the same way.
"""

from __future__ import annotations

import os
import pathlib
import sys

# 8 devices on few cores can hang XLA at a rendezvous unless the process runs on one CPU
# (tests/one_cpu.py has the measurements); pinned before jax starts its thread pools.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from one_cpu import pin_to_one_cpu  # noqa: E402

pin_to_one_cpu()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    if jax.device_count() != 8:
        pytest.fail(f"expected 8 CPU devices (XLA_FLAGS={os.environ['XLA_FLAGS']!r}), got {jax.devices()}")
