"""Layer normalization over the last axis, with a hand-written VJP.

Per row ``x`` of length D (f32 math)::

    mean = sum(x) / D        var = sum((x - mean)**2) / D      (biased)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * scale + bias

The VJP, Jacobian first. ``y`` depends on ``x`` only through ``xhat``, and with
``dxhat = g * scale`` (the diagonal ``dy/dxhat = diag(scale)``) what is left is the
Jacobian of ``xhat`` w.r.t. ``x`` for one row::

    d xhat_i / d x_j = rstd * (delta_ij - 1/D - xhat_i xhat_j / D)

(``d mean / d x_j = 1/D``; ``d rstd / d x_j = -rstd**3 (x_j - mean) / D = -rstd xhat_j / D``.)
It is the identity minus two rank-one terms, symmetric, so its VJP needs two per-row
dot products and no D x D matrix::

    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

``scale`` and ``bias`` are shared by all rows, so their cotangents are column sums:
``dscale = sum_rows(g * xhat)``, ``dbias = sum_rows(g)``.

Residuals: ``x``, ``scale`` and the f32 ``mean`` and ``rstd`` per row. ``mean`` and ``rstd``
are [N] vectors (8 bytes per row against ``D * itemsize`` for a row of ``x``), and with
them the backward recomputes ``xhat = (x - mean) * rstd`` elementwise from the ``x`` it
reads anyway, without a second reduction over each row -- so no [N, D] ``xhat`` is kept
between the passes. They stay f32: rounding ``rstd`` to bf16 would put a relative error of
up to 2**-9 into every ``xhat`` and ``dx``. ``bias`` is not needed (``dbias`` is ``sum g``).

With D = 1, ``x - mean = 0``: ``y = bias``, ``dx = 0``, ``dscale = 0``, ``dbias = sum g``,
all finite (``eps > 0`` keeps ``rstd`` finite).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import (
    check_float,
    check_static_float,
    compute_dtype,
    resolve_impl,
    reverse_mode_only,
    run_kernel,
)


def layer_norm_reference(x, scale, bias, *, eps=1e-6):
    """The ``impl="xla"`` path: plain jnp, differentiated by JAX's autodiff.

    Equivalent to: ``((x - mean) * rsqrt(var + eps) * scale + bias).astype(x.dtype)`` over
    the last axis, with mean and the biased var in f32 (f64 for f64 inputs).
    """
    y, _ = _statistics_and_output(x, scale, bias, eps=eps)
    return y


def _statistics_and_output(x, scale, bias, *, eps):
    """x [..., D] -> (y [..., D] in x's dtype, (mean, rstd) [...] in the compute dtype)."""
    ct = compute_dtype(x.dtype)
    x32 = x.astype(ct)
    mean = jnp.mean(x32, axis=-1)
    xc = x32 - mean[..., None]
    rstd = lax.rsqrt(jnp.mean(xc * xc, axis=-1) + eps)
    y = xc * rstd[..., None] * scale.astype(ct) + bias.astype(ct)
    return y.astype(x.dtype), (mean, rstd)


# --- custom_vjp: primal and forward rule share _forward ------------------------------------


# Rows (m) split: each device normalizes its own rows, and the backward's dscale and
# dbias, sums over the rows, are all-reduced. The feature axis (d) is what every row
# statistic reduces over; the kernels need it whole, so a split d is gathered first.
_FORWARD_LAYOUT = _sharding.Layout(("m d", "d", "d"), ("m d", "m", "m"), whole=("d",))
_BACKWARD_LAYOUT = _sharding.Layout(("m d", "d", "m", "m", "m d"), ("m d", "d", "d"), sums=("", "m", "m"),
                                    whole=("d",))


def _forward(x, scale, bias, eps, impl, return_residuals):
    """x [N, D], scale and bias [D] in x's dtype -> y [N, D] (+ residuals)."""
    from fusedvjp.kernels import layer_norm as kernels

    y, (mean, rstd) = run_kernel(
        impl,
        functools.partial(kernels.layer_norm_fwd, eps=eps),
        functools.partial(_statistics_and_output, eps=eps),
        (x, scale, bias),
        "layer_norm",
        _FORWARD_LAYOUT,
    )
    # x and scale are read again by the backward; mean and rstd (f32 [N]) rebuild xhat;
    # bias only for its type (its cotangent must come back typed like it).
    return (y, ((x, scale, mean, rstd), bias)) if return_residuals else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, impl):
    return _forward(x, scale, bias, eps, impl, return_residuals=False)


def _layer_norm_fwd(x, scale, bias, eps, impl):
    return _forward(x, scale, bias, eps, impl, return_residuals=True)


def _layer_norm_bwd_jnp(x, scale, mean, rstd, g):
    d = x.shape[-1]
    ct = mean.dtype
    g32 = g.astype(ct)
    xhat = (x.astype(ct) - mean[:, None]) * rstd[:, None]
    dxhat = g32 * scale.astype(ct)
    c1 = jnp.sum(dxhat * xhat, axis=-1, keepdims=True) / d
    c2 = jnp.sum(dxhat, axis=-1, keepdims=True) / d
    dx = rstd[:, None] * (dxhat - c2 - xhat * c1)
    dscale = jnp.sum(g32 * xhat, axis=0)
    dbias = jnp.sum(g32, axis=0)
    # scale and bias have x's dtype here (the public function casts them).
    return dx.astype(x.dtype), dscale.astype(x.dtype), dbias.astype(x.dtype)


def _layer_norm_bwd(eps, impl, residuals, g):
    del eps  # rstd already holds it
    from fusedvjp.kernels import layer_norm as kernels

    (x, scale, mean, rstd), bias = residuals
    dx, dscale, dbias = run_kernel(impl, kernels.layer_norm_bwd, _layer_norm_bwd_jnp, (x, scale, mean, rstd, g),
                                   "layer_norm", _BACKWARD_LAYOUT)
    return (_sharding.match_cotangent(dx, x), _sharding.match_cotangent(dscale, scale),
            _sharding.match_cotangent(dbias, bias))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# --- public API ----------------------------------------------------------------------------


def _check(x, scale, bias) -> None:
    check_float("x", x)
    check_float("scale", scale)
    check_float("bias", bias)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {x.shape}")
    d = x.shape[-1]
    for name, p in (("scale", scale), ("bias", bias)):
        if p.shape != (d,):
            raise ValueError(f"{name} must have shape (D,) = ({d},) to match x {x.shape}, got {p.shape}")


def layer_norm(x, scale, bias, *, eps=1e-6, impl="auto"):
    """Layer normalization over the last axis, with a hand-written backward pass.

    Args:
      x: ``[..., D]`` floating input.
      scale: ``[D]`` multiplier (gamma). Cast to ``x.dtype``.
      bias: ``[D]`` offset (beta). Cast to ``x.dtype``.
      eps: a concrete Python float > 0, added to the variance.
      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[..., D]`` in ``x.dtype``; mean, variance and the affine map are computed in f32
      (f64 for f64 inputs on the xla and jnp paths; the kernels refuse f64).

    Raises:
      TypeError: non-float ``x``, ``scale`` or ``bias``; a traced ``eps``.
      ValueError: ``scale`` or ``bias`` not of shape ``(D,)``, ``D == 0``, ``eps`` not a
        finite number > 0, unknown ``impl``.

    Equivalent to: ``(x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)
    * scale + bias``, in f32, cast to ``x.dtype``.
    """
    x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
    _check(x, scale, bias)
    eps = check_static_float("eps", eps, 0.0, math.inf, lo_open=True)  # > 0 keeps rstd finite
    impl = resolve_impl(impl)
    # Mixed precision as in ops.dense: the parameters are cast to the activation dtype
    # outside the custom_vjp, so autodiff returns their cotangents in their own dtype.
    scale, bias = scale.astype(x.dtype), bias.astype(x.dtype)
    if impl == "xla":
        return layer_norm_reference(x, scale, bias, eps=eps)
    rows = math.prod(x.shape[:-1])
    with reverse_mode_only("layer_norm", impl):
        y = _layer_norm(x.reshape(rows, x.shape[-1]), scale, bias, eps, impl)
    return y.reshape(x.shape)
