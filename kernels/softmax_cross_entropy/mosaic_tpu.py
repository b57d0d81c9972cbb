"""Softmax cross-entropy kernels for TPUs through Mosaic TPU.

Grid (row blocks, vocab blocks), vocab last. The forward carries the per-row state in
VMEM scratch across the "arbitrary" vocab axis and writes the loss and the residual
(row_max, log_sum) at its last step; the backward's tiles are independent ("parallel"
both ways). Per-row arrays travel as [N, 1] (block (block_n, 1): the last dim equals
the array's) and the launchers reshape them to [N].
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
    # TPU blocks: last two dims multiples of (8, 128) or the full dims. 128 x 2048
    # f32 is 1 MiB per live temporary: a few of them plus the double-buffered
    # input tiles fit the 16 MiB default scoped VMEM of v5e, and a step moves
    # enough bytes (0.5-1 MiB) to hide the per-step overhead. Not measured on a
    # TPU yet.
    block_n = n if n <= 128 else 128
    block_v = v if v <= 2048 else 2048
    return CrossEntropyBlockSizes(block_n=block_n, block_v=block_v)


def check_block_sizes(bs: CrossEntropyBlockSizes, n: int, v: int) -> None:
    if not (bs.block_n == n or bs.block_n % 8 == 0):
        raise ValueError(f"mosaic_tpu: block_n={bs.block_n} must be a multiple of 8 or equal N={n}")
    if not (bs.block_v == v or bs.block_v % 128 == 0):
        raise ValueError(f"mosaic_tpu: block_v={bs.block_v} must be a multiple of 128 or equal V={v}")


def _fwd_kernel(
    logits_ref,
    labels_ref,
    where_ref,
    *refs,
    v,
    block_n,
    block_v,
    label_smoothing,
    z_loss,
    prob_labels,
    vocab_shard,
):
    """Tile logits_ref [block_n, block_v] at grid (row block i, vocab block j); per-row
    refs [block_n, 1]: finish's outputs, then the scratch
    [block_n, 1] f32 that carries (max, sum, acc0, acc1) over j."""
    j = pl.program_id(1)
    *out_refs, m_ref, s_ref, acc0_ref, acc1_ref = refs
    state_refs = (m_ref, s_ref, acc0_ref, acc1_ref)

    @pl.when(j == 0)
    def _():
        for ref, init in zip(state_refs, init_state((block_n, 1))):
            ref[...] = init

    start = j * block_v
    cols = start + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
    valid = cols < v
    x = logits_ref[...].astype(jnp.float32)
    state = tuple(ref[...] for ref in state_refs)
    if prob_labels:
        state = prob_label_step(state, x, labels_ref[...].astype(jnp.float32), valid)
    else:
        num_prev = start.astype(jnp.float32)
        state = int_label_step(state, x, valid, cols, labels_ref[...], num_prev, label_smoothing=label_smoothing)
    for ref, value in zip(state_refs, state):
        ref[...] = value

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        label = None if prob_labels else labels_ref[...]
        outs = finish(
            state,
            label,
            where_ref[...] != 0,
            v=v,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            prob_labels=prob_labels,
            vocab_shard=vocab_shard,
        )
        for ref, value in zip(out_refs, outs, strict=True):
            ref[...] = value


def _bwd_kernel(
    logits_ref,
    labels_ref,
    where_ref,
    row_max_ref,
    log_sum_ref,
    g_ref,
    *refs,
    v,
    block_n,
    block_v,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
    prob_labels,
):
    """Tile [block_n, block_v] at grid (row block i, vocab block j); per-row refs [block_n, 1];
    refs = (label_sum_ref, dlogits_ref) or (dlogits_ref,)."""
    *label_sum_ref, dlogits_ref = refs
    cols = pl.program_id(1) * block_v + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
    if prob_labels:
        label_or_t, label_sum = labels_ref[...].astype(jnp.float32), label_sum_ref[0][...]
    else:
        label_or_t, label_sum = labels_ref[...], None
    d = grad_tile(
        logits_ref[...].astype(jnp.float32),
        cols,
        row_max_ref[...],
        log_sum_ref[...],
        g_ref[...],
        where_ref[...] != 0,
        label_or_t,
        label_sum,
        v=v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    dlogits_ref[...] = d.astype(dlogits_ref.dtype)


def _column(a):
    return a.reshape(a.shape[0], 1)


def fwd(logits, labels, where, *, interpret, block_sizes, label_smoothing, z_loss, vocab_shard):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "mosaic_tpu")
    prob_labels = labels.ndim == 2
    tile = pl.BlockSpec((bs.block_n, bs.block_v), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((bs.block_n, 1), lambda i, j: (i, 0))
    kernel = functools.partial(
        _fwd_kernel,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
        vocab_shard=vocab_shard,
    )
    out = _common.out_struct((n, 1), jnp.float32)
    num_out = 4 if prob_labels or vocab_shard else 3
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(v, bs.block_v)),
        in_specs=[tile, tile if prob_labels else row_spec, row_spec],
        out_specs=[row_spec] * num_out,
        out_shape=[out] * num_out,
        scratch_shapes=[pltpu.VMEM((bs.block_n, 1), jnp.float32) for _ in range(4)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost_estimate(logits, labels, backward=False),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_xent_fwd",
    )(logits, labels if prob_labels else _column(labels), _column(where))
    outs = [a.reshape(n) for a in outs]
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
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "mosaic_tpu")
    prob_labels = labels.ndim == 2
    tile = pl.BlockSpec((bs.block_n, bs.block_v), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((bs.block_n, 1), lambda i, j: (i, 0))
    kernel = functools.partial(
        _bwd_kernel,
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
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=cost_estimate(logits, labels, backward=True),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_xent_bwd",
    )(
        logits,
        labels if prob_labels else _column(labels),
        *map(_column, (where, row_max, log_sum, g, *label_sum)),
    )
