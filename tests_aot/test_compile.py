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
"""

from __future__ import annotations

import pytest

from fusedvjp.bench import static

GPU_TARGETS = ("h100", "h200")
TPU_TARGETS = ("v5e", "v6e")
CASES = static.build_cases()


def _ids(case: static.StaticCase) -> str:
    return case.label


def _name_the_spills(case: static.StaticCase, target: str, dump_dir) -> str:
    """XLA's spill error names no kernel: compile again with the PTX dumped, and ask ptxas."""
    static.compile_case(case, target, dump_dir=dump_dir, fail_on_spill=True)
    spilled = []
    for ptx in sorted(dump_dir.glob("*.ptx")):
        for name, info in static.ptxas_info(ptx).items():
            if info.get("spill_store_bytes") or info.get("spill_load_bytes"):
                spilled.append(f"{name}: {info.get('registers')} regs, {info.get('spill_store_bytes')} B spill "
                               f"stores, {info.get('spill_load_bytes')} B spill loads")
    return "; ".join(spilled) or "(ptxas here reports no spill)"


def _check_kernels_compiled(result: static.Compiled) -> None:
    traced = {k["name"] for k in result.pallas_kernels}
    assert traced, f"{result.case.label}: no Pallas kernel was traced for {result.target.name}"
    compiled = static.compiled_kernel_names(result)
    assert traced <= compiled, f"Pallas kernels missing from the executable: {sorted(traced - compiled)}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("target", GPU_TARGETS)
def test_compiles_for_gpu(target, case, tmp_path):
    # The PTX is dumped where the tensor-core check needs it: bf16 cases (dumps cost ~20%).
    dump = tmp_path / "dump" if case.dtype == "bf16" else None
    result = static.compile_case(case, target, dump_dir=dump, fail_on_spill=True)
    if not result.ok and "spill" in result.error:
        pytest.fail(f"{target} {case.label}: register spill: {_name_the_spills(case, target, tmp_path / 'spill')}")
    assert result.ok, f"{target} {case.label}: {result.error}"
    _check_kernels_compiled(result)
    if dump is not None:
        assert not static.tensor_core_problems(result)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("target", TPU_TARGETS)
def test_compiles_for_tpu(target, case):
    result = static.compile_case(case, target)
    assert result.ok, f"{target} {case.label}: {result.error}"
    _check_kernels_compiled(result)
