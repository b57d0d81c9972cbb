"""The public ops. Each takes ``impl=`` in {"auto", "pallas", "jnp", "xla"}:

* ``"xla"``: plain jnp, differentiated by JAX's autodiff (the oracle; the benchmark
  times it beside the users' code, ``bench/baselines.py``);
* ``"jnp"``: jnp forward with the hand-written ``custom_vjp`` backward;
* ``"pallas"``: the fused Pallas kernels in both directions (interpret mode on CPU);
* ``"auto"``: pallas on GPU/TPU, jnp on CPU.
"""

from fusedvjp.ops._dispatch import IMPLS, UnsupportedCaseWarning
from fusedvjp.ops.dense import dense, dense_reference, dense_tanh
from fusedvjp.ops.layer_norm import layer_norm, layer_norm_reference
from fusedvjp.ops.linear_softmax_cross_entropy import (
    linear_softmax_cross_entropy_with_integer_labels,
    linear_softmax_cross_entropy_with_integer_labels_reference,
)
from fusedvjp.ops.rms_norm import rms_norm, rms_norm_reference
from fusedvjp.ops.softmax_cross_entropy import (
    softmax_cross_entropy,
    softmax_cross_entropy_reference,
    softmax_cross_entropy_with_integer_labels,
    softmax_cross_entropy_with_integer_labels_reference,
)

__all__ = [
    "IMPLS",
    "UnsupportedCaseWarning",
    "dense",
    "dense_reference",
    "dense_tanh",
    "layer_norm",
    "layer_norm_reference",
    "linear_softmax_cross_entropy_with_integer_labels",
    "linear_softmax_cross_entropy_with_integer_labels_reference",
    "rms_norm",
    "rms_norm_reference",
    "softmax_cross_entropy",
    "softmax_cross_entropy_reference",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy_with_integer_labels_reference",
]
