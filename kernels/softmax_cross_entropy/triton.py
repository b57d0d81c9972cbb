"""Softmax cross-entropy kernels for GPUs through the Pallas Triton lowering.

Triton does not mask edge blocks: every load and store past the array is masked
explicitly (plgpu.load/store mask=...), which is also what keeps the GPU from reading
the next row or past the buffer. The loaded values of masked entries are then
replaced by jnp.where inside the block math, which is what makes them correct.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.softmax_cross_entropy.common import (
    CrossEntropyBlockSizes,
    cost_estimate,
    finish,
    grad_tile,
    init_state,
    int_label_step,
    prob_label_step,
)


def default_block_sizes(n: int, v: int) -> CrossEntropyBlockSizes:
    # Triton tensors are powers of two. A tile of <= 4096 f32 elements keeps each
    # live [block_n, block_v] temporary at <= 32 registers per thread with 4
    # warps; block_v up to 2048 keeps the loads long and contiguous. Not measured
    # on a GPU yet.
    block_v = min(_common.next_power_of_two(v), 2048)
    block_n = max(1, min(_common.next_power_of_two(n), 4096 // block_v))
    return CrossEntropyBlockSizes(block_n=block_n, block_v=block_v, num_warps=4, num_stages=2)


def check_block_sizes(bs: CrossEntropyBlockSizes, n: int, v: int) -> None:
    del n, v
    for field in ("block_n", "block_v"):
        value = getattr(bs, field)
        if not _common.is_power_of_two(value):
            raise ValueError(f"triton: {field}={value} must be a power of two")


def _fwd_kernel(
    logits_ref,
    labels_ref,
    where_ref,
    *out_refs,
    n,
    v,
    block_n,
    block_v,
    label_smoothing,
    z_loss,
    prob_labels,
    vocab_shard,
):
    """Rows [block_n] per program over grid (cdiv(N, block_n),); in-kernel loop over
    cdiv(V, block_v) vocab blocks of logits_ref [block_n, V] (and labels_ref [block_n, V]
    for probability labels); out_refs: finish's outputs, [block_n] each."""
    rows = pl.program_id(0) * block_n + jnp.arange(block_n)
    row_ok = rows < n  # [block_n]
    row_on = (plgpu.load(where_ref, mask=row_ok, other=0) != 0)[:, None]
    label = None if prob_labels else plgpu.load(labels_ref, mask=row_ok, other=0)[:, None]

    def body(j, state):
        start = j * block_v
        cols = (start + jnp.arange(block_v))[None, :]  # [1, block_v]
        valid = row_ok[:, None] & (cols < v)
        block = (slice(None), pl.ds(start, block_v))
        x = plgpu.load(logits_ref.at[block], mask=valid, other=0.0).astype(jnp.float32)
        if prob_labels:
            t = plgpu.load(labels_ref.at[block], mask=valid, other=0.0).astype(jnp.float32)
            return prob_label_step(state, x, t, valid)
        num_prev = start.astype(jnp.float32)
        return int_label_step(state, x, valid, cols, label, num_prev, label_smoothing=label_smoothing)

    state = lax.fori_loop(0, pl.cdiv(v, block_v), body, init_state((block_n, 1)))
    outs = finish(
        state,
        label,
        row_on,
        v=v,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
        vocab_shard=vocab_shard,
    )
    for ref, value in zip(out_refs, outs, strict=True):
        plgpu.store(ref, value.reshape(block_n), mask=row_ok)


def _bwd_kernel(
    logits_ref,
    labels_ref,
    where_ref,
    row_max_ref,
    log_sum_ref,
    g_ref,
    *refs,
    n,
    v,
    block_n,
    block_v,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
    prob_labels,
):
    """One [block_n, block_v] tile per program over grid (cdiv(N, block_n), cdiv(V, block_v));
    per-row inputs are [block_n] blocks; refs = (label_sum_ref, dlogits_ref) or (dlogits_ref,)."""
    *label_sum_ref, dlogits_ref = refs
    rows = pl.program_id(0) * block_n + jnp.arange(block_n)
    cols = (pl.program_id(1) * block_v + jnp.arange(block_v))[None, :]
    row_ok = rows < n
    valid = row_ok[:, None] & (cols < v)

    def row_load(ref, other):
        return plgpu.load(ref, mask=row_ok, other=other)[:, None]

    x = plgpu.load(logits_ref, mask=valid, other=0.0).astype(jnp.float32)
    if prob_labels:
        label_or_t = plgpu.load(labels_ref, mask=valid, other=0.0).astype(jnp.float32)
        label_sum = row_load(label_sum_ref[0], 0.0)
    else:
        label_or_t, label_sum = row_load(labels_ref, 0), None
    d = grad_tile(
        x,
        cols,
        row_load(row_max_ref, 0.0),
        row_load(log_sum_ref, 0.0),
        row_load(g_ref, 0.0),
        row_load(where_ref, 0) != 0,
        label_or_t,
        label_sum,
        v=v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    plgpu.store(dlogits_ref, d.astype(dlogits_ref.dtype), mask=valid)


def fwd(logits, labels, where, *, interpret, block_sizes, label_smoothing, z_loss, vocab_shard):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "triton")
    prob_labels = labels.ndim == 2
    row_spec = pl.BlockSpec((bs.block_n,), lambda i: (i,))
    full_rows = pl.BlockSpec((bs.block_n, v), lambda i: (i, 0))
    kernel = functools.partial(
        _fwd_kernel,
        n=n,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
        vocab_shard=vocab_shard,
    )
    out = _common.out_struct((n,), jnp.float32)
    num_out = 4 if prob_labels or vocab_shard else 3
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n),),
        in_specs=[full_rows, full_rows if prob_labels else row_spec, row_spec],
        out_specs=[row_spec] * num_out,
        out_shape=[out] * num_out,
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost_estimate(logits, labels, backward=False),
        interpret=interpret,
        name="fusedvjp_xent_fwd",
    )(logits, labels, where)
    return tuple(outs) if vocab_shard else (outs[0], tuple(outs[1:]))


def bwd(
    logits,
    labels,
    where,
    row_max,
    log_sum,
    g,
    *label_sum,
    interpret,
    block_sizes,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "triton")
    prob_labels = labels.ndim == 2
    tile = pl.BlockSpec((bs.block_n, bs.block_v), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((bs.block_n,), lambda i, j: (i,))
    kernel = functools.partial(
        _bwd_kernel,
        n=n,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(v, bs.block_v)),
        in_specs=[tile, tile if prob_labels else row_spec] + [row_spec] * (4 + len(label_sum)),
        out_specs=tile,
        out_shape=_common.out_struct((n, v), logits.dtype),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost_estimate(logits, labels, backward=True),
        interpret=interpret,
        name="fusedvjp_xent_bwd",
    )(logits, labels, where, row_max, log_sum, g, *label_sum)
