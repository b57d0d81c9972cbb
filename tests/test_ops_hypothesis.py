"""Random shapes (hypothesis) for every registered op and every impl: forward and VJP
against the float64 reference.

``impl="pallas"`` runs the kernels in interpret mode on the CPU, where every new shape is
a fresh trace and compile (~0.5 s), so the shapes are small (each dimension in [1, 40]:
still ragged against every block size, and 1) and the example counts modest: the file
takes about 45 s of CPU time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_close, float64_oracle
from fusedvjp.ops import registry

IMPLS = ("xla", "jnp", "pallas")
# Examples per test, drawn afresh each run: 45 shapes over the file.
MAX_EXAMPLES = {"xla": 3, "jnp": 3, "pallas": 3}
MAX_DIM = 40


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", list(registry.REGISTRY.values()), ids=lambda s: s.name)
def test_random_shapes(spec, impl):
    # Jitted once per test (a shape seen twice compiles once); the oracle traces its own jit.
    @functools.partial(jax.jit, static_argnames="options")
    def run(args, g, options):
        out, vjp = registry.vjp_wrt(functools.partial(spec.fn, impl=impl, **dict(options)), args, spec.diff_argnums)
        return out, vjp(g)

    @functools.partial(jax.jit, static_argnames="options")
    def oracle(args, g, options):
        out, vjp = registry.vjp_wrt(functools.partial(spec.reference, **dict(options)), args, spec.diff_argnums)
        return out, vjp(g)

    @settings(max_examples=MAX_EXAMPLES[impl], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.tuples(*[st.integers(1, MAX_DIM)] * len(spec.shape_names)),
        options=st.sampled_from(spec.options),
        seed=st.integers(0, 2**32 - 1),
    )
    def check(shape, options, seed):
        rng = np.random.default_rng(seed)
        args = spec.make_inputs(rng, shape, jnp.float32)
        options = tuple(sorted(options.items()))
        out_shape = jax.eval_shape(functools.partial(spec.reference, **dict(options)), *args)
        g = jnp.asarray(rng.standard_normal(out_shape.shape), out_shape.dtype)
        out, grads = run(args, g, options)
        want_out, want_grads = float64_oracle(functools.partial(oracle, options=options), args, g)
        msg = f"{spec.name} impl={impl} shape={shape} options={dict(options)}"
        assert_close(out, want_out, jnp.float32, err_msg=f"{msg}: forward")
        for i, got, want in zip(spec.diff_argnums, grads, want_grads, strict=True):
            assert_close(got, want, jnp.float32, err_msg=f"{msg}: grad of arg {i}")

    check()
