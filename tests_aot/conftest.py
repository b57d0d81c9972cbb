"""The ahead-of-time compile tier: every op compiled for an H100, H200, A100, B200, TPU v5e and v6e on CPU.

Runs in its own venv with the ``aot`` extra (``jax[cuda13]`` and ``jax[tpu]``, which
bring XLA's CUDA and TPU compilers): ``.ci/aot`` creates ``.venv-aot`` and runs
``.venv-aot/bin/python -m pytest -q tests_aot``. Without the plugins every test skips,
saying which package is missing.
"""

from __future__ import annotations

import os

# No GPU or TPU is here: JAX must run on the CPU and use the plugins only to compile for
# abstract topologies. This must be set before jax is first imported.
os.environ["JAX_PLATFORMS"] = "cpu"

import pytest  # noqa: E402

from fusedvjp.bench import static  # noqa: E402


@pytest.fixture(autouse=True)
def _skip_without_compiler(request):
    """A test parametrized by ``target`` skips, with the reason, when this venv cannot
    compile for that target (the plugin is not installed); in CI it is installed."""
    callspec = getattr(request.node, "callspec", None)
    target = callspec.params.get("target") if callspec else None
    if target is not None:
        reason = static.unavailable_reason(static.get_target(target).platform)
        if reason:
            pytest.skip(f"cannot compile for {target}: {reason}")
