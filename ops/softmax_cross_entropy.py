"""Softmax cross-entropy (optax semantics) with a hand-written VJP.

Per row of logits ``x`` (length V) with target distribution ``t``::

    lse  = log sum_j exp(x_j)               p = softmax(x) = exp(x - lse)
    loss = -sum_j t_j log p_j = lse * sum_j t_j - sum_j t_j x_j

The Jacobian of ``loss`` w.r.t. ``x`` is one row: ``d loss / d x_k = p_k sum_j t_j - t_k``,
so the VJP is ``g * (p * sum(t) - t)`` -- for a distribution (sum t = 1) the seed's
``p - y``. Nothing V x V (the softmax Jacobian ``diag(p) - p p^T``) is ever formed: the
loss collapses it. The residual is the row's logsumexp in two f32 parts,
``lse = m + log_s`` with ``m = max_j x_j`` and ``log_s = log sum_j exp(x_j - m)``: with it
the backward recomputes ``p = exp((x - m) - log_s)`` (and ``log p``, for the labels'
gradient) from the logits it reads anyway, so no [N, V] probability tensor is kept
between the passes (two parts, not one f32 ``lse``: why in the docstring of
``kernels/softmax_cross_entropy``). Probability labels add ``sum_j t_j`` per row to the residual: the forward sums it anyway,
and the backward would otherwise read the [N, V] labels twice.

Integer labels: ``t = (1 - a) onehot(y) + a / V`` (label smoothing ``a``), in closed form
``loss = lse - (1 - a) x_y - (a / V) sum_j x_j``. The z-loss ``s * lse**2`` (PaLM/T5X) adds
``2 s lse p`` to the gradient (``d lse / d x = p``). Labels of any integer dtype become
int32 indices in one place (``kernels._common.class_indices``), checked against V before
any narrowing, and numpy / Python labels before ``jnp.asarray`` could wrap them. With a
per-class ``where`` (mask ``c``, K unmasked classes in the row) the masked classes leave
the softmax and the smoothing: ``t = (1 - a) onehot(y) + (a / K) c``, computed as the
unsmoothed loss plus the linear ``a (x_y - mean_c x)``.

Conventions (the README's semantics table says them for users): ``where=False`` rows have
loss 0 and gradient 0 whatever they hold (NaN, ``inf``). A label outside [0, V) on a row
that counts gives NaN loss and a NaN gradient row (never a silently wrong number), and so
does a counted row holding ``+inf`` or NaN (the softmax of ``+inf`` is undefined: NaN,
not a guess). ``-inf`` logits (a masked vocabulary) have ``p = 0`` and gradient ``-t`` (0
unless they carry target mass, in which case the loss is +inf); a term with ``t_j = 0``
contributes 0 even where ``x_j = -inf`` (``0 * log 0 = 0``); a row that is all ``-inf``
has no softmax: NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fusedvjp.kernels._common import class_indices
from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import (
    check_float,
    check_static_float,
    compute_dtype,
    resolve_impl,
    reverse_mode_only,
    run_kernel,
)


# --- the losses, written around the row max --------------------------------------------------


def _split_logsumexp(x):
    """(m, log_s) [...] each, with logsumexp(x) = m + log_s: the residual.

    ``m`` is the row max, or 0 on a row that is all ``-inf`` (as in ``jax.nn.logsumexp``),
    so such a row gives ``log_s = -inf`` and no ``-inf - -inf``. A row holding ``+inf`` or
    NaN keeps its ``m`` (``+inf`` / NaN): then ``x - m`` is NaN somewhere, ``log_s`` is
    NaN, and so are the row's loss and every entry of its gradient (which all read
    ``log_s``) -- the documented rule, on every path.
    """
    m = jnp.max(x, axis=-1, initial=-jnp.inf)  # -inf for V = 0: log_s = log 0 = -inf
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    return m, jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1))


def _counted_rows(x, where):
    """(x with uncounted rows zeroed, where as a [...] bool array).

    The first ``where`` of the double-``where``: a ``where=False`` row may hold NaN or
    ``inf`` (padding masked additively with ``-inf``), and a NaN that enters the loss's
    computation reaches its gradient even when a later ``where`` discards the loss
    (``0 * NaN = NaN`` in the backward of the discarded branch). Zeroing the row first
    keeps the forward finite, and the ``where``'s transpose gives the row a 0 cotangent.
    """
    counted = jnp.ones(x.shape[:-1], bool) if where is None else where
    return jnp.where(counted[..., None], x, 0.0), counted


def _integer_label_loss(x, labels, where, label_smoothing, z_loss):
    """x [..., V] (f32, or f64) -> (loss [...], residual (m, log_s)) in x's dtype.

    ``lse - (1 - a) x_y - (a / V) sum_j x_j`` written as
    ``log_s + (1 - a) (m - x_y) + (a / V) sum_j (m - x_j)``: no two numbers of size |x|
    are subtracted, so the loss stays exact at |x| ~ 1e4 (plain ``lse - x_y`` in f32 loses
    ~5e-4 there).
    """
    v = x.shape[-1]
    labels = class_indices(labels, v)  # any integer dtype; -1 for a label outside [0, V)
    x, counted = _counted_rows(x, where)
    m, log_s = _split_logsumexp(x)
    valid = labels >= 0
    # x_y as a masked row sum rather than a gather: exact (one nonzero term), and a sum
    # over a vocabulary split across devices partitions into a psum of [...] vectors,
    # where a gather from a split axis has no sharding rule. No class (V = 0) sums to 0.
    label_logit = jnp.sum(jnp.where(jnp.arange(v) == labels[..., None], x, 0.0), axis=-1)
    loss = log_s + (1.0 - label_smoothing) * (m - label_logit)
    if label_smoothing:
        loss = loss + (label_smoothing / v) * jnp.sum(m[..., None] - x, axis=-1)
    if z_loss:
        loss = loss + z_loss * (m + log_s) ** 2
    # An out-of-range label on a counted row poisons the loss *and* its gradient with NaN;
    # the multiplication is deliberate (it is the NaN we want), not a mask. (ones_like, not
    # a Python 1.0: jax 0.11.2 cannot type ``x * where(c, 1.0, nan)`` under vmap of an
    # axis split over an explicit mesh that is not set.)
    loss = loss * jnp.where(valid | ~counted, jnp.ones_like(loss), jnp.nan)
    return jnp.where(counted, loss, 0.0), (m, log_s)


def _probability_label_loss(x, t, where):
    """x, t [..., V] (f32, or f64) -> (loss [...], residual (m, log_s, sum_j t_j)); ``0 log 0 = 0``.

    ``sum_j t_j`` joins the residual because the gradient ``p * sum(t) - t`` needs it and
    the forward sums it anyway: the backward then reads the labels once, not twice.
    """
    x, counted = _counted_rows(x, where)
    t, _ = _counted_rows(t, where)
    residual = _split_logsumexp(x)
    loss = -jnp.sum(t * _zero_where_no_mass(_log_softmax_from(x, residual), t), axis=-1)
    return jnp.where(counted, loss, 0.0), (*residual, jnp.sum(t, axis=-1))


def _log_softmax_from(x, residual):
    """log p = (x - m) - log_s, [..., V], from the residual (never x - a rounded lse)."""
    m, log_s = residual[:2]
    return (x - m[..., None]) - log_s[..., None]


def _zero_where_no_mass(logp, t):
    """0 where log p is -inf and t is 0, so that ``t * log p`` is 0 there (0 log 0 = 0)."""
    return jnp.where(jnp.isneginf(logp) & (t == 0), 0.0, logp)


# --- xla references (the impl="xla" path; JAX's autodiff differentiates them) -------------


def softmax_cross_entropy_with_integer_labels_reference(
    logits, labels, *, where=None, label_smoothing=0.0, z_loss=0.0
):
    """Equivalent to: ``optax.softmax_cross_entropy_with_integer_labels`` (+ smoothing, z-loss),
    over the last axis, ``where`` per row."""
    x = logits.astype(compute_dtype(logits.dtype))
    loss, _ = _integer_label_loss(x, labels, where, label_smoothing, z_loss)
    return loss.astype(logits.dtype)


def softmax_cross_entropy_reference(logits, labels, *, where=None):
    """Equivalent to: ``optax.softmax_cross_entropy(logits, labels)`` over the last axis,
    ``where`` per row."""
    ct = compute_dtype(logits.dtype, labels.dtype)
    loss, _ = _probability_label_loss(logits.astype(ct), labels.astype(ct), where)
    return loss.astype(logits.dtype)


# --- under sharding (ops/_sharding.py): rows and the vocabulary -----------------------------
#
# Rows (m) split: every row is independent, nothing crosses devices. The vocabulary (v)
# split (vocabulary-parallel logits): each device reduces its slice of every row to a
# few numbers -- its max and sum of exponentials, the label's logit when the label falls
# in its slice, and the sums the smoothing or probability-label terms need -- and only
# those [N] vectors are all-reduced (one pmax and a few psums): never the [N, V] logits.
# The merged (row max, log-sum) is the residual, so the backward is local: each device
# writes its slice of dlogits from its slice of logits.


def _vocab_offset(assign, v_local: int):
    """The first global class of this device's slice, and the number of slices."""
    axes = _sharding.axes_of(assign, ("v",))
    return jax.lax.axis_index(axes) * v_local, jax.lax.psum(1, axes)


def _merge_row_stats(m, log_s, axes):
    """Per-slice (m, log_s) -> the row's (m, log_s): logsumexp = m + log_s over all slices.

    A slice that is all -inf reports m = 0 and log_s = -inf; it must not lift the shift
    (its 0 could exceed every real logit and underflow the others' exp), so it takes
    part as -inf. +inf or NaN in a slice reaches m or log_s and makes the row NaN.
    """
    # The shift is held constant under autodiff (impl="xla" with axis_name=): the
    # logsumexp does not depend on it, and pmax has no derivative.
    big = jax.lax.pmax(jax.lax.stop_gradient(jnp.where(jnp.isneginf(log_s), -jnp.inf, m)), axes)
    shift = jnp.where(jnp.isneginf(big), 0.0, big)
    return shift, jnp.log(jax.lax.psum(jnp.exp((m - shift) + log_s), axes))


def _slice_logsumexp(x):
    """:func:`_split_logsumexp` of one vocabulary slice. A slice that is all -inf is an
    ordinary case here (its classes masked), and the merge gives it no weight; its
    ``log_s = log 0`` gets a 0 gradient under autodiff (``impl="xla"`` with
    ``axis_name=``), not 0/0. A NaN in the slice still reaches ``log_s``."""
    m = jnp.max(x, axis=-1, initial=-jnp.inf)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    s = jnp.sum(jnp.exp(x - m[..., None]), axis=-1)
    return m, jnp.where(s == 0, -jnp.inf, jnp.log(jnp.where(s == 0, 1.0, s)))


def _int_slice_stats_jnp(logits, labels_here, where, *, label_smoothing):
    """The kernels' vocab_shard statistics for one slice, in jnp."""
    x, counted = _counted_rows(logits.astype(compute_dtype(logits.dtype)), where)
    m, log_s = _slice_logsumexp(x)
    here = (labels_here >= 0) & (labels_here < x.shape[-1])
    picked = jnp.take_along_axis(x, jnp.where(here, labels_here, 0)[..., None], axis=-1)[..., 0]
    logit_sum = jnp.sum(x, axis=-1) if label_smoothing else jnp.zeros_like(m)
    return m, log_s, jnp.where(here & counted, picked, 0.0), logit_sum


def _prob_slice_stats_jnp(logits, t, where):
    ct = compute_dtype(logits.dtype, t.dtype)
    x, counted = _counted_rows(logits.astype(ct), where)
    t, _ = _counted_rows(t.astype(ct), where)
    m, log_s = _slice_logsumexp(x)
    # sum t and sum t x with 0 (-inf) = 0, written so that autodiff (impl="xla" with
    # axis_name=) gives d loss / d t_j = lse - x_j = -log p_j, and 0 where the
    # reference's 0 log 0 = 0 holds (t_j = 0 at x_j = -inf): there t_j leaves both sums.
    no_mass = jnp.isneginf(x) & (t == 0)
    return (m, log_s, jnp.sum(jnp.where(no_mass, 0.0, t), axis=-1),
            jnp.sum(t * jnp.where(no_mass, 0.0, x), axis=-1))


def _int_forward_local(assign, fn, is_kernel, *, label_smoothing, z_loss):
    if "v" not in assign:
        return fn
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    axes = _sharding.axes_of(assign, ("v",))

    def local(logits, labels, where):
        v_local = logits.shape[-1]
        offset, slices = _vocab_offset(assign, v_local)
        v = v_local * slices
        here = labels - offset
        if is_kernel:
            m, log_s, picked, logit_sum = kernels.softmax_cross_entropy_fwd(
                logits, here, where, label_smoothing=label_smoothing, vocab_shard=True)
        else:
            m, log_s, picked, logit_sum = _int_slice_stats_jnp(logits, here, where, label_smoothing=label_smoothing)
        shift, log_s = _merge_row_stats(m, log_s, axes)
        # As in _integer_label_loss, around the shift: log_s + (1-a)(m - x_y) + (a/V) sum (m - x_j).
        loss = log_s
        if label_smoothing < 1:
            loss = loss + (1.0 - label_smoothing) * (shift - jax.lax.psum(picked, axes))
        if label_smoothing:
            loss = loss + (label_smoothing / v) * (v * shift - jax.lax.psum(logit_sum, axes))
        if z_loss:
            loss = loss + z_loss * (shift + log_s) ** 2
        valid = (labels >= 0) & (labels < v)
        # A product, as in _integer_label_loss: under autodiff (impl="xla" with
        # axis_name=) the NaN reaches the row's gradient too.
        loss = loss * jnp.where(where & ~valid, jnp.nan, jnp.ones_like(loss))
        return jnp.where(where, loss, 0.0), (shift, log_s)

    return local


def _int_backward_local(assign, fn, is_kernel, *, label_smoothing, z_loss):
    if "v" not in assign:
        return fn
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    def local(logits, labels, where, m, log_s, g):
        v_local = logits.shape[-1]
        offset, slices = _vocab_offset(assign, v_local)
        v = v_local * slices
        # The residual is the whole row's; a label in another slice matches no column
        # here. A label outside [0, V) makes the row NaN through g (where-False rows
        # still give 0).
        g = jnp.where((labels >= 0) & (labels < v), g, jnp.nan)
        here = labels - offset
        if is_kernel:
            return kernels.softmax_cross_entropy_bwd(
                logits, here, where, (m, log_s), g, label_smoothing=label_smoothing, z_loss=z_loss,
                num_classes=v, check_labels=False)
        x = logits.astype(m.dtype)
        p = jnp.exp(_log_softmax_from(x, (m, log_s)))
        t = jnp.where(jnp.arange(v_local)[None, :] == here[:, None], 1.0 - label_smoothing, 0.0) + label_smoothing / v
        d = p * (1.0 + 2.0 * z_loss * (m + log_s)[:, None]) - t
        return jnp.where(where[:, None], g.astype(x.dtype)[:, None] * d, 0.0).astype(logits.dtype)

    return local


def _prob_forward_local(assign, fn, is_kernel):
    if "v" not in assign:
        return fn
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    axes = _sharding.axes_of(assign, ("v",))

    def local(logits, labels, where):
        if is_kernel:
            m, log_s, label_sum, label_dot = kernels.softmax_cross_entropy_fwd(logits, labels, where, vocab_shard=True)
        else:
            m, log_s, label_sum, label_dot = _prob_slice_stats_jnp(logits, labels, where)
        shift, log_s = _merge_row_stats(m, log_s, axes)
        label_sum = jax.lax.psum(label_sum, axes)
        # lse sum(t) - sum(t x) = sum(t) log_s + (sum(t) m - sum(t x)).
        loss = label_sum * log_s + (label_sum * shift - jax.lax.psum(label_dot, axes))
        return jnp.where(where, loss, 0.0), (shift, log_s, label_sum)

    return local


def _int_layouts(label_smoothing, z_loss):
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    forward = _sharding.Layout(("m v", "m", "m"), ("m", "m", "m"),
                               local=functools.partial(_int_forward_local, **options))
    backward = _sharding.Layout(("m v", "m", "m", "m", "m", "m"), ("m v",),
                                local=functools.partial(_int_backward_local, **options))
    return forward, backward


def _manual(vocab_axes):
    """The vocabulary split the caller made in its shard_map (``axis_name=``), or None."""
    return None if vocab_axes is None else {"v": vocab_axes}


def vocab_parallel_integer_loss(x, labels, where, label_smoothing, z_loss, axes):
    """The ``impl="xla"`` path under ``axis_name=``: x [..., V_local] is this device's
    slice of the vocabulary along ``axes``, labels are global classes -> loss [...] in
    x's compute dtype; the slice statistics merged by pmax/psum, in plain jnp,
    differentiated by JAX."""
    v = x.shape[-1] * _sharding.axes_size(axes)
    labels = class_indices(labels, v)  # global classes: -1 outside [0, V), any integer dtype
    where = jnp.ones(labels.shape, bool) if where is None else where
    local = _int_forward_local({"v": axes}, None, False, label_smoothing=label_smoothing, z_loss=z_loss)
    return local(x, labels, where)[0]


def _vocab_axes(axis_name, axis, where, logits, op_name):
    """``axis_name=`` checked: one class axis, and no per-class ``where`` (its rows' "no
    class left" would need every slice)."""
    axes = _sharding.manual_axes(axis_name, op_name)
    if axes is None:
        return None
    if not isinstance(axis, int) and len(axis) != 1:
        raise ValueError(f"{op_name}: axis_name= needs one class axis (the one split over {axes}), got axis={axis!r}")
    if where is not None and jnp.ndim(where) == logits.ndim:
        raise ValueError(f"{op_name}: axis_name= takes a per-row where (of the labels' shape), not a per-class mask "
                         f"of shape {jnp.shape(where)}; give masked classes a -inf logit instead")
    return axes


_PROB_FORWARD_LAYOUT = _sharding.Layout(("m v", "m v", "m"), ("m", "m", "m", "m"), local=_prob_forward_local)
# Given the whole row's residual, dlogits = g (p sum(t) - t) is elementwise: a vocabulary
# slice needs nothing from the others.
_PROB_BACKWARD_LAYOUT = _sharding.Layout(("m v", "m v", "m", "m", "m", "m", "m"), ("m v",))


# --- integer labels: custom_vjp ------------------------------------------------------------


def _int_loss_jnp(logits, labels, where, *, label_smoothing, z_loss):
    x = logits.astype(compute_dtype(logits.dtype))
    return _integer_label_loss(x, labels, where, label_smoothing, z_loss)


def _int_forward(logits, labels, where, label_smoothing, z_loss, impl, vocab_axes, return_residuals):
    """logits [N, V], labels int32 [N], where bool [N] -> loss [N] (+ residuals)."""
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    loss, row_stats = run_kernel(
        impl,
        functools.partial(kernels.softmax_cross_entropy_fwd, **options),
        functools.partial(_int_loss_jnp, **options),
        (logits, labels, where),
        "softmax_cross_entropy_with_integer_labels",
        _int_layouts(label_smoothing, z_loss)[0],
        _manual(vocab_axes),
    )
    if return_residuals:
        return loss, (logits, labels, where, tuple(row_stats))
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _int_xent(logits, labels, where, label_smoothing, z_loss, impl, vocab_axes):
    return _int_forward(logits, labels, where, label_smoothing, z_loss, impl, vocab_axes, return_residuals=False)


def _int_xent_fwd(logits, labels, where, label_smoothing, z_loss, impl, vocab_axes):
    return _int_forward(logits, labels, where, label_smoothing, z_loss, impl, vocab_axes, return_residuals=True)


def _int_grad_jnp(logits, labels, where, row_stats, g, *, label_smoothing, z_loss):
    x = logits.astype(row_stats[0].dtype)
    v = x.shape[-1]
    p = jnp.exp(_log_softmax_from(x, row_stats))
    # t = (1 - a) onehot(y) + a/V; an out-of-range y matches no column.
    onehot = jnp.arange(v)[None, :] == labels[:, None]
    t = jnp.where(onehot, 1.0 - label_smoothing, 0.0) + label_smoothing / v
    # z-loss: d (s lse^2) = 2 s lse p; lse = m + log_s rounds by 2**-24 relative, harmless.
    lse = row_stats[0] + row_stats[1]
    dx = p * (1.0 + 2.0 * z_loss * lse[:, None]) - t
    valid = (labels >= 0) & (labels < v)
    dx = jnp.where(valid[:, None], dx, jnp.nan)
    return jnp.where(where[:, None], g.astype(x.dtype)[:, None] * dx, 0.0).astype(logits.dtype)


def _int_xent_bwd(label_smoothing, z_loss, impl, vocab_axes, residuals, g):
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    dlogits = run_kernel(
        impl,
        functools.partial(kernels.softmax_cross_entropy_bwd, **options),
        functools.partial(_int_grad_jnp, **options),
        (*residuals, g),
        "softmax_cross_entropy_with_integer_labels",
        _int_layouts(label_smoothing, z_loss)[1],
        _manual(vocab_axes),
    )
    return _sharding.match_cotangent(dlogits, residuals[0]), None, None


_int_xent.defvjp(_int_xent_fwd, _int_xent_bwd)


# --- probability labels: custom_vjp --------------------------------------------------------


def _prob_loss_jnp(logits, labels, where):
    ct = compute_dtype(logits.dtype, labels.dtype)
    return _probability_label_loss(logits.astype(ct), labels.astype(ct), where)


def _prob_forward(logits, labels, where, impl, vocab_axes, return_residuals):
    """logits [N, V], labels float [N, V], where bool [N] -> loss [N] (+ residuals)."""
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    loss, row_stats = run_kernel(
        impl, kernels.softmax_cross_entropy_fwd, _prob_loss_jnp, (logits, labels, where), "softmax_cross_entropy",
        _PROB_FORWARD_LAYOUT, _manual(vocab_axes),
    )
    if return_residuals:
        return loss, (logits, labels, where, tuple(row_stats))
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _prob_xent(logits, labels, where, impl, vocab_axes):
    return _prob_forward(logits, labels, where, impl, vocab_axes, return_residuals=False)


def _prob_xent_fwd(logits, labels, where, impl, vocab_axes):
    return _prob_forward(logits, labels, where, impl, vocab_axes, return_residuals=True)


def _prob_grad_jnp(logits, labels, where, row_stats, g):
    ct = row_stats[0].dtype
    x, t = logits.astype(ct), labels.astype(ct)
    p = jnp.exp(_log_softmax_from(x, row_stats))
    label_sum = row_stats[2]
    dx = g.astype(ct)[:, None] * (p * label_sum[:, None] - t)
    return jnp.where(where[:, None], dx, 0.0).astype(logits.dtype)


def _prob_xent_bwd(impl, vocab_axes, residuals, g):
    from fusedvjp.kernels import softmax_cross_entropy as kernels

    logits, labels, where, row_stats = residuals
    dlogits = run_kernel(
        impl, kernels.softmax_cross_entropy_bwd, _prob_grad_jnp, (*residuals, g), "softmax_cross_entropy",
        _PROB_BACKWARD_LAYOUT, _manual(vocab_axes),
    )
    # d loss / d t_j = -log p_j (= -((x_j - m) - log_s)). XLA fuses this into one
    # elementwise pass and removes it entirely when the labels need no gradient (the usual
    # case).
    ct = row_stats[0].dtype
    logp = _zero_where_no_mass(_log_softmax_from(logits.astype(ct), row_stats), labels.astype(ct))
    dlabels = jnp.where(where[:, None], -g.astype(ct)[:, None] * logp, 0.0).astype(labels.dtype)
    return _sharding.match_cotangent(dlogits, logits), _sharding.match_cotangent(dlabels, labels), None


_prob_xent.defvjp(_prob_xent_fwd, _prob_xent_bwd)


# --- public API: optax's arguments (axis, a per-row or per-class where) -------------------


def _check_logits(logits):
    check_float("logits", logits)
    if logits.ndim < 1:
        raise ValueError(f"logits must have at least one (class) axis, got a scalar of shape {logits.shape}")


def _class_axes(axis, logits_shape) -> tuple[int, ...]:
    """``axis`` (an int or a tuple of ints, optax's meaning) as non-negative axes, in order."""
    ndim = len(logits_shape)
    axes = (axis,) if isinstance(axis, int) and not isinstance(axis, bool) else axis
    if not isinstance(axes, tuple) or not axes or not all(
        isinstance(a, int) and not isinstance(a, bool) for a in axes
    ):
        raise TypeError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"axis {axis!r} is out of range for logits of shape {logits_shape}")
    axes = tuple(a % ndim for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {axis!r} repeats an axis (logits shape {logits_shape})")
    return axes


def _classes_last(x, axes):
    """x [...] -> [batch..., V]: the class axes moved to the end (in ``axes`` order) and
    flattened into one; a no-op for the usual ``axis=-1``."""
    batch_axes = tuple(i for i in range(x.ndim) if i not in axes)
    if axes != (x.ndim - 1,):
        x = jnp.transpose(x, batch_axes + axes)
    return x.reshape(*(x.shape[:len(batch_axes)]), math.prod(x.shape[len(batch_axes):]))


def _masks(where, logits_shape, axes):
    """optax's ``where`` -> (per-row bool [batch...] or None, per-class bool [batch..., V] or None).

    The rank tells the two forms apart: ``where.ndim == logits.ndim`` is a per-class mask
    (broadcast against the logits, optax's meaning: masked classes leave the softmax),
    ``where.ndim == logits.ndim - len(axes)`` a per-row mask (broadcast against the batch
    shape). A row with no class left counts as ``where=False``.
    """
    if where is None:
        return None, None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {where.dtype} (shape {where.shape})")
    batch_shape = tuple(d for i, d in enumerate(logits_shape) if i not in axes)
    target = logits_shape if where.ndim == len(logits_shape) else batch_shape
    try:
        where = jnp.broadcast_to(where, target)
    except ValueError:
        raise ValueError(
            f"where must have (or broadcast to) the batch shape {batch_shape} (a row mask) or the logits' "
            f"shape {logits_shape} (a class mask), got {where.shape}"
        ) from None
    if where.ndim == len(batch_shape):
        return where, None
    class_mask = _classes_last(where, axes)
    return jnp.any(class_mask, axis=-1), class_mask


def _prepare(logits, labels, axis, where, *, labels_like_logits: bool):
    """Checks, moves the class axes last, applies a class mask: -> (logits [batch..., V],
    labels, row_where [batch...] or None, class_mask [batch..., V] or None)."""
    axes = _class_axes(axis, logits.shape)
    row_where, class_mask = _masks(where, logits.shape, axes)
    logits2 = _classes_last(logits, axes)
    if labels_like_logits:
        if labels.shape != logits.shape:
            raise ValueError(f"labels must have the shape of logits {logits.shape}, got {labels.shape}")
        labels = _classes_last(labels, axes)
    elif labels.shape != logits2.shape[:-1]:
        raise ValueError(f"labels must have shape {logits2.shape[:-1]} (logits {logits.shape} without the class "
                         f"axes {axes}), got {labels.shape}")
    if class_mask is not None:
        # A masked class leaves the softmax (-inf logit: p = 0, gradient 0 through the
        # where) and, for probability labels, the sum.
        logits2 = jnp.where(class_mask, logits2, -jnp.inf)
        if labels_like_logits:
            labels = jnp.where(class_mask, labels, 0)
    return logits2, labels, row_where, class_mask


def label_array(labels) -> jax.Array:
    """``labels`` as a jax array, without letting ``jnp.asarray`` wrap a concrete label.

    Without x64, ``jnp.asarray`` narrows numpy / Python 64-bit integers to 32 bits:
    ``2**32 + 1`` would become 1, a valid class. A concrete label outside ``[0, 2**31)``
    cannot be a class index (V <= 2**31), so it becomes -1 first: the out-of-range NaN
    row, as under x64. Traced and jax arrays (already 32-bit without x64) pass through.
    """
    if isinstance(labels, jax.Array) or jax.config.jax_enable_x64:
        return jnp.asarray(labels)
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu" and labels.dtype.itemsize > 4:
        in_int32 = labels <= np.iinfo(np.int32).max
        if labels.dtype.kind == "i":
            in_int32 &= labels >= 0
        labels = np.where(in_int32, labels.astype(np.int32), np.int32(-1))  # astype wraps only what -1 replaces
    return jnp.asarray(labels)


@jax.custom_jvp
def _label_minus_mean_logit(x, labels, class_mask):
    """x [..., V] (masked classes -inf), labels int32 [...], class_mask bool [..., V] ->
    ``x_y - (1/K) sum_{j unmasked} x_j`` per row, K the row's count of unmasked classes.

    The smoothing of a class-masked row (see the public function). Written as
    ``(1/K) sum_{j unmasked} (x_y - x_j)``: differences of logits, so no two sums of size
    ``V |x|`` cancel. 0 on a row with no class left (K = 0: it does not count) and where
    ``x_y = -inf`` (a label on a masked class: the loss is +inf through its other term,
    and ``-inf`` here would make that ``inf - inf``). An unmasked ``-inf`` logit gives
    ``+inf`` (smoothing puts mass on it). Linear in x: the JVP's weights ``[j == y] - c_j / K``
    hold on every row, the ``x_y = -inf`` ones included.
    """
    k = jnp.sum(class_mask, axis=-1)
    label_logit = jnp.sum(jnp.where(jnp.arange(x.shape[-1]) == labels[..., None], x, 0.0), axis=-1)
    total = jnp.sum(jnp.where(class_mask, label_logit[..., None] - x, 0.0), axis=-1)
    keep = (k > 0) & ~jnp.isneginf(label_logit)
    return jnp.where(keep, total / jnp.maximum(k, 1).astype(x.dtype), 0.0)


@_label_minus_mean_logit.defjvp
def _label_minus_mean_logit_jvp(primals, tangents):
    x, labels, class_mask = primals
    k = jnp.maximum(jnp.sum(class_mask, axis=-1, keepdims=True), 1).astype(x.dtype)
    weights = (jnp.arange(x.shape[-1]) == labels[..., None]).astype(x.dtype) - class_mask / k
    weights = jnp.where(jnp.any(class_mask, axis=-1, keepdims=True), weights, 0.0)
    return _label_minus_mean_logit(*primals), jnp.sum(weights * tangents[0], axis=-1)


def check_ignore_index(ignore_index) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be None or a Python int, got {ignore_index!r:.80}")
    return int(ignore_index)


def ignored_rows(labels, ignore_index: int | None):
    """bool of the labels' shape: True where the label equals ``ignore_index``, compared
    without wrapping (-100 is no uint8 label), or None without ``ignore_index``."""
    if ignore_index is None:
        return None
    info = jnp.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == jnp.asarray(ignore_index, labels.dtype)


def row_weights(weight, labels_shape):
    """``weight`` as a float array of the labels' shape, or None."""
    if weight is None:
        return None
    weight = jnp.asarray(weight)
    check_float("weight", weight)
    try:
        return jnp.broadcast_to(weight, labels_shape)
    except ValueError:
        raise ValueError(f"weight must have (or broadcast to) the labels' shape {labels_shape}, "
                         f"got {weight.shape}") from None


def apply_row_weights(loss, where, weight):
    """Per-row losses times their weights (after the loss: the custom_vjp's cotangent
    becomes ``g * weight``). Uncounted rows stay 0, and give ``weight`` a 0 gradient,
    whatever their weight holds (NaN included)."""
    if weight is None:
        return loss
    return jnp.where(True if where is None else where, loss * weight.astype(loss.dtype), 0.0)


def _rows(logits, where):
    """[batch..., V] -> ([N, V], where bool [N])."""
    n = math.prod(logits.shape[:-1])
    where1 = jnp.ones((n,), bool) if where is None else where.reshape(n)
    return logits.reshape(n, logits.shape[-1]), where1


def softmax_cross_entropy_with_integer_labels(
    logits, labels, axis=-1, where=None, *, label_smoothing=0.0, z_loss=0.0, ignore_index=None, weight=None,
    axis_name=None, impl="auto",
):
    """Per-example softmax cross-entropy with integer labels, fused where possible.

    A drop-in for ``optax.softmax_cross_entropy_with_integer_labels`` (same positional
    arguments), with label smoothing, z-loss and a choice of implementation.

    Args:
      logits: floating logits, the classes along ``axis`` (may contain ``-inf`` for
        masked entries).
      labels: integer class indices in ``[0, V)`` (any integer dtype; numpy and Python
        integers are range-checked before conversion, so none wraps), of the logits' shape
        without the class axes; with a tuple ``axis`` an index is flat over the class axes
        in that order.
      axis: the class axis, or a tuple of them (optax's meaning).
      where: optional bool mask: of the labels' shape (per row; False rows get loss 0 and
        gradient 0) or of the logits' rank, broadcast against them (per class; masked
        classes leave the softmax and the smoothing, a row with none left counts as False).
      label_smoothing: ``a`` in ``[0, 1)``: target ``(1 - a) onehot + a / V``; with a
        per-class ``where``, ``(1 - a) onehot + a / K`` on the row's K unmasked classes
        (0 on the masked ones).
      z_loss: ``s >= 0``: adds ``s * logsumexp(logits)**2`` per example.
      ignore_index: None, or an int: rows whose label equals it count as ``where=False``
        (loss 0, gradient 0; ``-100`` for PyTorch's padding convention).
      weight: None, or float per-row weights of (or broadcast to) the labels' shape: each
        counted row's loss, and so its gradient, is scaled by its weight (differentiable;
        uncounted rows stay 0 whatever their weight).
      axis_name: inside ``shard_map``, the mesh axis name (or tuple of names) the
        vocabulary is split over: ``logits`` is this device's slice of the classes (the
        slices in axis-index order), ``labels`` are global class indices, and the op
        merges per-row statistics over ``axis_name`` (a pmax and a few psums of [N]
        vectors). One class axis; a per-row ``where`` only.
      impl: ``"auto"``, ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      losses of the labels' shape, in ``logits.dtype`` (computed in f32; f64 for f64
      logits on the xla and jnp paths). NaN on counted rows whose label is outside
      ``[0, V)`` (``ignore_index`` aside) or whose logits hold ``+inf`` or NaN (see the
      README's semantics table).

    Raises:
      TypeError / ValueError: non-float logits, non-integer labels, mismatched shapes, a
        bad ``axis`` or ``where``, out-of-range hyperparameters, unknown impl.
      NotImplementedError: ``impl="pallas"`` for a dtype the kernels do not take (f64).

    Equivalent to: ``optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis,
    where)`` for ``a = s = 0``, and in general ``weight * (-sum(t * log_softmax(logits), axis)
    + s * logsumexp(logits, axis)**2)`` on the counted rows, 0 elsewhere.
    """
    logits, labels = jnp.asarray(logits), label_array(labels)
    _check_logits(logits)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {labels.shape})")
    label_smoothing = check_static_float("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = check_static_float("z_loss", z_loss, 0.0, math.inf)
    ignored = ignored_rows(labels, check_ignore_index(ignore_index))
    weight = row_weights(weight, labels.shape)
    impl = resolve_impl(impl)
    vocab_axes = _vocab_axes(axis_name, axis, where, logits, "softmax_cross_entropy_with_integer_labels")
    logits2, labels, row_where, class_mask = _prepare(logits, labels, axis, where, labels_like_logits=False)
    if ignored is not None:
        # An ignored row counts as where=False (and leaves a class mask's smoothing).
        row_where = ~ignored if row_where is None else row_where & ~ignored
        class_mask = None if class_mask is None else class_mask & row_where[..., None]
    # Every impl reads int32 indices, -1 out of range: checked in a dtype that holds V and
    # the label (a uint8 label against V = 300, an int64 label >= 2**32 under x64). Under
    # axis_name the logits are one slice and V is the whole vocabulary's.
    v = logits2.shape[-1] * (1 if vocab_axes is None else _sharding.axes_size(vocab_axes))
    labels = class_indices(labels, v)
    # Smoothing with a class mask: masked classes left the softmax (log p = -inf there),
    # so the smoothing mass goes to the row's K unmasked classes, t = (1 - a) onehot(y) +
    # (a / K) c. Its loss lse - (1 - a) x_y - (a / K) sum_c x_j (+ s lse^2) is the
    # unsmoothed loss lse - x_y (+ s lse^2) plus a (x_y - mean_c x): the ops below run
    # unsmoothed and _label_minus_mean_logit adds the linear rest; its gradient
    # a (onehot - c / K) makes the sum's gradient p - t. (axis_name= takes no class mask.)
    spread = label_smoothing if class_mask is not None else 0.0
    ct = compute_dtype(logits.dtype)
    if impl == "xla" and vocab_axes is not None:
        loss = vocab_parallel_integer_loss(logits2.astype(ct), labels, row_where, label_smoothing, z_loss, vocab_axes)
    elif impl == "xla":
        loss, _ = _integer_label_loss(logits2.astype(ct), labels, row_where, label_smoothing - spread, z_loss)
    else:
        x, where1 = _rows(logits2, row_where)
        with reverse_mode_only("softmax_cross_entropy_with_integer_labels", impl):
            loss = _int_xent(x, labels.reshape(-1), where1, label_smoothing - spread, z_loss, impl, vocab_axes)
        loss = loss.reshape(labels.shape).astype(ct)
    if spread:
        loss = loss + spread * _label_minus_mean_logit(logits2.astype(ct), labels, class_mask)
    return apply_row_weights(loss, row_where, weight).astype(logits.dtype)


def softmax_cross_entropy(logits, labels, axis=-1, where=None, *, axis_name=None, impl="auto"):
    """Per-example softmax cross-entropy against a target distribution, fused where possible.

    A drop-in for ``optax.softmax_cross_entropy`` (same positional arguments).

    Args:
      logits: floating logits, the classes along ``axis`` (may contain ``-inf``).
      labels: floating target probabilities of the logits' shape (differentiable).
      axis: the class axis, or a tuple of them.
      where: optional bool mask, per row or per class as in
        :func:`softmax_cross_entropy_with_integer_labels` (a masked class also leaves
        the sum over the labels).
      axis_name: inside ``shard_map``, the mesh axis name (or tuple) the vocabulary is
        split over: ``logits`` and ``labels`` are this device's slice of the classes;
        per-row statistics are merged over ``axis_name`` (see
        :func:`softmax_cross_entropy_with_integer_labels`).
      impl: ``"auto"``, ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      losses of the logits' shape without the class axes, in ``logits.dtype`` (computed
      in f32; f64 for f64 inputs on the xla and jnp paths).

    Raises:
      TypeError / ValueError: non-float logits or labels, mismatched shapes, a bad
        ``axis`` or ``where``, unknown impl.
      NotImplementedError: ``impl="pallas"`` for a dtype the kernels do not take (f64).

    Equivalent to: ``optax.softmax_cross_entropy(logits, labels, axis, where)`` =
    ``-sum(labels * log_softmax(logits), axis)``, with ``0 * log 0 = 0``.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits(logits)
    check_float("labels", labels)
    impl = resolve_impl(impl)
    vocab_axes = _vocab_axes(axis_name, axis, where, logits, "softmax_cross_entropy")
    logits2, labels2, row_where, _ = _prepare(logits, labels, axis, where, labels_like_logits=True)
    if impl == "xla" and vocab_axes is None:
        return softmax_cross_entropy_reference(logits2, labels2, where=row_where)
    x, where1 = _rows(logits2, row_where)
    if impl == "xla":
        # The slice statistics merged over axis_name, in plain jnp, differentiated by JAX.
        loss = _prob_forward_local({"v": vocab_axes}, None, False)(x, labels2.reshape(x.shape), where1)[0]
    else:
        with reverse_mode_only("softmax_cross_entropy", impl):
            loss = _prob_xent(x, labels2.reshape(x.shape), where1, impl, vocab_axes)
    return loss.reshape(logits2.shape[:-1]).astype(logits.dtype)
