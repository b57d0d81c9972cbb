"""The seed's MNIST MLP: 784 -> 512 tanh -> 10, softmax cross-entropy, plain SGD.

Every layer is one of our ops, so ``impl`` chooses the whole model's path: the fused
Pallas kernels, the jnp forward with hand-written VJPs, or XLA's autodiff of plain jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedvjp import ops


def init_params(key: jax.Array, sizes=(784, 512, 10), dtype=jnp.float32) -> dict:
    """As the seed: weights ``normal * sqrt(2 / fan_in)`` ([fan_in, fan_out]), zero biases."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i + 1}"] = (jax.random.normal(keys[i], (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)).astype(dtype)
        params[f"b{i + 1}"] = jnp.zeros((fan_out,), dtype)
    return params


def forward(params: dict, x: jax.Array, impl: str = "auto") -> jax.Array:
    """Logits ``[B, 10]``: ``dense(dense_tanh(x, w1, b1), w2, b2)``."""
    h = ops.dense_tanh(x, params["w1"], params["b1"], impl=impl)
    return ops.dense(h, params["w2"], params["b2"], impl=impl)


def loss_fn(params: dict, x: jax.Array, y: jax.Array, impl: str = "auto") -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    logits = forward(params, x, impl)
    return jnp.mean(ops.softmax_cross_entropy_with_integer_labels(logits, y, impl=impl))


@functools.partial(jax.jit, static_argnames=("impl",), donate_argnums=(0,))
def sgd_step(params: dict, x: jax.Array, y: jax.Array, lr: float, impl: str = "auto"):
    """One SGD step ``p <- p - lr * dL/dp``; returns ``(params, loss)``."""
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, impl)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss


@functools.partial(jax.jit, static_argnames=("impl",))
def predict(params: dict, x: jax.Array, impl: str = "auto") -> jax.Array:
    return jnp.argmax(forward(params, x, impl), axis=-1)
