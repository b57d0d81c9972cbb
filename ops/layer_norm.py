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

Either parameter may be absent (``None``, as in the bias-free and scale-free LayerNorms
of LLMs): then it is left out of ``y`` (``y = xhat * scale``, ``xhat + bias`` or
``xhat``), no cotangent is returned for it (None), and with no ``scale``,
``dxhat = g``. Absence is static, so every path -- the kernels included -- is traced
without the parameter: nothing loads or multiplies a vector of ones.

Residuals: ``x``, ``scale`` and the f32 ``mean`` and ``rstd`` per row. ``mean`` and ``rstd``
are [N] vectors (8 bytes per row against ``D * itemsize`` for a row of ``x``), and with
them the backward recomputes ``xhat = (x - mean) * rstd`` elementwise from the ``x`` it
reads anyway, without a second reduction over each row -- so no [N, D] ``xhat`` is kept
between the passes. They stay f32: rounding ``rstd`` to bf16 would put a relative error of
up to 2**-9 into every ``xhat`` and ``dx``. ``bias`` is not needed (``dbias`` is ``sum g``).

With D = 1, ``x - mean = 0``: ``y = bias``, ``dx = 0``, ``dscale = 0``, ``dbias = sum g``,
all finite: ``eps`` is checked in the compute dtype, where it is added, to keep
``rstd = rsqrt(var + eps)`` and its derivative ``~(var + eps)**-1.5`` (which the xla
path's autodiff forms) finite for ``var = 0`` -- at least 8.2e-26 in f32. 1e-50, > 0 in
float64, is 0 in f32, and a constant row would give NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fusedvjp.kernels._common import check_variance_eps
from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import (
    check_float,
    check_static_float,
    compute_dtype,
    resolve_impl,
    reverse_mode_only,
    run_kernel,
)


def layer_norm_reference(x, scale=None, bias=None, *, eps=1e-6):
    """The ``impl="xla"`` path: plain jnp, differentiated by JAX's autodiff.

    Equivalent to: ``((x - mean) * rsqrt(var + eps) * scale + bias).astype(x.dtype)`` over
    the last axis, with mean and the biased var in f32 (f64 for f64 inputs); a ``None``
    scale or bias is left out.
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
    y = xc * rstd[..., None]
    if scale is not None:
        y = y * scale.astype(ct)
    if bias is not None:
        y = y + bias.astype(ct)
    return y.astype(x.dtype), (mean, rstd)


# --- custom_vjp: primal and forward rule share _forward ------------------------------------


# Rows (m) split: each device normalizes its own rows, and the backward's dscale and
# dbias, sums over the rows, are all-reduced. The feature axis (d) is what every row
# statistic reduces over; the kernels need it whole, so a split d is gathered first.
# Absent (None) parameters and their cotangents have no entry.
def _forward_layout(has_scale: bool, has_bias: bool) -> _sharding.Layout:
    return _sharding.Layout(("m d", *("d",) * (has_scale + has_bias)), ("m d", "m", "m"), whole=("d",))


def _backward_layout(has_scale: bool, has_bias: bool) -> _sharding.Layout:
    grads = has_scale + has_bias
    return _sharding.Layout(("m d", *("d",) * has_scale, "m", "m", "m d"), ("m d", *("d",) * grads),
                            sums=("", *("m",) * grads), whole=("d",))


def _forward(x, scale, bias, eps, impl, return_residuals):
    """x [N, D], scale and bias [D] in x's dtype or None -> y [N, D] (+ residuals)."""
    from fusedvjp.kernels import layer_norm as kernels

    y, (mean, rstd) = run_kernel(
        impl,
        functools.partial(kernels.layer_norm_fwd, eps=eps),
        functools.partial(_statistics_and_output, eps=eps),
        (x, scale, bias),
        "layer_norm",
        _forward_layout(scale is not None, bias is not None),
    )
    # x and scale are read again by the backward; mean and rstd (f32 [N]) rebuild xhat;
    # bias only for its type and presence (its cotangent must come back typed like it).
    return (y, ((x, scale, mean, rstd), bias)) if return_residuals else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, impl):
    return _forward(x, scale, bias, eps, impl, return_residuals=False)


def _layer_norm_fwd(x, scale, bias, eps, impl):
    return _forward(x, scale, bias, eps, impl, return_residuals=True)


def _layer_norm_bwd_jnp(x, scale, mean, rstd, g, *, has_bias):
    d = x.shape[-1]
    ct = mean.dtype
    g32 = g.astype(ct)
    xhat = (x.astype(ct) - mean[:, None]) * rstd[:, None]
    dxhat = g32 if scale is None else g32 * scale.astype(ct)
    c1 = jnp.sum(dxhat * xhat, axis=-1, keepdims=True) / d
    c2 = jnp.sum(dxhat, axis=-1, keepdims=True) / d
    dx = rstd[:, None] * (dxhat - c2 - xhat * c1)
    # scale and bias have x's dtype here (the public function casts them).
    dscale = None if scale is None else jnp.sum(g32 * xhat, axis=0).astype(x.dtype)
    dbias = jnp.sum(g32, axis=0).astype(x.dtype) if has_bias else None
    return dx.astype(x.dtype), dscale, dbias


def _layer_norm_bwd(eps, impl, residuals, g):
    del eps  # rstd already holds it
    from fusedvjp.kernels import layer_norm as kernels

    (x, scale, mean, rstd), bias = residuals
    has_bias = bias is not None
    dx, dscale, dbias = run_kernel(impl, functools.partial(kernels.layer_norm_bwd, has_bias=has_bias),
                                   functools.partial(_layer_norm_bwd_jnp, has_bias=has_bias),
                                   (x, scale, mean, rstd, g), "layer_norm",
                                   _backward_layout(scale is not None, has_bias))
    return (_sharding.match_cotangent(dx, x), _sharding.match_cotangent(dscale, scale),
            _sharding.match_cotangent(dbias, bias))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# --- public API ----------------------------------------------------------------------------


def _check(x, scale, bias) -> None:
    check_float("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {x.shape}")
    d = x.shape[-1]
    for name, p in (("scale", scale), ("bias", bias)):
        if p is None:
            continue
        check_float(name, p)
        if p.shape != (d,):
            raise ValueError(f"{name} must have shape (D,) = ({d},) to match x {x.shape}, got {p.shape}")


def layer_norm(x, scale=None, bias=None, *, eps=1e-6, impl="auto"):
    """Layer normalization over the last axis, with a hand-written backward pass.

    Args:
      x: ``[..., D]`` floating input.
      scale: ``[D]`` multiplier (gamma), or None for none (then no ``dscale``). Cast to
        ``x.dtype``.
      bias: ``[D]`` offset (beta), or None for none (then no ``dbias``). Cast to ``x.dtype``.
      eps: a concrete Python float, added to the variance in the compute dtype (f32; f64
        for f64 inputs), where it must be at least 8.2e-26 (f32; 1.3e-205 for f64) so that
        a constant row's ``rsqrt(eps)`` and its derivative stay finite (1e-50 is 0 in f32).
      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      ``[..., D]`` in ``x.dtype``; mean, variance and the affine map are computed in f32
      (f64 for f64 inputs on the xla and jnp paths; the kernels refuse f64).

    Raises:
      TypeError: non-float ``x``, ``scale`` or ``bias``; a traced ``eps``.
      ValueError: ``scale`` or ``bias`` not of shape ``(D,)``, ``D == 0``, ``eps`` not a
        finite number > 0, ``eps`` too small in the compute dtype (see ``eps``), unknown ``impl``.

    Equivalent to: ``(x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)
    * scale + bias``, in f32, cast to ``x.dtype`` (``* scale``, ``+ bias`` left out when None).
    """
    x = jnp.asarray(x)
    scale, bias = (None if p is None else jnp.asarray(p) for p in (scale, bias))
    _check(x, scale, bias)
    eps = check_static_float("eps", eps, 0.0, math.inf, lo_open=True)
    check_variance_eps("eps", eps, compute_dtype(x.dtype))  # in the dtype it is added in
    impl = resolve_impl(impl)
    # Mixed precision as in ops.dense: the parameters are cast to the activation dtype
    # outside the custom_vjp, so autodiff returns their cotangents in their own dtype.
    scale, bias = (None if p is None else p.astype(x.dtype) for p in (scale, bias))
    if impl == "xla":
        return layer_norm_reference(x, scale, bias, eps=eps)
    rows = math.prod(x.shape[:-1])
    with reverse_mode_only("layer_norm", impl):
        y = _layer_norm(x.reshape(rows, x.shape[-1]), scale, bias, eps, impl)
    return y.reshape(x.shape)
