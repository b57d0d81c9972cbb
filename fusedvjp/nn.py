"""Flax NNX modules over the fused ops: ``Dense``, ``LayerNorm``, ``RMSNorm``, ``LinearCrossEntropy``.

Flax's own ``nnx.Linear`` and ``nnx.LayerNorm`` cannot host the ops (their ``dot_general``
hook is a matmul, not a whole layer), and ``nnx.Embed.attend`` materializes the [..., V]
logits. These modules hold the same parameters under the same names as Flax's
(``kernel`` [in, out], ``bias``, ``scale``), take Flax's constructor arguments (``rngs``,
``dtype``, ``param_dtype``, ``*_init``, ``use_bias``/``use_scale``, ``*_metadata``) and promote
dtypes as Flax does (``dtype=None``: the inputs' and parameters' result type), then call one
op with ``impl=`` passed through. Sharding metadata comes with the initializer, as in Flax:
``kernel_init=nnx.with_partitioning(init, (None, "model"))``.

Needs Flax (``pip install "fusedvjp[flax]"``); ``import fusedvjp`` does not.
"""

from __future__ import annotations

from types import MappingProxyType

try:
    from flax import nnx
    from flax.nnx.nn import dtypes as flax_dtypes
except ImportError as e:  # pragma: no cover - exercised in a subprocess without flax
    raise ImportError(
        "fusedvjp.nn needs Flax (flax.nnx): install the extra with "
        "`pip install -c constraints.txt -e \".[flax]\"` (or `pip install flax`)") from e

import jax.numpy as jnp

from fusedvjp import ops

default_kernel_init = nnx.initializers.lecun_normal()  # nnx.Linear's default

__all__ = ["Dense", "LayerNorm", "LinearCrossEntropy", "RMSNorm"]


def _param(init, rngs, shape, param_dtype, metadata):
    """``nnx.Param(init(key, shape, param_dtype), **metadata)`` as Flax's layers build it:
    an initializer wrapped by ``nnx.with_partitioning`` returns ``VariableMetadata``, which
    ``nnx.Param`` turns into the sharding annotation."""
    return nnx.Param(init(rngs.params(), shape, param_dtype), **metadata)


def _value(p):
    return None if p is None else p[...]


class Dense(nnx.Module):
    """``activation(x @ kernel + bias)`` through :func:`fusedvjp.ops.dense`: nnx.Linear's
    parameters and conventions with the activation fused into the matmul's epilogue.

    Args:
      in_features, out_features: the kernel is ``[in_features, out_features]``.
      activation: None, ``"tanh"``, ``"gelu"`` (tanh approximation) -- whatever
        ``ops.dense`` accepts; it validates the name.
      use_bias: whether there is a ``[out_features]`` bias.
      dtype: computation dtype (None: the result type of the input and parameters).
      param_dtype: the parameters' dtype.
      kernel_init, bias_init: initializers (nnx.Linear's defaults: LeCun normal, zeros).
      impl: passed to the op.
      rngs: ``nnx.Rngs``; its ``params`` stream initializes the parameters.
      kernel_metadata, bias_metadata: extra ``nnx.Param`` metadata.

    Equivalent to: ``act(nnx.Linear(in_features, out_features, ...)(x))`` with the same parameters.
    """

    def __init__(self, in_features: int, out_features: int, *, activation: str | None = None,
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 kernel_init=default_kernel_init, bias_init=nnx.initializers.zeros_init(),
                 impl: str = "auto", rngs: nnx.Rngs,
                 kernel_metadata=MappingProxyType({}), bias_metadata=MappingProxyType({})):
        self.kernel = _param(kernel_init, rngs, (in_features, out_features), param_dtype, kernel_metadata)
        self.bias = (_param(bias_init, rngs, (out_features,), param_dtype, bias_metadata) if use_bias
                     else nnx.data(None))
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.use_bias, self.impl = activation, use_bias, impl
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x):
        x, kernel, bias = flax_dtypes.promote_dtype((x, self.kernel[...], _value(self.bias)), dtype=self.dtype)
        return ops.dense(x, kernel, bias, activation=self.activation, impl=self.impl)


class LayerNorm(nnx.Module):
    """Layer normalization over the last axis through :func:`fusedvjp.ops.layer_norm`.

    Args:
      num_features: the size of the last axis.
      epsilon: added to the variance.
      use_scale, use_bias: whether the ``scale`` and ``bias`` parameters exist.
      dtype, param_dtype, scale_init, bias_init, rngs, scale_metadata, bias_metadata:
        as nnx.LayerNorm.
      impl: passed to the op.

    Equivalent to: ``nnx.LayerNorm(num_features, epsilon=epsilon, ...)`` with the same
    parameters (statistics in f32).
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, use_scale: bool = True,
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 scale_init=nnx.initializers.ones_init(), bias_init=nnx.initializers.zeros_init(),
                 impl: str = "auto", rngs: nnx.Rngs,
                 scale_metadata=MappingProxyType({}), bias_metadata=MappingProxyType({})):
        self.scale = (_param(scale_init, rngs, (num_features,), param_dtype, scale_metadata) if use_scale
                      else nnx.data(None))
        self.bias = (_param(bias_init, rngs, (num_features,), param_dtype, bias_metadata) if use_bias
                     else nnx.data(None))
        self.num_features, self.epsilon = num_features, epsilon
        self.use_scale, self.use_bias, self.impl = use_scale, use_bias, impl
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x):
        x, scale, bias = flax_dtypes.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return ops.layer_norm(x, scale, bias, eps=self.epsilon, impl=self.impl)


class RMSNorm(nnx.Module):
    """RMS normalization over the last axis through ``fusedvjp.ops.rms_norm``:
    ``x / sqrt(mean(x²) + epsilon) * scale``.

    Args: as :class:`LayerNorm`, without a bias.

    Equivalent to: ``nnx.RMSNorm(num_features, epsilon=epsilon, ...)`` with the same parameters.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, use_scale: bool = True,
                 dtype=None, param_dtype=jnp.float32, scale_init=nnx.initializers.ones_init(),
                 impl: str = "auto", rngs: nnx.Rngs, scale_metadata=MappingProxyType({})):
        self.scale = (_param(scale_init, rngs, (num_features,), param_dtype, scale_metadata) if use_scale
                      else nnx.data(None))
        self.num_features, self.epsilon = num_features, epsilon
        self.use_scale, self.impl = use_scale, impl
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, x):
        x, scale = flax_dtypes.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        return ops.rms_norm(x, scale, eps=self.epsilon, impl=self.impl)


class LinearCrossEntropy(nnx.Module):
    """The LM head and its loss in one op: cross-entropy of ``x @ kernel + bias`` against
    integer labels through :func:`fusedvjp.ops.linear_softmax_cross_entropy_with_integer_labels`,
    without the [..., V] logits in memory.

    Tied embeddings: build it with ``use_kernel=False`` and pass the embedding table at
    call time, ``head(x, labels, kernel=embed.embedding[...].T)`` ([D, V]; the transpose is
    of the [V, D] table, not of any logits).

    Args:
      in_features: D. vocab_size: V.
      use_kernel: whether the module owns a ``[D, V]`` kernel (False: ``kernel=`` is required
        at call time).
      use_bias: whether there is a ``[V]`` bias (default False, as LM heads have none).
      label_smoothing, z_loss, logit_soft_cap, chunk_size: the op's options, fixed per module.
      ignore_index: labels equal to it count as ``where=False`` (the op's option).
      dtype, param_dtype, kernel_init, bias_init, rngs, kernel_metadata, bias_metadata: as nnx.Linear.
      impl: passed to the op.
    """

    def __init__(self, in_features: int, vocab_size: int, *, use_kernel: bool = True, use_bias: bool = False,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, logit_soft_cap: float | None = None,
                 ignore_index: int | None = None, chunk_size: int | None = None,
                 dtype=None, param_dtype=jnp.float32, kernel_init=default_kernel_init,
                 bias_init=nnx.initializers.zeros_init(), impl: str = "auto", rngs: nnx.Rngs,
                 kernel_metadata=MappingProxyType({}), bias_metadata=MappingProxyType({})):
        self.kernel = (_param(kernel_init, rngs, (in_features, vocab_size), param_dtype, kernel_metadata)
                       if use_kernel else nnx.data(None))
        self.bias = (_param(bias_init, rngs, (vocab_size,), param_dtype, bias_metadata) if use_bias
                     else nnx.data(None))
        self.in_features, self.vocab_size = in_features, vocab_size
        self.use_kernel, self.use_bias, self.impl = use_kernel, use_bias, impl
        self.label_smoothing, self.z_loss, self.logit_soft_cap = label_smoothing, z_loss, logit_soft_cap
        self.ignore_index, self.chunk_size = ignore_index, chunk_size
        self.dtype, self.param_dtype = dtype, param_dtype

    def _operands(self, x, kernel):
        """``(x, kernel, bias)`` promoted; ``kernel`` is the call's or the module's, never both."""
        if kernel is None and self.kernel is None:
            raise ValueError("this LinearCrossEntropy was built with use_kernel=False: pass the [D, V] "
                             f"= [{self.in_features}, {self.vocab_size}] kernel (e.g. a tied embedding's "
                             "table transposed) as kernel=")
        if kernel is not None and self.kernel is not None:
            raise ValueError("kernel= given to a LinearCrossEntropy that owns a kernel: build it with "
                             "use_kernel=False to take the kernel at call time")
        if kernel is None:
            kernel = self.kernel[...]
        elif tuple(kernel.shape) != (self.in_features, self.vocab_size):
            raise ValueError(f"kernel must have shape [D, V] = [{self.in_features}, {self.vocab_size}], "
                             f"got {tuple(kernel.shape)} (an [V, D] embedding table needs .T)")
        return flax_dtypes.promote_dtype((x, kernel, _value(self.bias)), dtype=self.dtype)

    def __call__(self, x, labels, *, where=None, reduction: str = "mean", weight=None, kernel=None):
        """The loss.

        Args:
          x: ``[..., D]`` activations. labels: integer ``[...]``.
          where: bool ``[...]`` rows to count (False rows: loss 0, gradient 0).
          reduction: ``"mean"`` (over counted rows), ``"sum"`` or ``"none"``.
          weight: float per-row weights ``[...]`` (loss and gradients scaled per row).
          kernel: the ``[D, V]`` kernel for a module built with ``use_kernel=False``.

        Returns:
          the op's loss: a float32 scalar (float64 for float64 x) for ``"sum"``/``"mean"``,
          ``[...]`` in x's dtype for ``"none"``.
        """
        x, kernel, bias = self._operands(x, kernel)
        return ops.linear_softmax_cross_entropy_with_integer_labels(
            x, kernel, labels, b=bias, where=where, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            logit_soft_cap=self.logit_soft_cap, reduction=reduction, chunk_size=self.chunk_size,
            ignore_index=self.ignore_index, weight=weight, impl=self.impl)

    def logits(self, x, *, kernel=None):
        """The [..., V] logits ``cap·tanh((x @ kernel + bias)/cap)`` materialized (for sampling,
        not for the loss)."""
        x, kernel, bias = self._operands(x, kernel)
        z = ops.dense(x, kernel, bias, impl="xla")
        if self.logit_soft_cap is not None:
            z = self.logit_soft_cap * jnp.tanh(z / self.logit_soft_cap)
        return z
