"""pytest-benchmark suite over the CLI's cases: ``pytest bench --benchmark-only``.

The cases come from :func:`fusedvjp.bench.cases.build_cases` (quick shapes by default;
``--bench-full`` or ``FUSEDVJP_BENCH_FULL=1`` for the real ones, ``--bench-shapes`` and
``--bench-dtypes`` to choose). Each test compiles ahead of time (the compile time goes to
``extra_info``, not the timing), then times calls on rotating device-resident inputs.
``python -m fusedvjp.bench`` gives the same numbers with the roofline and targets.

Every case here is one the kernels are meant to serve, so a refusal (``NotImplementedError``)
fails its test -- on a GPU it would otherwise be a skipped row nobody reads. Only the
refusals listed in :data:`EXPECTED_REFUSALS`, each with the documented reason, skip.
"""

from __future__ import annotations

import itertools

import jax
import pytest

from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import timing

pytest.importorskip("pytest_benchmark")

# (op, dtype, jax.default_backend()) -> why the kernels refuse that case by design (cite
# the docstring that says so). A refused case skips with this reason; a refusal of a case
# not listed fails the test. Empty: at the benchmark's full shapes, f32 and bf16, every op
# lowers to its kernels for an H100 and a TPU (test_full_case_lowers_to_the_kernels checks
# that on the CPU). A future entry would be e.g. layer_norm on "tpu" for rows longer than
# the VMEM budget ("Rows too long for the budget even at 8 rows raise
# NotImplementedError", kernels/layer_norm/__init__.py).
EXPECTED_REFUSALS: dict[tuple[str, str, str], str] = {}


def pytest_generate_tests(metafunc):
    if "full_case" in metafunc.fixturenames:  # every full-size case, whatever --bench-* says
        full_cases = cases_lib.build_cases(quick=False)
        metafunc.parametrize("full_case", full_cases, ids=[c.label for c in full_cases])
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
    if not case.has_impl(impl):
        pytest.skip(f"{case.op} has no {impl} baseline (bench/baselines.py)")
    rounds = 30 if request.config.getoption("--bench-full") else 5
    inputs = case.input_copies(seed=0, max_copies=cases_lib.MAX_COPIES if rounds >= 30 else 2)
    compiled = compile_or_fail(case, impl, inputs[0])
    benchmark.group = case.label
    benchmark.extra_info.update(op=case.op, shape=list(case.shape), dtype=case.dtype, mode=case.mode, impl=impl,
                                bytes=case.bytes(), flops=case.flops(), compile_s=compiled.compile_s,
                                peak_temp_bytes=compiled.peak_temp_bytes, input_copies=len(inputs))
    cycle = itertools.cycle(inputs)
    benchmark.pedantic(lambda *args: jax.block_until_ready(compiled.fn(*args)),
                       setup=lambda: (next(cycle), {}), rounds=rounds, warmup_rounds=1)


def compile_or_fail(case: cases_lib.Case, impl: str, example_inputs) -> timing.Compiled:
    """Compiles ``case`` for ``impl``. A refusal fails the test unless it is an expected one
    (:data:`EXPECTED_REFUSALS`), which skips with its documented reason."""
    try:
        return timing.compile_fn(case.function(impl), example_inputs)
    except NotImplementedError as e:
        backend = jax.default_backend()
        reason = EXPECTED_REFUSALS.get((case.op, case.dtype, backend))
        if reason is None:
            pytest.fail(f"impl={impl} refused {case.label} on {backend}, a case the kernels are meant to serve "
                        f"(not in EXPECTED_REFUSALS): {e}", pytrace=False)
        pytest.skip(f"impl={impl} does not serve {case.label} on {backend}, as documented: {reason} ({e})")


# --- the refusal rule itself (plain tests: `pytest bench`, not under --benchmark-only) ----------


def _refusing_case(monkeypatch) -> cases_lib.Case:
    """A real quick case whose pallas function raises NotImplementedError when traced."""
    case = cases_lib.build_cases(ops=["xent"], shape_sets=["mnist"], dtypes=["f32"], modes=["fwd"], quick=True)[0]

    def function(self, impl):
        def refused(*args):
            raise NotImplementedError("no kernel for this case (test)")
        return refused

    monkeypatch.setattr(cases_lib.Case, "function", function)
    return case


def test_an_unexpected_refusal_fails(monkeypatch):
    case = _refusing_case(monkeypatch)
    with pytest.raises(pytest.fail.Exception, match=r"impl=pallas refused xent-.* meant to serve.*\(test\)"):
        compile_or_fail(case, "pallas", case.make_inputs(seed=0))


def test_only_a_documented_refusal_skips(monkeypatch):
    case = _refusing_case(monkeypatch)
    key = (case.op, case.dtype, jax.default_backend())
    monkeypatch.setitem(EXPECTED_REFUSALS, key, "documented limit (test)")
    with pytest.raises(pytest.skip.Exception, match=r"as documented: documented limit \(test\)"):
        compile_or_fail(case, "pallas", case.make_inputs(seed=0))
    other = (case.op, "bf16", key[2])  # the entry names its dtype: an f32 refusal still fails
    monkeypatch.delitem(EXPECTED_REFUSALS, key)
    monkeypatch.setitem(EXPECTED_REFUSALS, other, "documented limit (test)")
    with pytest.raises(pytest.fail.Exception):
        compile_or_fail(case, "pallas", case.make_inputs(seed=0))


# Lowering platform -> the jax.default_backend() of a machine that runs it.
_BACKEND_OF_PLATFORM = {"cuda": "gpu", "tpu": "tpu"}


@pytest.mark.parametrize("platform", _BACKEND_OF_PLATFORM)
def test_full_case_lowers_to_the_kernels(full_case, platform, tests_conftest):
    """Every full-size case, impl="pallas", lowers for an abstract H100 / TPU on this CPU with
    compiled kernels in it: a refusal is found here, before any GPU time, not as a failed row."""
    case = full_case
    specs = jax.eval_shape(lambda: case.make_inputs(seed=0))  # no 2 GiB of logits drawn
    try:
        text = tests_conftest.lower_for(platform, case.function("pallas"), *specs)
    except NotImplementedError as e:
        reason = EXPECTED_REFUSALS.get((case.op, case.dtype, _BACKEND_OF_PLATFORM[platform]))
        if reason is None:
            raise
        pytest.skip(f"{case.label} on {platform}, as documented: {reason} ({e})")
    names = tests_conftest.lowered_kernel_names(text, platform)
    assert names and all(n.startswith("fusedvjp_") for n in names), names
