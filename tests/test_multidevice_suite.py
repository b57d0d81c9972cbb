"""The multi-device tier (``tests_multidevice/``): every op and impl sharded over 8 CPU devices.

It needs ``--xla_force_host_platform_device_count=8`` before jax is first imported, so
it runs in its own process (its conftest sets the flag), in three parts that pytest-xdist
spreads over its workers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

PARTS = {
    "data-parallel": "data_parallel or shard_map or registered",
    "tensor-and-vocabulary-parallel": "tensor_parallel or vocabulary",
    "idioms": "step_as_written or vmap_over_a_split_axis",
}


@pytest.mark.slow
@pytest.mark.parametrize("part", PARTS)
def test_multidevice_tier(part):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "tests_multidevice", "-k", PARTS[part]]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-8000:]
    assert run.returncode == 0, f"{' '.join(cmd)}\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail
