"""The op tests once more under ``JAX_ENABLE_X64=1`` (``jax_enable_x64``), as scientific users run.

x64 changes what a Python int or float becomes (int64, float64), which broke the layer_norm
kernel (int32 program ids met int64 column starts) and let int64 labels wrap; the run below
covers every op and impl: the registry's generic numerics (forward and VJP against float64,
every impl, f32 and bf16, odd shapes), the dense, layer_norm and rms_norm tests, the documented
semantics (cross-entropy's x64 cases: int64 labels, float64) and the fair-baseline check.
The cross-entropy file's own tests run in the default tier only (CI's time). Slow tier; it
runs in a subprocess because x64 is a process-wide setting read at import.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO

# (file, -k selection): one subprocess each, so pytest-xdist spreads them; the registry's
# generic tests are split by op (the longest part bounds CI's wall clock).
X64_PART = (
    ("tests/test_ops_registry.py", "dense or layer_norm or rms_norm"),
    ("tests/test_ops_registry.py", "softmax_cross_entropy and not linear"),
    ("tests/test_ops_registry.py", "linear_softmax_cross_entropy"),
    ("tests/test_ops_dense.py", None),
    ("tests/test_ops_layer_norm.py", None),
    ("tests/test_ops_rms_norm.py", None),
    ("tests/test_semantics.py", None),
    ("tests/test_xent_labels.py", None),
    ("tests/test_xent_options.py", None),
    ("tests/test_fair_baseline.py", None),
)


@pytest.mark.slow
@pytest.mark.skipif(jax.config.jax_enable_x64, reason="already the x64 run")
@pytest.mark.parametrize(("path", "select"), X64_PART, ids=[f"{p}[{k}]" if k else p for p, k in X64_PART])
def test_op_tests_pass_under_x64(path, select):
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", path]
    if select:
        cmd += ["-k", select]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    tail = (run.stdout + run.stderr)[-8000:]
    assert run.returncode == 0, f"under JAX_ENABLE_X64=1: {' '.join(cmd)}\n{tail}"
    assert " passed" in tail and "no tests ran" not in tail, tail
