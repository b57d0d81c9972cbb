"""optax's own softmax cross-entropy tests, run against our losses on every impl.

The tests are imported from the installed optax package (``optax/losses/_classification_test.py``,
no copy), with ``optax.losses._classification.softmax_cross_entropy`` and
``softmax_cross_entropy_with_integer_labels`` swapped for ours: a user who swaps optax's
call for ours changes nothing else (positional ``axis``, per-row or per-class ``where``).

The one documented difference is turned off for the hand-written VJPs (``jnp``, ``pallas``):
forward-mode autodiff (README, "Semantics"), so ``check_grads`` runs in reverse mode only
there; ``xla`` runs every check as written.
"""

from __future__ import annotations

import functools
from unittest import mock

import jax
import pytest

pytest.importorskip("absl.testing.parameterized")
from optax.losses import _classification  # noqa: E402
from optax.losses import _classification_test as optax_tests  # noqa: E402

from fusedvjp import ops  # noqa: E402

SWAPPED = ("softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels")
# The optax test classes that exercise the two losses, and the tests of each that do.
CLASSES = {
    "SoftmaxCrossEntropyTest": None,  # all
    "SoftmaxCrossEntropyWithIntegerLabelsTest": None,
    "SafeSoftmaxCrossEntropyTest": ("test_against_plain_implementation",),  # the rest test optax's safe_ variant
}


def _swapped_case(base, impl: str):
    class Case(base):
        def setUp(self):
            super().setUp()
            if impl == "pallas" and jax.config.jax_enable_x64:
                self.skipTest("optax's tests feed float64 numpy arrays, float64 under x64: the kernels refuse "
                              "float64 by design (README, Semantics); impl='pallas' raises")
            for name in SWAPPED:
                patcher = mock.patch.object(_classification, name, functools.partial(getattr(ops, name), impl=impl))
                patcher.start()
                self.addCleanup(patcher.stop)
            if impl != "xla":
                check_grads = optax_tests.jaxtest.check_grads
                patcher = mock.patch.object(
                    optax_tests.jaxtest, "check_grads", functools.partial(check_grads, modes=("rev",)))
                patcher.start()
                self.addCleanup(patcher.stop)

    return Case


for _class_name, _only in CLASSES.items():
    _base = getattr(optax_tests, _class_name)
    for _impl in ("xla", "jnp", "pallas"):
        _case = _swapped_case(_base, _impl)
        if _only is not None:
            for _test in [t for t in dir(_base) if t.startswith("test") and t not in _only]:
                setattr(_case, _test, None)  # not collected: unittest collects callables only
        _case.__name__ = _case.__qualname__ = f"Test{_class_name}_{_impl}"
        globals()[_case.__name__] = _case


def test_every_swapped_test_exists():
    """optax still ships what this file runs (a rename upstream must not empty it)."""
    for class_name, only in CLASSES.items():
        base = getattr(optax_tests, class_name)
        names = [t for t in dir(base) if t.startswith("test")]
        assert names and all(t in names for t in (only or ()))
