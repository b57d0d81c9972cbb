"""Every registered op, forward and backward, compiled for H100, H200, TPU v5e and v6e.

Cases: every op (and the MNIST training step) x f32, bf16 x the registry's benchmark
shapes (mnist, llm), the MNIST step at the full and last partial batch, and the odd test
shapes (sizes no block divides, and 1) -- ``static.build_cases()``. A case fails on:

* any compile error (Triton / ptxas / Mosaic, shared memory or VMEM over the limit);
* CUDA: any register spill -- XLA's own check, ``xla_gpu_fail_ptx_compilation_on_register_spilling``;
* CUDA: a bf16 matmul kernel (a Pallas kernel with a dot on bf16 operands) whose PTX has
  no tensor-core instruction (``wgmma.mma_async`` or ``mma.sync``);
* a Pallas kernel traced for the target's backend that is missing from the executable
  (the op fell back, or another backend's kernel was lowered).

The H200 (the card the GPU window lends) compiles every case; the H100 the benchmark
shapes only. Both are sm_90a with 132 SMs and the same shared memory, and XLA and Pallas
build the same kernels for them: the odd shapes' PTX is identical, which
``test_h100_and_h200_build_the_same_kernels`` checks (one odd case per op) instead of
compiling all 50 odd cases twice (~100 s of CI).
"""

from __future__ import annotations

import pytest

from fusedvjp.bench import static

GPU_TARGETS = ("h100", "h200")
TPU_TARGETS = ("v5e", "v6e")
CASES = static.build_cases()


def _ids(case: static.StaticCase) -> str:
    return case.label


def _check_kernels_compiled(result: static.Compiled) -> None:
    traced = {k["name"] for k in result.pallas_kernels}
    assert traced, f"{result.case.label}: no Pallas kernel was traced for {result.target.name}"
    compiled = static.compiled_kernel_names(result)
    assert traced <= compiled, f"Pallas kernels missing from the executable: {sorted(traced - compiled)}"


GPU_CASES = [(target, case) for target in GPU_TARGETS for case in CASES
             if target == "h200" or case.shape_set != "odd"]


@pytest.mark.parametrize(("target", "case"), GPU_CASES, ids=[f"{t}-{c.label}" for t, c in GPU_CASES])
def test_compiles_for_gpu(target, case, tmp_path):
    # The PTX is dumped where the tensor-core check needs it: bf16 cases (dumps cost ~20%).
    dump = tmp_path / "dump" if case.dtype == "bf16" else None
    result = static.compile_case(case, target, dump_dir=dump, fail_on_spill=True)
    if not result.ok and "spill" in result.error:
        spills = static.spilling_kernels(case, target, tmp_path / "spill")
        pytest.fail(f"{target} {case.label}: register spill: {spills}")
    assert result.ok, f"{target} {case.label}: {result.error}"
    _check_kernels_compiled(result)
    if dump is not None:
        assert not static.tensor_core_problems(result)


def test_h100_and_h200_build_the_same_kernels(tmp_path):
    reason = static.unavailable_reason(static.get_target("h100").platform)
    if reason:
        pytest.skip(f"cannot compile for h100: {reason}")
    first_odd = {}
    for case in CASES:
        if case.shape_set == "odd" and case.dtype == "bf16":
            first_odd.setdefault(case.op, case)
    for case in first_odd.values():
        ptx = {}
        for target in GPU_TARGETS:
            result = static.compile_case(case, target, dump_dir=tmp_path / case.label / target)
            assert result.ok, f"{target} {case.label}: {result.error}"
            # File names carry a per-compile module number; the kernels' text must match.
            ptx[target] = sorted(p.read_text() for p in (tmp_path / case.label / target).glob("*.ptx"))
        assert ptx["h100"], f"{case.label}: no PTX dumped"
        assert ptx["h100"] == ptx["h200"], f"{case.label}: H100 and H200 kernels differ"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("target", TPU_TARGETS)
def test_compiles_for_tpu(target, case):
    result = static.compile_case(case, target)
    assert result.ok, f"{target} {case.label}: {result.error}"
    _check_kernels_compiled(result)
