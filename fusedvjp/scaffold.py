"""Write the skeleton of a new fused op.

    python -m fusedvjp.scaffold NAME [--params a,b] [--option name=default ...] [--root DIR]

Creates the kernel package ``kernels/NAME/`` -- ``__init__.py`` (the launchers
``NAME_fwd``/``NAME_bwd`` and the backend table), ``common.py`` (the block sizes and the
math the backends share), ``triton.py`` and ``mosaic_tpu.py`` (one backend each) -- and
``ops/NAME.py`` and ``tests/test_ops_NAME.py``, with a ``TODO(scaffold)`` at each place a
person must fill in; appends a registry entry to ``ops/registry.py`` and the export to
``ops/__init__.py``. The generic tests in ``tests/test_ops_registry.py`` pick the op up
at once -- and fail until the TODOs are done. Walk-through: ``docs/adding-an-op.md``.

It writes all of that or nothing: names, option defaults (each a Python literal) and the
target folders are checked, and every file is rendered and compiled, before the first
write; a write that fails undoes the others.
"""

from __future__ import annotations

import argparse
import ast
import keyword
import os
import pathlib
import re
import shutil
import sys
import tempfile

KERNEL_INIT_TEMPLATE = '''"""Pallas kernels for {name}: forward and backward. The derivation is in ops/{name}.py.

TODO(scaffold): the op's math in short (the forward, and the VJP as the kernels compute
it) and the design every backend follows: what each kernel reads and writes, which
residuals the forward saves and why each is cheap and sufficient, which axis is the
reduction. Each backend module says how it tiles and masks.

One file per backend: ``triton.py`` (any CUDA/ROCm GPU, the Pallas Triton lowering) and
``mosaic_tpu.py``; ``common.py`` holds the tiles (``{camel}BlockSizes``) and the math
both share.
"""

from __future__ import annotations

import functools

from fusedvjp.kernels import _common
from fusedvjp.kernels.{name} import mosaic_tpu, triton
from fusedvjp.kernels.{name}.common import {camel}BlockSizes

__all__ = ["{camel}BlockSizes", "{name}_bwd", "{name}_fwd"]

# Backend name -> its module (fwd and bwd with one signature each). Another backend is one
# more module and one more entry here (docs/adding-an-op.md, step 5).
_BACKENDS = {{"triton": triton, "mosaic_tpu": mosaic_tpu}}


def _check_args({arrays}) -> None:
    # TODO(scaffold): ValueError for bad shapes; NotImplementedError(reason) for a case the
    # kernels cannot serve (a dtype, a size past a VMEM budget): the op then falls back to
    # jnp under impl="auto", and impl="pallas" gets the error.
    pass


def {name}_fwd({arrays}, *{lsig}, backend=None, block_sizes=None):
    """Returns ``(out, residuals)``. TODO(scaffold): shapes and dtypes of each."""
    _check_args({arrays})
    _common.check_block_sizes(block_sizes, {camel}BlockSizes, backend, *x.shape, backends=tuple(_BACKENDS))
    static = dict(block_sizes=block_sizes{lpass})
    impls = {{name: functools.partial(module.fwd, **static) for name, module in _BACKENDS.items()}}
    return _common.platform_dispatch(impls, {arrays}, backend=backend, op_name="{name}")


def {name}_bwd({arrays}, residuals, g, *{lsig}, backend=None, block_sizes=None):
    """Returns one cotangent per array input of the forward."""
    _common.check_block_sizes(block_sizes, {camel}BlockSizes, backend, *x.shape, backends=tuple(_BACKENDS))
    static = dict(block_sizes=block_sizes{lpass})
    impls = {{name: functools.partial(module.bwd, **static) for name, module in _BACKENDS.items()}}
    return _common.platform_dispatch(impls, {arrays}, residuals, g, backend=backend, op_name="{name}")
'''

KERNEL_COMMON_TEMPLATE = '''"""What every {name} backend shares: the tiles, the constants and the math.

TODO(scaffold): the math both backends compute the same way (the forward of a tile, the
VJP's formula), as jnp functions of tiles that each backend's kernels call, so the
derivation is written once; and the constants they share.
"""

from __future__ import annotations

import dataclasses

from fusedvjp.kernels import _common


@dataclasses.dataclass(frozen=True)
class {camel}BlockSizes:
    """Tile sizes. Triton: powers of two. TPU: last two block dims multiples of (8, 128)
    or the whole dimension. With ``backend=None`` every backend's branch is traced, so
    explicit block sizes must be legal for all of them (``_common.check_block_sizes``)."""

    block_rows: int
    block_cols: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.validate_block_fields(self, ("block_rows", "block_cols", "num_warps", "num_stages"))

    @classmethod
    def default(cls, rows: int, cols: int, dtype, backend: str) -> "{camel}BlockSizes":
        """Tiles for an ``[rows, cols]`` input in ``dtype`` on ``backend``: a measured entry
        of the tuning table (``kernels/tuning.json``, see ``_common.tuned_block_sizes``)
        if there is one, else the backend module's ``default_block_sizes``."""
        tuned = _common.tuned_block_sizes(cls, "{name}", (rows, cols), dtype, backend)
        if tuned is not None:
            return tuned
        module = _backend_module(backend)
        if module is None:
            raise ValueError(f"{name} has no kernels for backend {{backend!r}}")
        return module.default_block_sizes(rows, cols, dtype)

    def check(self, rows: int, cols: int, backend: str) -> None:
        """Raises ValueError, naming the values, if this tile breaks ``backend``'s rules."""
        module = _backend_module(backend)
        if module is not None:  # no kernels for that backend: nothing to check, nothing runs
            module.check_block_sizes(self, rows, cols)


def _backend_module(backend: str):
    """``backend``'s module, or None for a backend of the project (``_common.BACKENDS``)
    that {name} has no kernels for. Imported here, on use: each backend module imports
    this one."""
    if backend == "triton":
        from fusedvjp.kernels.{name} import triton

        return triton
    if backend == "mosaic_tpu":
        from fusedvjp.kernels.{name} import mosaic_tpu

        return mosaic_tpu
    _common.check_backend(backend)
    return None
'''

KERNEL_TRITON_TEMPLATE = '''"""{name} kernels for GPUs through the Pallas Triton lowering (any CUDA or ROCm GPU).

Blocks are powers of two and dot dims >= 16: mask the tails, never ask callers to pad.
Out-of-range reads hold garbage (NaN in interpret mode): mask loads (plgpu.load(...,
mask=, other=)), then jnp.where(valid, x, fill) -- -inf before a max, 0 before a sum or
dot. Never multiply by a mask.

TODO(scaffold): this backend's tiling: the grid axes, any in-kernel loop over the
reduction axis, and how the tails are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.{name}.common import {camel}BlockSizes


def default_block_sizes(rows: int, cols: int, dtype) -> {camel}BlockSizes:
    # TODO(scaffold): choose from shape and dtype; a default that was measured says where
    # (device, dtype, shape, time); one that was not says so.
    raise NotImplementedError("TODO(scaffold): {name} default_block_sizes (Triton)")


def check_block_sizes(bs: {camel}BlockSizes, rows: int, cols: int) -> None:
    """Raises ValueError, naming the values, if ``bs`` breaks Triton's rules."""
    # TODO(scaffold): powers of two (dot dims >= 16), shared memory in budget.
    raise NotImplementedError("TODO(scaffold): {name} check_block_sizes (Triton)")


def _fwd_kernel({refs_in}, o_ref, *residual_refs{kopts}):
    """TODO(scaffold): block shapes and grid axes, at most three lines."""
    raise NotImplementedError("TODO(scaffold): {name} forward kernel (Triton)")


def _bwd_kernel({refs_in}, *refs{kopts}):
    """TODO(scaffold): block shapes and grid axes."""
    raise NotImplementedError("TODO(scaffold): {name} backward kernel (Triton)")


def fwd({arrays}, *{lsig}, block_sizes, interpret):
    # TODO(scaffold): bs = block_sizes or {camel}BlockSizes.default(*x.shape, x.dtype, "triton");
    #   pl.pallas_call(_fwd_kernel, grid=..., in_specs=..., out_specs=...,
    #   out_shape=[_common.out_struct(...) per output], compiler_params=_common.triton_params(num_warps, num_stages),
    #   interpret=interpret, name="fusedvjp_{name}_fwd"); return (out, residuals).
    raise NotImplementedError("TODO(scaffold): {name} forward launcher (Triton)")


def bwd({arrays}, residuals, g, *{lsig}, block_sizes, interpret):
    # TODO(scaffold): name="fusedvjp_{name}_bwd"; return one cotangent per array input.
    raise NotImplementedError("TODO(scaffold): {name} backward launcher (Triton)")
'''

KERNEL_MOSAIC_TPU_TEMPLATE = '''"""{name} kernels for TPUs through Mosaic TPU.

Grid with the reduction axis last and "arbitrary" (pltpu.CompilerParams(
dimension_semantics=...)), f32 VMEM scratch (scratch_shapes=[pltpu.VMEM(...)]) carried
across it. Per-row vectors travel as [N, 1] (TPU blocks are 2-D). An edge block holds
garbage (NaN in interpret mode): zero the reduction axis' tail with jnp.where before a
dot or sum. Every platform's branch returns the same shapes: finish any partial
reductions inside the branch.

TODO(scaffold): this backend's tiling: the grid axes, the blocks, which scratch carries
what across the reduction axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.{name}.common import {camel}BlockSizes


def default_block_sizes(rows: int, cols: int, dtype) -> {camel}BlockSizes:
    # TODO(scaffold): choose from shape and dtype within the VMEM budget; a default that
    # was measured says where (device, dtype, shape, time); one that was not says so.
    raise NotImplementedError("TODO(scaffold): {name} default_block_sizes (Mosaic TPU)")


def check_block_sizes(bs: {camel}BlockSizes, rows: int, cols: int) -> None:
    """Raises ValueError, naming the values, if ``bs`` breaks Mosaic TPU's rules."""
    # TODO(scaffold): last two block dims multiples of (8, 128) or the whole dimension.
    raise NotImplementedError("TODO(scaffold): {name} check_block_sizes (Mosaic TPU)")


def _fwd_kernel({refs_in}, o_ref, *refs{kopts}):
    """TODO(scaffold): block shapes and grid axes, at most three lines."""
    raise NotImplementedError("TODO(scaffold): {name} forward kernel (Mosaic TPU)")


def _bwd_kernel({refs_in}, *refs{kopts}):
    """TODO(scaffold): block shapes and grid axes."""
    raise NotImplementedError("TODO(scaffold): {name} backward kernel (Mosaic TPU)")


def fwd({arrays}, *{lsig}, block_sizes, interpret):
    # TODO(scaffold): as triton.fwd, with BlockSpecs, pltpu.CompilerParams(dimension_semantics=...),
    #   interpret=_common.tpu_interpret(interpret) and name="fusedvjp_{name}_fwd".
    raise NotImplementedError("TODO(scaffold): {name} forward launcher (Mosaic TPU)")


def bwd({arrays}, residuals, g, *{lsig}, block_sizes, interpret):
    # TODO(scaffold): name="fusedvjp_{name}_bwd"; return one cotangent per array input.
    raise NotImplementedError("TODO(scaffold): {name} backward launcher (Mosaic TPU)")
'''

OPS_TEMPLATE = '''"""{name}, with a hand-written VJP.

TODO(scaffold): the math (docs/adding-an-op.md, step 1). Write the forward for one row,
then the Jacobian of the output w.r.t. each input, see its structure, and write the VJP
without materializing it. Say which residuals the backward needs and why each is cheap
and sufficient.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import (
    check_float,
    check_static_float,
    compute_dtype,
    resolve_impl,
    reverse_mode_only,
    run_kernel,
)


def {name}_reference({arrays}{rsig}):
    """The impl="xla" path (plain jnp, f32 math, output in x's dtype; JAX's autodiff).

    Equivalent to: TODO(scaffold).
    """
    raise NotImplementedError("TODO(scaffold): {name}_reference")


# --- under sharding (ops/_sharding.py) ----------------------------------------------------
# Name each array's dimensions by factor: rows "m" split freely (data parallel); a factor
# the kernels reduce over goes in whole= (gathered when split) unless a local= function
# combines per-device partials; sums= lists, per cotangent, the factors it is a sum over
# (a parameter's cotangent sums over the rows, and is all-reduced when they are split).
# None leaves the kernels unpartitioned: XLA gathers their operands on every device.
# TODO(scaffold): e.g. Layout(("m d", "d", "d"), ("m d", "m", "m"), whole=("d",)) for the
# forward, Layout((..., "m d"), ("m d", "d", "d"), sums=("", "m", "m"), whole=("d",)) for the backward.
_FORWARD_LAYOUT: _sharding.Layout | None = None
_BACKWARD_LAYOUT: _sharding.Layout | None = None


# --- custom_vjp: primal and forward rule share _forward ------------------------------------


def _forward_jnp({arrays}{kwsig}):
    """x [rows, cols] -> (out, residuals): the jnp forward; the kernels' forward returns the same."""
    # TODO(scaffold): the jnp forward in compute_dtype(x.dtype) (f32; f64 under x64), with
    # the residuals the backward needs.
    raise NotImplementedError("TODO(scaffold): {name} jnp forward")


def _forward({arrays}, {opt_args}impl, return_residuals):
    """The one forward, for the primal and the fwd rule."""
    from fusedvjp.kernels import {name} as kernels

    out, residuals = run_kernel(
        impl,
        functools.partial(kernels.{name}_fwd{kpass}),
        functools.partial(_forward_jnp{kpass}),
        ({arrays},),
        "{name}",
        _FORWARD_LAYOUT,
    )
    # TODO(scaffold): say why each residual is kept.
    return (out, ({arrays}, residuals)) if return_residuals else out


@functools.partial(jax.custom_vjp, nondiff_argnums={nondiff})
def _{name}({arrays}, {opt_args}impl):
    return _forward({arrays}, {opt_args}impl, return_residuals=False)


def _{name}_fwd({arrays}, {opt_args}impl):
    return _forward({arrays}, {opt_args}impl, return_residuals=True)


def _backward_jnp({arrays}, residuals, g{kwsig}):
    """The hand-written VJP in jnp: one cotangent per array input, in order."""
    # TODO(scaffold): math in the residuals' dtype; cast each cotangent to its input's dtype.
    raise NotImplementedError("TODO(scaffold): {name} jnp backward")


def _{name}_bwd({opt_args}impl, saved, g):
    from fusedvjp.kernels import {name} as kernels

    {arrays}, residuals = saved
    cotangents = run_kernel(
        impl,
        functools.partial(kernels.{name}_bwd{kpass}),
        functools.partial(_backward_jnp{kpass}),
        ({arrays}, residuals, g),
        "{name}",
        _BACKWARD_LAYOUT,
    )
    # Inside shard_map a replicated input's cotangent is summed over the axes it varies on.
    return tuple(_sharding.match_cotangent(ct, p) for ct, p in zip(cotangents, ({arrays},)))


_{name}.defvjp(_{name}_fwd, _{name}_bwd)


# --- public API ----------------------------------------------------------------------------


def _check({arrays}) -> None:
    check_float("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., D] with D >= 1, got {{x.shape}}")
    # TODO(scaffold): check every parameter's dtype and shape against x; name both shapes.


def {name}({arrays}, *{psig}, impl="auto"):
    """TODO(scaffold): one line.

    Args:
      x: ``[..., D]`` floating input.
{param_docs}      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` or ``"xla"``.

    Returns:
      TODO(scaffold): shape and dtype.

    Raises:
      ValueError / TypeError: TODO(scaffold): what is checked.

    Equivalent to: TODO(scaffold).
    """
    {asarrays}
    _check({arrays})
{opt_checks}    impl = resolve_impl(impl)
{casts}    if impl == "xla":
        return {name}_reference({arrays}{rpass})
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    # TODO(scaffold): reshape the output if it is not x-shaped.
    with reverse_mode_only("{name}", impl):
        return _{name}(x2{params_tail}, {opt_args}impl).reshape(x.shape)
'''

TEST_TEMPLATE = '''"""{name}: what the registry's generic tests do not cover.

The generic tests (forward and VJP of every impl against float64, interpret mode,
check_grads, GPU/TPU lowering) come from the registry entry in ops/registry.py.
"""

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, float64_oracle, randn
from fusedvjp import ops
from fusedvjp.kernels import {name} as kernels
from fusedvjp.ops import registry


def test_bad_input_errors():
    # TODO(scaffold): one case per check in ops.{name}, matching the message.
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        ops.{name}(jnp.ones((2, 3), jnp.int32){params_ones})


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_kernels_with_ragged_tails(backend, rng):
    """Both backends in interpret mode, with small blocks that leave ragged tails."""
    spec = registry.get("{name}")
    args = spec.make_inputs(rng, (37, 300), jnp.float32)
    # TODO(scaffold): block sizes legal for this backend that do not divide (37, 300).
    block_sizes = kernels.{camel}BlockSizes(block_rows=8, block_cols=128)
    out, residuals = kernels.{name}_fwd(*args{kdefaults}, backend=backend, block_sizes=block_sizes)
    g = randn(rng, out.shape, out.dtype)
    grads = kernels.{name}_bwd(*args, residuals, g{kdefaults}, backend=backend, block_sizes=block_sizes)

    def ref(a, g):
        o, f = jax.vjp(spec.reference, *a)
        return o, f(g)

    want_out, want_grads = float64_oracle(ref, args, g)
    assert_close(out, want_out, jnp.float32)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, jnp.float32)


# TODO(scaffold): the op's own semantics: edge values, options, bf16 behaviour.
'''

REGISTRY_TEMPLATE = '''

# --- {name}: shape (N, D) -- generated by fusedvjp.scaffold --------------------------------


def _{name}_inputs(rng, shape, dtype):
    # TODO(scaffold): random valid inputs (never zeros), scaled to the interesting regime,
    # as the positional arrays of ops.{name}: ({arrays}).
    raise NotImplementedError("TODO(scaffold): make_inputs for {name}")


def _{name}_abstract(shape, dtype):
    # TODO(scaffold): the same inputs as jax.ShapeDtypeStruct.
    raise NotImplementedError("TODO(scaffold): abstract_inputs for {name}")


def _{name}_bytes(shape, dtype, mode):
    # TODO(scaffold): the fewest bytes each mode ("fwd", "fwd+bwd") must read + write.
    raise NotImplementedError("TODO(scaffold): bytes for {name}")


def _{name}_flops(shape, dtype, mode):
    # TODO(scaffold): the flops each mode does.
    raise NotImplementedError("TODO(scaffold): flops for {name}")


register(OpSpec(
    name="{name}",
    fn=ops.{name},
    reference=ops.{name}_reference,
    make_inputs=_{name}_inputs,
    abstract_inputs=_{name}_abstract,
    diff_argnums={diff_argnums},
    test_shapes=((37, 784), (1, 1), (3, 1000)),
    options=({options_dict},),
    bench_shapes={{"mnist": [(128, 512)], "llm": [(8192, 4096)]}},
    # TODO(scaffold): include a shape that fits one block and one that needs several.
    lowering_shapes=(((128, 512), "f32"), ((8192, 4096), "bf16")),
    bytes=_{name}_bytes,
    flops=_{name}_flops,
    shape_names=("N", "D"),
))
'''

INIT_TEMPLATE = '''
from fusedvjp.ops.{name} import {name}, {name}_reference  # noqa: E402  (generated by fusedvjp.scaffold)

__all__ += ["{name}", "{name}_reference"]
'''


# Names the templates use for their own arguments: an op's inputs and options must differ.
RESERVED = frozenset({"x", "impl", "g", "residuals", "backend", "block_sizes", "interpret"})


def camel_case(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _fragments(name: str, params: list[str], options: dict[str, str]) -> dict[str, str]:
    """The signature pieces each template needs, for inputs ``x, *params`` and ``options``."""
    arrays = ", ".join(["x", *params])
    opt_names = list(options)
    n_arrays = 1 + len(params)
    return dict(
        name=name,
        camel=camel_case(name),
        arrays=arrays,
        refs_in=", ".join(f"{a}_ref" for a in ["x", *params]),
        kopts="".join(f", {o}" for o in opt_names),
        lsig="".join(f", {o}" for o in opt_names),
        lpass="".join(f", {o}={o}" for o in opt_names),
        kpass="".join(f", {o}={o}" for o in opt_names),
        kwsig=(", *, " + ", ".join(opt_names)) if opt_names else "",
        rsig="".join(f", *, {o}={d}" if i == 0 else f", {o}={d}" for i, (o, d) in enumerate(options.items())),
        rpass="".join(f", {o}={o}" for o in opt_names),
        kdefaults="".join(f", {o}={d}" for o, d in options.items()),
        psig="".join(f", {o}={d}" for o, d in options.items()),
        opt_args="".join(f"{o}, " for o in opt_names),
        nondiff=repr(tuple(range(n_arrays, n_arrays + len(opt_names) + 1))),
        diff_argnums=repr(tuple(range(n_arrays))),
        options_dict="{" + ", ".join(f'"{o}": {d}' for o, d in options.items()) + "}",
        params_ones="".join(", jnp.ones((3,))" for _ in params),
        params_tail="".join(f", {p}" for p in params),
        asarrays="\n    ".join(f"{a} = jnp.asarray({a})" for a in ["x", *params]),
        param_docs="".join(f"      {p}: TODO(scaffold) shape; cast to ``x.dtype``.\n" for p in params)
        + "".join(f"      {o}: TODO(scaffold) (a concrete Python value; default {d}).\n" for o, d in options.items()),
        opt_checks="".join(f"    {o} = check_static_float(\"{o}\", {o}, 0.0, math.inf)  # TODO(scaffold): its range (lo_open=?)\n"
                           for o in opt_names),
        casts="".join(f"    {p} = {p}.astype(x.dtype)  # autodiff returns its cotangent in its own dtype\n"
                      for p in params),
    )


def _parse_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, default = item.partition("=")
        if not sep or not key.isidentifier() or not default:
            raise ValueError(f"an option is NAME=DEFAULT (a Python literal), got {item!r}")
        if key in options:
            raise ValueError(f"option {key!r} is given twice: {key}={options[key]} and {item}")
        options[key] = default
    return options


def _check_default(option: str, default: str) -> None:
    """Raises ValueError unless ``default`` is one Python literal that reads the same in
    a signature (``def op(x, *, eps=DEFAULT)``) as alone: ``abc`` would be a NameError at
    import, ``1,2`` a SyntaxError in the signature (a tuple is written ``(1, 2)``)."""
    try:
        ast.literal_eval(default)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"option {option}'s default {default!r} is not a Python literal (a number, string, "
                         "bytes, bool, None, or a tuple, list, set or dict of them)") from None
    try:
        ast.parse(f"op({option}={default})", mode="eval")
    except SyntaxError:
        raise ValueError(f"option {option}'s default {default!r} is not one expression in a signature "
                         f"(op({option}={default})); a tuple is written in parentheses") from None


def _replace_text(path: pathlib.Path, text: str) -> None:
    """Rewrites ``path`` atomically (a temp file beside it, its mode, then a rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def _write_all(package: pathlib.Path, new: dict[pathlib.Path, str], rewritten: dict[pathlib.Path, str]) -> None:
    """Creates ``package`` and the ``new`` files, then rewrites each of ``rewritten``; on any
    failure (an interrupt included) removes what it created and restores what it
    rewrote, so the tree is as it was and a rerun can write it all."""
    created: list[pathlib.Path] = []
    originals: dict[pathlib.Path, str] = {}
    try:
        package.mkdir()
        created.append(package)
        for path, text in new.items():
            with path.open("x") as f:  # "x": a file that appeared since the checks is not ours to replace
                created.append(path)
                f.write(text)
        for path, text in rewritten.items():
            original = path.read_text()
            _replace_text(path, text)
            originals[path] = original
    except BaseException:
        for path, original in originals.items():
            _replace_text(path, original)
        for path in reversed(created):  # the package's files before the package
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        raise


def scaffold(name: str, root: pathlib.Path, params: list[str] = (), options: dict[str, str] | None = None):
    """Writes the skeleton files for op ``name(x, *params, **options)`` under ``root``:
    all of them, or (on any error) none.

    Returns the paths written or appended to.

    Raises:
      ValueError: a bad name, or a default that is not one Python literal.
      FileNotFoundError: ``root`` lacks ``kernels/``, ``ops/``, ``tests/``,
        ``ops/registry.py`` or ``ops/__init__.py``.
      FileExistsError: a file of the op exists, or the registry already has it.
    """
    options = dict(options or {})
    for ident in [name, *params, *options]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", ident) or keyword.iskeyword(ident):
            raise ValueError(f"names must be lowercase Python identifiers, got {ident!r}")
    if len({name, *params, *options}) != 1 + len(params) + len(options) or RESERVED & {name, *params, *options}:
        raise ValueError(
            f"names must differ from each other and from {sorted(RESERVED)}: {[name, *params, *options]}"
        )
    for option, default in options.items():
        _check_default(option, default)
    registry, init = root / "ops" / "registry.py", root / "ops" / "__init__.py"
    for folder in ("kernels", "ops", "tests"):
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"{root / folder} is not a folder: --root must be the repository root, "
                                    "which holds kernels/, ops/ and tests/")
    for path in (registry, init):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file: --root must be the repository root")
    package = root / "kernels" / name
    files = {
        package / "__init__.py": KERNEL_INIT_TEMPLATE,
        package / "common.py": KERNEL_COMMON_TEMPLATE,
        package / "triton.py": KERNEL_TRITON_TEMPLATE,
        package / "mosaic_tpu.py": KERNEL_MOSAIC_TPU_TEMPLATE,
        root / "ops" / f"{name}.py": OPS_TEMPLATE,
        root / "tests" / f"test_ops_{name}.py": TEST_TEMPLATE,
    }
    # A one-file kernel module of that name (the old layout) would clash with the package.
    for path in (package, root / "kernels" / f"{name}.py", *files):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
    registry_text, init_text = registry.read_text(), init.read_text()
    if f'name="{name}"' in registry_text:
        raise FileExistsError(f"{registry} already registers {name!r}")
    fragments = _fragments(name, list(params), options)
    new = {path: template.format(**fragments) for path, template in files.items()}
    rewritten = {registry: registry_text + REGISTRY_TEMPLATE.format(**fragments),
                 init: init_text + INIT_TEMPLATE.format(**fragments)}
    for path, text in {**new, **rewritten}.items():  # what the checks above missed, before any write
        try:
            compile(text, str(path), "exec")
        except SyntaxError as e:
            raise ValueError(f"{path} would not compile ({e.msg}, line {e.lineno}) with options {options}") from None
    _write_all(package, new, rewritten)
    return [*files, registry, init]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fusedvjp.scaffold", description=__doc__.splitlines()[0])
    p.add_argument("name", help="the op's name, a lowercase identifier, e.g. layer_norm")
    p.add_argument("--params", default="", help="comma-separated array inputs after x, e.g. scale,bias")
    p.add_argument("--option", action="append", default=[], metavar="NAME=DEFAULT",
                   help="a static keyword option and its default, e.g. eps=1e-6 (repeatable)")
    p.add_argument("--root", default=".", help="the repository root (holds kernels/, ops/, tests/)")
    args = p.parse_args(argv)
    try:
        params = [q for q in args.params.split(",") if q]
        touched = scaffold(args.name, pathlib.Path(args.root), params, _parse_options(args.option))
    except (ValueError, OSError) as e:  # FileExistsError, FileNotFoundError, a failed (undone) write
        sys.exit(f"error: {e}")
    for path in touched:
        print(f"wrote {path}")
    print("next: grep -rn 'TODO(scaffold)' on those files; docs/adding-an-op.md walks through them")
    print(f'and add "fusedvjp.kernels.{args.name}" to [tool.setuptools] packages in pyproject.toml')


if __name__ == "__main__":
    main()
