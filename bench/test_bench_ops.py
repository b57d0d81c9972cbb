"""pytest-benchmark suite over the CLI's cases: ``pytest bench --benchmark-only``.

The cases come from :func:`fusedvjp.bench.cases.build_cases` (quick shapes by default;
``--bench-full`` or ``FUSEDVJP_BENCH_FULL=1`` for the real ones, ``--bench-shapes`` and
``--bench-dtypes`` to choose). Each test compiles ahead of time (the compile time goes to
``extra_info``, not the timing), then times calls on rotating device-resident inputs.
``python -m fusedvjp.bench`` gives the same numbers with the roofline and targets.
"""

from __future__ import annotations

import itertools

import jax
import pytest

from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import timing

pytest.importorskip("pytest_benchmark")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    full = config.getoption("--bench-full")
    case_list = cases_lib.build_cases(
        shape_sets=config.getoption("--bench-shapes").split(","),
        dtypes=config.getoption("--bench-dtypes").split(","),
        quick=not full,
    )
    metafunc.parametrize("case", case_list, ids=[c.label for c in case_list])
    metafunc.parametrize("impl", cases_lib.IMPLS)


def test_op(benchmark, case, impl, request):
    rounds = 30 if request.config.getoption("--bench-full") else 5
    inputs = case.input_copies(seed=0, max_copies=cases_lib.MAX_COPIES if rounds >= 30 else 2)
    try:
        compiled = timing.compile_fn(case.function(impl), inputs[0])
    except NotImplementedError as e:
        pytest.skip(f"impl={impl} does not serve this case: {e}")
    benchmark.group = case.label
    benchmark.extra_info.update(op=case.op, shape=list(case.shape), dtype=case.dtype, mode=case.mode, impl=impl,
                                bytes=case.bytes(), flops=case.flops(), compile_s=compiled.compile_s,
                                peak_temp_bytes=compiled.peak_temp_bytes, input_copies=len(inputs))
    cycle = itertools.cycle(inputs)
    benchmark.pedantic(lambda *args: jax.block_until_ready(compiled.fn(*args)),
                       setup=lambda: (next(cycle), {}), rounds=rounds, warmup_rounds=1)
