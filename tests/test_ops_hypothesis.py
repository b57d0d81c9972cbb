"""Random shapes (hypothesis) for every registered op: the hand-written VJP against float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, float64_oracle
from fusedvjp.ops import registry


@pytest.mark.parametrize("spec", list(registry.REGISTRY.values()), ids=lambda s: s.name)
def test_random_shapes(spec):
    impl = "jnp"

    @settings(max_examples=6, deadline=None)
    @given(shape=st.tuples(*[st.integers(1, 70)] * len(spec.shape_names)), seed=st.integers(0, 2**32 - 1))
    def check(shape, seed):
        rng = np.random.default_rng(seed)
        args = spec.make_inputs(rng, shape, jnp.float32)
        diff = tuple(args[i] for i in spec.diff_argnums)

        def rebuild(d):
            full = list(args)
            for i, a in zip(spec.diff_argnums, d):
                full[i] = a
            return full

        out, vjp = jax.vjp(lambda *d: spec.fn(*rebuild(d), impl=impl), *diff)
        g = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
        want_out, want_grads = float64_oracle(
            lambda d, g: (lambda o, f: (o, f(g)))(*jax.vjp(lambda *d: spec.reference(*rebuild(d)), *d)), diff, g)
        assert_close(out, want_out, jnp.float32)
        for got, want in zip(vjp(g), want_grads):
            assert_close(got, want, jnp.float32)

    check()
