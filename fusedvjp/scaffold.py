"""Write the skeleton of a new fused op: ``python -m fusedvjp.scaffold NAME [--root DIR]``.

Creates ``kernels/NAME.py``, ``ops/NAME.py`` and ``tests/test_ops_NAME.py`` with a
``TODO(scaffold)`` at each place a person must fill in, appends a registry entry to
``ops/registry.py`` and the export to ``ops/__init__.py``. The generic tests in
``tests/test_ops_registry.py`` pick the op up at once -- and fail until the TODOs are
done. Walk-through: ``docs/adding-an-op.md``.
"""

from __future__ import annotations

import argparse
import keyword
import pathlib
import re
import sys

KERNEL_TEMPLATE = '''"""Pallas kernels for {name}: forward and backward. See ops/{name}.py for the math."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fusedvjp.kernels import _common


@dataclasses.dataclass(frozen=True)
class {camel}BlockSizes:
    """Block sizes. Triton: powers of two. TPU: multiples of (8, 128) or the full dim."""

    block_rows: int
    block_cols: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        # TODO(scaffold): validate every field; name the offending value in the error.
        for field in ("block_rows", "block_cols", "num_warps", "num_stages"):
            if getattr(self, field) < 1:
                raise ValueError(f"{{field}} must be >= 1, got {{getattr(self, field)}}")

    @classmethod
    def default(cls, rows: int, cols: int, dtype, backend: str) -> "{camel}BlockSizes":
        # TODO(scaffold): choose from shape and dtype; say where a default was measured
        # (device, dtype, shape), or that it was not measured.
        raise NotImplementedError("TODO(scaffold): {camel}BlockSizes.default")


def _fwd_kernel(x_ref, o_ref, *res_refs, n_cols: int):
    """TODO(scaffold): block shapes and grid axes in at most three lines."""
    # TODO(scaffold): load, mask the tail (jnp.where(iota < n_cols, x, fill): -inf before
    # a max, 0 before a sum or dot), compute in f32, store the output and residuals.
    raise NotImplementedError("TODO(scaffold): {name} forward kernel")


def _bwd_kernel(x_ref, g_ref, *refs, n_cols: int):
    """TODO(scaffold): block shapes and grid axes."""
    # TODO(scaffold): recompute what is cheap from the residuals, form the VJP, store.
    raise NotImplementedError("TODO(scaffold): {name} backward kernel")


def _fwd_triton(x, *, interpret: bool, block_sizes):
    # TODO(scaffold): pallas_call with name="fusedvjp_{name}_fwd",
    # compiler_params=_common.triton_params(...), out_shape for output + residuals.
    raise NotImplementedError("TODO(scaffold): {name} forward, Triton launcher")


def _fwd_tpu(x, *, interpret: bool, block_sizes):
    # TODO(scaffold): pallas_call with name="fusedvjp_{name}_fwd", TPU block rules,
    # pltpu.CompilerParams(dimension_semantics=...); interpret mode on CPU.
    raise NotImplementedError("TODO(scaffold): {name} forward, Mosaic TPU launcher")


def _bwd_triton(x, residuals, g, *, interpret: bool, block_sizes):
    raise NotImplementedError("TODO(scaffold): {name} backward, Triton launcher")


def _bwd_tpu(x, residuals, g, *, interpret: bool, block_sizes):
    raise NotImplementedError("TODO(scaffold): {name} backward, Mosaic TPU launcher")


def {name}_fwd(x, *, backend=None, block_sizes=None):
    """Returns ``(out, residuals)``. TODO(scaffold): shapes, dtypes."""
    impls = {{
        "triton": functools.partial(_fwd_triton, block_sizes=block_sizes),
        "mosaic_tpu": functools.partial(_fwd_tpu, block_sizes=block_sizes),
    }}
    return _common.platform_dispatch(impls, x, backend=backend, op_name="{name}")


def {name}_bwd(x, residuals, g, *, backend=None, block_sizes=None):
    """Returns the cotangents of the forward's differentiable inputs."""
    impls = {{
        "triton": functools.partial(_bwd_triton, block_sizes=block_sizes),
        "mosaic_tpu": functools.partial(_bwd_tpu, block_sizes=block_sizes),
    }}
    return _common.platform_dispatch(impls, x, residuals, g, backend=backend, op_name="{name}")
'''

OPS_TEMPLATE = '''"""{name}, with a hand-written VJP.

TODO(scaffold): the math. Write the forward, then the Jacobian of one row, see its
structure, and write the VJP without materializing it. Say which residuals the
backward needs and why each is cheap and sufficient.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fusedvjp.ops._dispatch import check_float, resolve_impl, run_kernel, uses_kernels


def {name}_reference(x):
    """The impl="xla" path (plain jnp, autodiff). Equivalent to: TODO(scaffold)."""
    raise NotImplementedError("TODO(scaffold): {name}_reference")


def _forward(x, impl, return_residuals):
    """x [rows, cols] -> out (+ residuals): the one forward, for the primal and the fwd rule."""

    def jnp_path():
        # TODO(scaffold): jnp forward computing the residuals the backward needs.
        raise NotImplementedError("TODO(scaffold): {name} jnp forward")

    if uses_kernels(impl):
        from fusedvjp.kernels import {name} as kernels

        out, residuals = run_kernel(impl, lambda: kernels.{name}_fwd(x), jnp_path, "{name}")
    else:
        out, residuals = jnp_path()
    return (out, (x, residuals)) if return_residuals else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _{name}(x, impl):
    return _forward(x, impl, return_residuals=False)


def _{name}_fwd(x, impl):
    return _forward(x, impl, return_residuals=True)


def _{name}_bwd(impl, saved, g):
    x, residuals = saved

    def jnp_path():
        # TODO(scaffold): the hand-written VJP in jnp (f32 math, cast at the end).
        raise NotImplementedError("TODO(scaffold): {name} jnp backward")

    if uses_kernels(impl):
        from fusedvjp.kernels import {name} as kernels

        return (run_kernel(impl, lambda: kernels.{name}_bwd(x, residuals, g), jnp_path, "{name}"),)
    return (jnp_path(),)


_{name}.defvjp(_{name}_fwd, _{name}_bwd)


def {name}(x, *, impl="auto"):
    """TODO(scaffold): one line.

    Args:
      x: TODO(scaffold) shapes.
      impl: "auto", "pallas", "jnp" or "xla".

    Returns:
      TODO(scaffold).

    Raises:
      ValueError / TypeError: TODO(scaffold) what is checked.

    Equivalent to: TODO(scaffold).
    """
    x = jnp.asarray(x)
    check_float("x", x)
    # TODO(scaffold): check every argument's shape and dtype; name them in the error.
    impl = resolve_impl(impl)
    if impl == "xla":
        return {name}_reference(x)
    rows = math.prod(x.shape[:-1])
    return _{name}(x.reshape(rows, x.shape[-1]), impl).reshape(x.shape)
'''

TEST_TEMPLATE = '''"""{name}: what the registry's generic tests do not cover.

The generic tests (forward and VJP of every impl against float64, interpret mode,
check_grads, GPU/TPU lowering) come from the registry entry in ops/registry.py.
"""

import jax.numpy as jnp
import pytest

from fusedvjp import ops


def test_bad_input_errors():
    # TODO(scaffold): one case per check in ops.{name}, matching the message.
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        ops.{name}(jnp.ones((2, 3), jnp.int32))


# TODO(scaffold): the op's own semantics: edge values, options, kernel-level tests of
# both backends in interpret mode with small block sizes that force ragged tails.
'''

REGISTRY_TEMPLATE = '''

# --- {name}: shape (rows, cols) -- generated by fusedvjp.scaffold ---------------------------


def _{name}_inputs(rng, shape, dtype):
    # TODO(scaffold): random valid inputs (never zeros), as positional arrays of ops.{name}.
    return (_normal(rng, shape, dtype),)


def _{name}_abstract(shape, dtype):
    return (jax.ShapeDtypeStruct(shape, dtype),)


def _{name}_bytes(shape, dtype, mode):
    # TODO(scaffold): the fewest bytes each mode must move (reads + writes).
    rows, cols = shape
    return (2 if mode == "fwd" else 5) * rows * cols * _itemsize(dtype)


def _{name}_flops(shape, dtype, mode):
    # TODO(scaffold): the flops each mode does.
    rows, cols = shape
    return (1 if mode == "fwd" else 3) * rows * cols


register(OpSpec(
    name="{name}",
    fn=ops.{name},
    reference=ops.{name}_reference,
    make_inputs=_{name}_inputs,
    abstract_inputs=_{name}_abstract,
    diff_argnums=(0,),
    test_shapes=((37, 784), (1, 1), (3, 1000)),
    bench_shapes={{"mnist": [(128, 512)], "llm": [(8192, 4096)]}},
    lowering_shapes=(((128, 512), "f32"), ((8192, 4096), "bf16")),
    bytes=_{name}_bytes,
    flops=_{name}_flops,
    shape_names=("rows", "cols"),
))
'''

INIT_TEMPLATE = '''
from fusedvjp.ops.{name} import {name}, {name}_reference  # noqa: E402  (generated by fusedvjp.scaffold)

__all__ += ["{name}", "{name}_reference"]
'''


def camel_case(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def scaffold(name: str, root: pathlib.Path) -> list[pathlib.Path]:
    """Writes the skeleton files for op ``name`` under ``root``; returns the paths touched."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ValueError(f"op name must be a lowercase Python identifier, got {name!r}")
    files = {
        root / "kernels" / f"{name}.py": KERNEL_TEMPLATE,
        root / "ops" / f"{name}.py": OPS_TEMPLATE,
        root / "tests" / f"test_ops_{name}.py": TEST_TEMPLATE,
    }
    for path in files:
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
    registry, init = root / "ops" / "registry.py", root / "ops" / "__init__.py"
    if f'name="{name}"' in registry.read_text():
        raise FileExistsError(f"{registry} already registers {name!r}")
    for path, template in files.items():
        path.write_text(template.format(name=name, camel=camel_case(name)))
    with registry.open("a") as f:
        f.write(REGISTRY_TEMPLATE.format(name=name))
    with init.open("a") as f:
        f.write(INIT_TEMPLATE.format(name=name))
    return [*files, registry, init]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fusedvjp.scaffold", description=__doc__.splitlines()[0])
    p.add_argument("name", help="the op's name, a lowercase identifier, e.g. layer_norm")
    p.add_argument("--root", default=".", help="the repository root (holds kernels/, ops/, tests/)")
    args = p.parse_args(argv)
    try:
        touched = scaffold(args.name, pathlib.Path(args.root))
    except (ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    for path in touched:
        print(f"wrote {path}")
    print("next: grep -n 'TODO(scaffold)' on those files; docs/adding-an-op.md walks through them")


if __name__ == "__main__":
    main()
