"""Options of the pytest-benchmark suite (``pytest bench --benchmark-only``); see test_bench_ops.py."""

from __future__ import annotations

import os


def pytest_addoption(parser):
    group = parser.getgroup("fusedvjp bench")
    group.addoption("--bench-full", action="store_true", default=os.environ.get("FUSEDVJP_BENCH_FULL") == "1",
                    help="time the real shapes instead of the quick ones (env FUSEDVJP_BENCH_FULL=1)")
    group.addoption("--bench-shapes", default=os.environ.get("FUSEDVJP_BENCH_SHAPES", "mnist,llm"),
                    help="comma list of shape sets: mnist, llm (env FUSEDVJP_BENCH_SHAPES)")
    group.addoption("--bench-dtypes", default=os.environ.get("FUSEDVJP_BENCH_DTYPES", "f32,bf16"),
                    help="comma list of dtypes: f32, bf16 (env FUSEDVJP_BENCH_DTYPES)")
