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
between the passes. Not one f32 ``lse``: its rounding, up to ``2**-24 |lse|`` (6e-4 at
``|x| ~ 1e4``), would be a relative error of every ``p``, while ``x - m`` is exact
(Sterbenz) wherever ``p`` is not negligible and ``log_s <= log V`` rounds by ~1e-6.
Probability labels add ``sum_j t_j`` per row to the residual: the forward sums it anyway,
and the backward would otherwise read the [N, V] labels twice.

Integer labels: ``t = (1 - a) onehot(y) + a / V`` (label smoothing ``a``), in closed form
``loss = lse - (1 - a) x_y - (a / V) sum_j x_j``. The z-loss ``s * lse**2`` (PaLM/T5X) adds
``2 s lse p`` to the gradient (``d lse / d x = p``).

Conventions: ``where=False`` rows have loss 0 and gradient 0. A label outside [0, V) on
a row that counts gives NaN loss and a NaN gradient row (never a silently wrong number).
``-inf`` logits (a masked vocabulary) have ``p = 0`` and gradient ``-t`` (0 unless they
carry target mass, in which case the loss is +inf); a term with ``t_j = 0`` contributes 0
even where ``x_j = -inf`` (``0 * log 0 = 0``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fusedvjp.ops._dispatch import check_float, check_static_float, resolve_impl, run_kernel, uses_kernels


# --- the losses, written around the row max --------------------------------------------------


def _split_logsumexp(x):
    """(m, log_s), f32 [...] each, with logsumexp(x) = m + log_s: the residual.

    ``m`` is the row max, or 0 where it is not finite (as in ``jax.nn.logsumexp``), so an
    all ``-inf`` row gives ``log_s = -inf`` and no ``-inf - -inf``.
    """
    m = jnp.max(x, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m, jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1))


def _integer_label_loss(x, labels, where, label_smoothing, z_loss):
    """f32 x [..., V] -> (loss f32 [...], residual (m, log_s)).

    ``lse - (1 - a) x_y - (a / V) sum_j x_j`` written as
    ``log_s + (1 - a) (m - x_y) + (a / V) sum_j (m - x_j)``: no two numbers of size |x|
    are subtracted, so the loss stays exact at |x| ~ 1e4 (plain ``lse - x_y`` in f32 loses
    ~5e-4 there).
    """
    v = x.shape[-1]
    m, log_s = _split_logsumexp(x)
    valid = (labels >= 0) & (labels < v)
    label_logit = jnp.take_along_axis(x, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss = log_s + (1.0 - label_smoothing) * (m - label_logit)
    if label_smoothing:
        loss = loss + (label_smoothing / v) * jnp.sum(m[..., None] - x, axis=-1)
    if z_loss:
        loss = loss + z_loss * (m + log_s) ** 2
    counted = jnp.ones(labels.shape, bool) if where is None else where
    # An out-of-range label on a counted row poisons the loss *and* its gradient with NaN;
    # the multiplication is deliberate (it is the NaN we want), not a mask.
    loss = loss * jnp.where(valid | ~counted, 1.0, jnp.nan)
    return jnp.where(counted, loss, 0.0), (m, log_s)


def _probability_label_loss(x, t, where):
    """f32 x, t [..., V] -> (loss f32 [...], residual (m, log_s, sum_j t_j)); ``0 log 0 = 0``.

    ``sum_j t_j`` joins the residual because the gradient ``p * sum(t) - t`` needs it and
    the forward sums it anyway: the backward then reads the labels once, not twice.
    """
    residual = _split_logsumexp(x)
    loss = -jnp.sum(t * _zero_where_no_mass(_log_softmax_from(x, residual), t), axis=-1)
    if where is not None:
        loss = jnp.where(where, loss, 0.0)
    return loss, (*residual, jnp.sum(t, axis=-1))


def _log_softmax_from(x, residual):
    """log p = (x - m) - log_s, [..., V] f32, from the residual (never x - a rounded lse)."""
    m, log_s = residual[:2]
    return (x - m[..., None]) - log_s[..., None]


def _zero_where_no_mass(logp, t):
    """0 where log p is -inf and t is 0, so that ``t * log p`` is 0 there (0 log 0 = 0)."""
    return jnp.where(jnp.isneginf(logp) & (t == 0), 0.0, logp)


# --- xla references (the impl="xla" path; JAX's autodiff differentiates them) -------------


def softmax_cross_entropy_with_integer_labels_reference(
    logits, labels, *, where=None, label_smoothing=0.0, z_loss=0.0
):
    """Equivalent to: ``optax.softmax_cross_entropy_with_integer_labels`` (+ smoothing, z-loss)."""
    loss, _ = _integer_label_loss(logits.astype(jnp.float32), labels, where, label_smoothing, z_loss)
    return loss.astype(logits.dtype)


def softmax_cross_entropy_reference(logits, labels, *, where=None):
    """Equivalent to: ``optax.softmax_cross_entropy(logits, labels)`` masked by ``where`` rows."""
    loss, _ = _probability_label_loss(logits.astype(jnp.float32), labels.astype(jnp.float32), where)
    return loss.astype(logits.dtype)


# --- integer labels: custom_vjp ------------------------------------------------------------


def _int_forward(logits, labels, where, label_smoothing, z_loss, impl, return_residuals):
    """logits [N, V], labels int32 [N], where bool [N] -> loss f32 [N] (+ residuals)."""

    def jnp_path():
        return _integer_label_loss(logits.astype(jnp.float32), labels, where, label_smoothing, z_loss)

    if uses_kernels(impl):
        from fusedvjp.kernels import softmax_cross_entropy as kernels

        kernel = functools.partial(
            kernels.softmax_cross_entropy_fwd, logits, labels, where,
            label_smoothing=label_smoothing, z_loss=z_loss,
        )
        loss, row_stats = run_kernel(impl, kernel, jnp_path, "softmax_cross_entropy_with_integer_labels")
    else:
        loss, row_stats = jnp_path()
    if return_residuals:
        return loss, (logits, labels, where, row_stats)
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _int_xent(logits, labels, where, label_smoothing, z_loss, impl):
    return _int_forward(logits, labels, where, label_smoothing, z_loss, impl, return_residuals=False)


def _int_xent_fwd(logits, labels, where, label_smoothing, z_loss, impl):
    return _int_forward(logits, labels, where, label_smoothing, z_loss, impl, return_residuals=True)


def _int_xent_bwd(label_smoothing, z_loss, impl, residuals, g):
    logits, labels, where, row_stats = residuals
    g = g.astype(jnp.float32)

    def jnp_path():
        x = logits.astype(jnp.float32)
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
        return jnp.where(where[:, None], g[:, None] * dx, 0.0).astype(logits.dtype)

    if uses_kernels(impl):
        from fusedvjp.kernels import softmax_cross_entropy as kernels

        kernel = functools.partial(
            kernels.softmax_cross_entropy_bwd, logits, labels, where, row_stats, g,
            label_smoothing=label_smoothing, z_loss=z_loss,
        )
        dlogits = run_kernel(impl, kernel, jnp_path, "softmax_cross_entropy_with_integer_labels")
    else:
        dlogits = jnp_path()
    return dlogits, None, None


_int_xent.defvjp(_int_xent_fwd, _int_xent_bwd)


# --- probability labels: custom_vjp --------------------------------------------------------


def _prob_forward(logits, labels, where, impl, return_residuals):
    """logits [N, V], labels float [N, V], where bool [N] -> loss f32 [N] (+ residuals)."""

    def jnp_path():
        return _probability_label_loss(logits.astype(jnp.float32), labels.astype(jnp.float32), where)

    if uses_kernels(impl):
        from fusedvjp.kernels import softmax_cross_entropy as kernels

        kernel = functools.partial(kernels.softmax_cross_entropy_fwd, logits, labels, where)
        loss, row_stats = run_kernel(impl, kernel, jnp_path, "softmax_cross_entropy")
    else:
        loss, row_stats = jnp_path()
    if return_residuals:
        return loss, (logits, labels, where, row_stats)
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _prob_xent(logits, labels, where, impl):
    return _prob_forward(logits, labels, where, impl, return_residuals=False)


def _prob_xent_fwd(logits, labels, where, impl):
    return _prob_forward(logits, labels, where, impl, return_residuals=True)


def _prob_xent_bwd(impl, residuals, g):
    logits, labels, where, row_stats = residuals
    g = jnp.where(where, g.astype(jnp.float32), 0.0)

    def jnp_path():
        x = logits.astype(jnp.float32)
        t = labels.astype(jnp.float32)
        p = jnp.exp(_log_softmax_from(x, row_stats))
        label_sum = row_stats[2]
        return (g[:, None] * (p * label_sum[:, None] - t)).astype(logits.dtype)

    if uses_kernels(impl):
        from fusedvjp.kernels import softmax_cross_entropy as kernels

        kernel = functools.partial(kernels.softmax_cross_entropy_bwd, logits, labels, where, row_stats, g)
        dlogits = run_kernel(impl, kernel, jnp_path, "softmax_cross_entropy")
    else:
        dlogits = jnp_path()
    # d loss / d t_j = -log p_j (= -((x_j - m) - log_s)). XLA fuses this into one
    # elementwise pass and removes it entirely when the labels need no gradient (the usual
    # case).
    logp = _zero_where_no_mass(_log_softmax_from(logits.astype(jnp.float32), row_stats), labels.astype(jnp.float32))
    dlabels = jnp.where(where[:, None], -g[:, None] * logp, 0.0).astype(labels.dtype)
    return dlogits, dlabels, None


_prob_xent.defvjp(_prob_xent_fwd, _prob_xent_bwd)


# --- public API ----------------------------------------------------------------------------


def _flatten_rows(logits, where):
    batch = logits.shape[:-1]
    n = math.prod(batch)
    logits2 = logits.reshape(n, logits.shape[-1])
    where1 = jnp.ones((n,), bool) if where is None else where.reshape(n)
    return batch, logits2, where1


def _check_where(where, batch_shape):
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {where.dtype}")
    if where.shape != batch_shape:
        raise ValueError(f"where must have the batch shape {batch_shape} (logits.shape[:-1]), got {where.shape}")
    return where


def _check_logits(logits):
    check_float("logits", logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {logits.shape}")


def softmax_cross_entropy_with_integer_labels(
    logits, labels, *, where=None, label_smoothing=0.0, z_loss=0.0, impl="auto"
):
    """Per-example softmax cross-entropy with integer labels, fused where possible.

    Args:
      logits: ``[..., V]`` floating logits (may contain ``-inf`` for masked entries).
      labels: ``[...]`` integer class indices in ``[0, V)``.
      where: optional ``[...]`` bool; rows where False get loss 0 and gradient 0.
      label_smoothing: ``a`` in ``[0, 1)``: target ``(1 - a) onehot + a / V``.
      z_loss: ``s >= 0``: adds ``s * logsumexp(logits)**2`` per example.
      impl: ``"auto"``, ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[...]`` losses in ``logits.dtype`` (computed in f32); NaN on counted rows whose
      label is outside ``[0, V)``.

    Raises:
      TypeError / ValueError: non-float logits, non-integer labels, mismatched shapes,
        out-of-range hyperparameters, unknown impl.

    Equivalent to: ``optax.softmax_cross_entropy_with_integer_labels(logits, labels)`` for
    ``a = s = 0``, and in general ``-sum(t * log_softmax(logits), -1) + s * logsumexp(logits)**2``.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits(logits)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {labels.shape})")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {logits.shape[:-1]} (logits {logits.shape} without V), "
                         f"got {labels.shape}")
    where = _check_where(where, logits.shape[:-1])
    label_smoothing = check_static_float("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = check_static_float("z_loss", z_loss, 0.0, math.inf)
    impl = resolve_impl(impl)
    if impl == "xla":
        return softmax_cross_entropy_with_integer_labels_reference(
            logits, labels, where=where, label_smoothing=label_smoothing, z_loss=z_loss
        )
    batch, logits2, where1 = _flatten_rows(logits, where)
    labels1 = labels.reshape(-1).astype(jnp.int32)
    loss = _int_xent(logits2, labels1, where1, label_smoothing, z_loss, impl)
    return loss.reshape(batch).astype(logits.dtype)


def softmax_cross_entropy(logits, labels, *, where=None, impl="auto"):
    """Per-example softmax cross-entropy against a target distribution, fused where possible.

    Args:
      logits: ``[..., V]`` floating logits (may contain ``-inf``).
      labels: ``[..., V]`` floating target probabilities (differentiable).
      where: optional ``[...]`` bool; rows where False get loss 0 and gradient 0.
      impl: ``"auto"``, ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[...]`` losses in ``logits.dtype`` (computed in f32).

    Raises:
      TypeError / ValueError: non-float logits or labels, mismatched shapes, unknown impl.

    Equivalent to: ``optax.softmax_cross_entropy(logits, labels)`` =
    ``-sum(labels * log_softmax(logits), -1)``, with ``0 * log 0 = 0``.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _check_logits(logits)
    check_float("labels", labels)
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {logits.shape}, got {labels.shape}")
    where = _check_where(where, logits.shape[:-1])
    impl = resolve_impl(impl)
    if impl == "xla":
        return softmax_cross_entropy_reference(logits, labels, where=where)
    batch, logits2, where1 = _flatten_rows(logits, where)
    labels2 = labels.reshape(logits2.shape)
    loss = _prob_xent(logits2, labels2, where1, impl)
    return loss.reshape(batch).astype(logits.dtype)
