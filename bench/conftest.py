"""Options of the pytest-benchmark suite (``pytest bench --benchmark-only``); see test_bench_ops.py."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fusedvjp bench")
    group.addoption("--bench-full", action="store_true", default=os.environ.get("FUSEDVJP_BENCH_FULL") == "1",
                    help="time the real shapes instead of the quick ones (env FUSEDVJP_BENCH_FULL=1)")
    group.addoption("--bench-shapes", default=os.environ.get("FUSEDVJP_BENCH_SHAPES", "mnist,llm"),
                    help="comma list of shape sets: mnist, llm (env FUSEDVJP_BENCH_SHAPES)")
    group.addoption("--bench-dtypes", default=os.environ.get("FUSEDVJP_BENCH_DTYPES", "f32,bf16"),
                    help="comma list of dtypes: f32, bf16 (env FUSEDVJP_BENCH_DTYPES)")


@pytest.fixture(scope="session")
def tests_conftest():
    """``tests/conftest.py`` as a module, for its lowering helpers (``lower_for`` for an
    abstract H100/TPU, ``lowered_kernel_names``): one copy of that code for both suites."""
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("fusedvjp_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
