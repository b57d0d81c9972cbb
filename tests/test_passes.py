"""bench/passes.py counts full passes over the large array in an optimized HLO module.

A hand-written module in the shape of XLA's H100 compile of optax's integer-label
cross-entropy (fwd+bwd): a max and a sum reduction over the logits (2 reads), a fusion that
only gathers the label's logit from them (no pass), the gradient's elementwise fusion (a
read and a write) and the in-place scatter of the label's -1 into it (no pass): 3r+1w.
The compile tier (tests_aot/test_baseline_passes.py) counts real compiles.
"""

from __future__ import annotations

import pytest

from fusedvjp.bench import passes

MODULE = """
HloModule jit_f

%fused_max (param_0.1: bf16[8,32]) -> bf16[8] {
  %param_0.1 = bf16[8,32]{1,0} parameter(0)
  %c = bf16[] constant(-inf)
  ROOT %reduce.1 = bf16[8]{0} reduce(%param_0.1, %c), dimensions={1}, to_apply=%max
}

%fused_sum (param_0.2: bf16[8,32], param_1.2: bf16[8]) -> f32[8] {
  %param_0.2 = bf16[8,32]{1,0} parameter(0)
  %param_1.2 = bf16[8]{0} parameter(1)
  %b = bf16[8,32]{1,0} broadcast(%param_1.2), dimensions={0}
  %sub = bf16[8,32]{1,0} subtract(%param_0.2, %b)
  %e = f32[8,32]{1,0} exponential(%sub)
  %z = f32[] constant(0)
  ROOT %reduce.2 = f32[8]{0} reduce(%e, %z), dimensions={1}, to_apply=%add
}

%fused_label (param_0.3: bf16[8,32], param_1.3: s32[8,2]) -> bf16[8] {
  %param_0.3 = bf16[8,32]{1,0} parameter(0)
  %bitcast.3 = bf16[8,32]{1,0} bitcast(%param_0.3)
  %param_1.3 = s32[8,2]{1,0} parameter(1)
  %gather.3 = bf16[8,1,1]{2,1,0} gather(%bitcast.3, %param_1.3), offset_dims={1,2}, slice_sizes={1,1}
  ROOT %bitcast.4 = bf16[8]{0} bitcast(%gather.3)
}

%fused_multiply (param_0.4: bf16[8], param_1.4: bf16[8,32]) -> bf16[8,32] {
  %param_1.4 = bf16[8,32]{1,0} parameter(1)
  %param_0.4 = bf16[8]{0} parameter(0)
  %b.4 = bf16[8,32]{1,0} broadcast(%param_0.4), dimensions={0}
  ROOT %m = bf16[8,32]{1,0} multiply(%param_1.4, %b.4)
}

%fused_scatter (param_0.5: bf16[8,32], param_1.5: s32[8,2], param_2.5: bf16[8,1,1]) -> bf16[8,32] {
  %param_0.5 = bf16[8,32]{1,0} parameter(0)
  %param_1.5 = s32[8,2]{1,0} parameter(1)
  %param_2.5 = bf16[8,1,1]{2,1,0} parameter(2)
  ROOT %scatter.5 = bf16[8,32]{1,0} scatter(%param_0.5, %param_1.5, %param_2.5), update_window_dims={1,2}, to_apply=%add
}

ENTRY %main (x: bf16[8,32], idx: s32[8,2], u: bf16[8,1,1]) -> (bf16[8], bf16[8,32]) {
  %x = bf16[8,32]{1,0} parameter(0)
  %idx = s32[8,2]{1,0} parameter(1)
  %u = bf16[8,1,1]{2,1,0} parameter(2)
  %max = bf16[8]{0} fusion(%x), kind=kInput, calls=%fused_max
  %sum = f32[8]{0} fusion(%x, %max), kind=kInput, calls=%fused_sum
  %label = bf16[8]{0} fusion(%x, %idx), kind=kLoop, calls=%fused_label
  %grad = bf16[8,32]{1,0} fusion(%label, %x), kind=kLoop, calls=%fused_multiply
  %dx = bf16[8,32]{1,0} fusion(%grad, %idx, %u), kind=kInput, calls=%fused_scatter
  ROOT %t = (bf16[8]{0}, bf16[8,32]{1,0}) tuple(%label, %dx)
}
"""


def test_counts_reads_and_writes_not_gathers_or_in_place_scatters():
    got = passes.count(MODULE, 8 * 32)
    assert (got.reads, got.writes) == (3, 1), got.where
    assert got.where == ("r max(x)", "r sum(x)", "r grad(x)", "w grad")


def test_a_gather_that_also_feeds_arithmetic_is_a_read():
    """The plant: the label fusion also multiplies the whole array -- now a full read."""
    planted = MODULE.replace("ROOT %bitcast.4 = bf16[8]{0} bitcast(%gather.3)",
                             "%sq = bf16[8,32]{1,0} multiply(%param_0.3, %param_0.3)\n"
                             "  ROOT %bitcast.4 = bf16[8]{0} bitcast(%gather.3)")
    got = passes.count(planted, 8 * 32)
    assert (got.reads, got.writes) == (4, 1), got.where


def test_an_out_of_place_scatter_is_a_write():
    planted = MODULE.replace("scatter(%param_0.5,", "scatter(%copy.5,").replace(
        "  %param_1.5 = s32", "  %copy.5 = bf16[8,32]{1,0} negate(%param_0.5)\n  %param_1.5 = s32")
    got = passes.count(planted, 8 * 32)
    assert (got.reads, got.writes) == (4, 2), got.where


def test_smaller_buffers_and_loops():
    assert passes.count(MODULE, 8 * 32 + 1).total == 0
    with pytest.raises(ValueError, match="ENTRY"):
        passes.count("HloModule m\n", 1)
    looped = MODULE.replace("%dx = bf16[8,32]{1,0} fusion(%grad, %idx, %u), kind=kInput, calls=%fused_scatter",
                            "%dx = bf16[8,32]{1,0} while(%grad), condition=%c, body=%b")
    with pytest.raises(ValueError, match="while"):
        passes.count(looped, 8 * 32)
