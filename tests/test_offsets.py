"""Large tensors: every memory offset the kernels compute stays correct past 2**31 elements.

Lowering checks at abstract shapes around and past the 4 GiB line (nothing materializes),
which read the compiled kernels' IR -- interpret mode cannot see this class of bug: it pads
blocks and drops out-of-bounds accesses, so a wrapped offset reads garbage silently.

Triton (GPU). The Pallas Triton lowering turns every ref access into ``tt.addptr(splat(
arg), offsets)`` followed by a masked ``tt.load``/``tt.store``. ``offsets`` are *element*
offsets (``addptr`` scales by the element size in 64-bit pointer arithmetic) computed as
``sum_d (block_start_d + index_d) * stride_d`` in one integer type per access: i64 when
the array exceeds 2**32 *bytes*, else i32 (``jax/_src/pallas/triton/lowering.py``,
``_compute_offsets_from_indices``). Triton sign-extends an i32 offset (LLVM GEP), so i32 is
correct iff the largest offset, ``numel - 1``, is at most ``2**31 - 1``: the rule that
matters is *elements <= 2**31*, and the byte rule meets it exactly for 2-byte dtypes
(bf16 [16384, 131072]: 2**31 elements, 4 GiB, i32 offsets up to 2**31 - 1), with room
for 4-byte ones, and breaks for 1-byte dtypes (an int8/bool/float8 array of 2**31 <
numel <= 2**32 elements gets i32 offsets that wrap). The per-dimension parts that feed
an offset (``program_id * block + iota``, loop counters times block sizes) are i32 and
are widened (``arith.extui``) before the multiply by the stride, so they must fit i32
themselves: they are bounded by the dimension plus one block, fine for any dimension
below 2**31 -- unless a kernel flattens by hand (``row * V`` in i32), which is the
refactor this file exists to catch.

The checker (``triton_offset_violations``) reads each kernel's ``tt.func`` (generic MLIR
form, captured from the lowering) and, for every ``tt.addptr``:
  * traces the pointer back to the kernel argument and so to the array's shape/dtype;
  * flags an i32 offset into an array of more than 2**31 elements;
  * for an i64 offset, bounds every i32 value in the offset's def chain by interval
    arithmetic (program ids from the launch grid, ``tt.make_range``, ``scf.for``
    counters, constants, add/sub/mul/div/rem/min/max/select) and flags any that can
    leave [-2**31, 2**31) -- or that it cannot bound;
  * flags any load/store whose pointer it cannot trace, or any pointer op it does not
    know, so a new lowering pattern fails loudly instead of passing unseen.
An i32 offset into an array of at most 2**31 elements is not range-checked: every term is
non-negative, so in-bounds lanes stay below ``numel``; only masked-off lanes of a ragged
edge block can exceed it, and those are never dereferenced. The planted kernels below
prove the checker bites (an int8 array past 2**31 elements; a row base computed by hand).

Mosaic TPU. A Mosaic kernel body never computes an HBM address: it indexes its VMEM
blocks (at most a few MiB) with constant or small ``index`` values. HBM addresses come
from the BlockSpec index maps, lowered as ``transform_i`` functions from the i32 grid
indices to i32 *block* indices; the Mosaic pipeline then DMAs the window that starts at
element ``block_index_d * window_d`` in each dimension ``d``. What the lowered module
shows, and what is checked here, is the part in our code: every block index stays in
``[0, cdiv(dim_d, window_d))`` over the whole grid, so each per-dimension start is below
the dimension (< 2**31 for any array whose dims are), and every i32 value the kernel body
derives from the grid indices (``j * block_v + iota``) fits i32. The linearization of
those per-dimension starts into a byte address (in the Mosaic compiler and the DMA
descriptors, in libtpu) is not in the lowered module; only a run on a TPU can check it. (A
kernel that DMAs from HBM itself, ``memory_space=pl.ANY``, would slice HBM with i32/index
values in its body, which the body check bounds.)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from conftest import KERNEL_CUSTOM_CALL, lower_for
from fusedvjp import ops
from fusedvjp.kernels import _common

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
S = jax.ShapeDtypeStruct


# --- a small reader of generic-form MLIR -----------------------------------------------
#
# Both lowerings print their module with `print_generic_op_form=True`: one op per line,
#   %r = "dialect.op"(%a, %b) <{properties}> : (operand types) -> result type
# region ops end their line with `({`, list block arguments as `^bb0(%arg: type, ...):`
# and close with `}) {attributes} : (types) -> (result types)`.


@dataclasses.dataclass
class Op:
    name: str
    results: list[str]
    operands: list[str]
    attrs: str
    result_types: list[str]
    line: str
    parent: Op | None = None  # the region op this op sits in
    block_args: list[str] = dataclasses.field(default_factory=list)  # of its region(s), in order


@dataclasses.dataclass
class Func:
    op: Op
    name: str
    defs: dict[str, tuple[Op, int]]  # value -> (defining op, result index); block args: index -1-k
    types: dict[str, str]
    ops: list[Op]


_OP_RE = re.compile(
    r'^\s*(?:(?P<res>%[\w]+)(?::(?P<nres>\d+))?\s*=\s*)?"(?P<op>[\w.]+)"\((?P<args>[^()]*)\)(?P<rest>.*)$'
)
_BLOCK_RE = re.compile(r"^\s*\^bb\d+(?:\((?P<args>.*)\))?:\s*$")
_CLOSE_RE = re.compile(r"^\s*\}\)(?P<rest>.*)$")


def _split_top(text: str) -> list[str]:
    """Splits on commas outside <>, (), [] and {}."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _result_types(signature: str) -> list[str]:
    tail = signature.rsplit(" -> ", 1)[-1].strip() if " -> " in signature else ""
    if tail.startswith("(") and tail.endswith(")"):
        return _split_top(tail[1:-1])
    return [tail] if tail else []


def parse_funcs(text: str) -> dict[str, Func]:
    """The module's top-level functions (``tt.func`` / ``func.func``) by symbol name."""
    funcs: dict[str, Func] = {}
    stack: list[Op] = []
    func: Func | None = None
    for line in text.splitlines():
        if m := _CLOSE_RE.match(line):
            op = stack.pop()
            op.attrs += m["rest"]
            op.result_types = _result_types(m["rest"])
            for i, r in enumerate(op.results):
                if i < len(op.result_types):
                    func.types[r] = op.result_types[i]
            continue
        if m := _BLOCK_RE.match(line):
            owner = stack[-1]
            for arg in _split_top(m["args"] or ""):
                name, typ = arg.split(":", 1)
                func.defs[name.strip()] = (owner, -1 - len(owner.block_args))
                func.types[name.strip()] = typ.strip()
                owner.block_args.append(name.strip())
            continue
        m = _OP_RE.match(line)
        if not m:
            continue
        res, nres = m["res"], m["nres"]
        results = [f"{res}#{i}" for i in range(int(nres))] if nres else ([res] if res else [])
        rest = m["rest"]
        opens = rest.rstrip().endswith("({")
        op = Op(
            name=m["op"],
            results=results,
            operands=[a.strip() for a in m["args"].split(",") if a.strip()],
            attrs=rest,
            result_types=[] if opens else _result_types(rest),
            line=line.strip(),
            parent=stack[-1] if stack else None,
        )
        if op.name in ("tt.func", "func.func") and len(stack) == 1:
            sym = re.search(r'sym_name = "([\w$.]+)"', rest)
            func = Func(op=op, name=sym[1] if sym else f"func{len(funcs)}", defs={}, types={}, ops=[])
            funcs[func.name] = func
        elif func is not None:
            func.ops.append(op)
            for i, r in enumerate(results):
                func.defs[r] = (op, i)
                if i < len(op.result_types):
                    func.types[r] = op.result_types[i]
        if opens:
            stack.append(op)
    return funcs


def int_width(typ: str | None) -> int | None:
    """Bit width of an integer scalar/tensor/vector type (``index`` counts as 64), else None."""
    if typ is None:
        return None
    m = re.fullmatch(r"(?:(?:tensor|vector)<(?:[\d?]+x)*)?(i\d+|index)>?", typ.strip())
    if not m:
        return None
    return 64 if m[1] == "index" else int(m[1][1:])


def _shape(typ: str) -> list[int]:
    m = re.match(r"(?:tensor|vector)<((?:\d+x)*)", typ)
    return [int(d) for d in m[1].split("x") if d] if m else []


def _attr_int(op: Op, key: str) -> int | None:
    m = re.search(rf"\b{key} = (-?\d+)", op.attrs)
    return int(m[1]) if m else None


class Ranges:
    """Interval bounds [lo, hi] of integer SSA values (over all elements of a tensor), or
    None where the value is not bounded by anything this reader understands (data loaded
    from memory, loop-carried values)."""

    _SAME = {
        "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "vector.broadcast",
        "vector.shape_cast", "arith.extsi", "arith.index_cast", "arith.index_castui",
    }

    def __init__(
        self,
        func: Func,
        program_ids: dict[int, int] | None = None,
        args: dict[str, tuple[int, int]] | None = None,
    ):
        self.func = func
        self.program_ids = program_ids or {}  # axis -> launch grid size
        self.memo: dict[str, tuple[int, int] | None] = dict(args or {})

    def of(self, value: str) -> tuple[int, int] | None:
        if value not in self.memo:
            self.memo[value] = None  # cycles (loop-carried values) stay unbounded
            self.memo[value] = self._compute(value)
        return self.memo[value]

    def _compute(self, value):
        if value not in self.func.defs:
            return None
        op, idx = self.func.defs[value]
        if idx < 0:  # a block argument
            if op.name == "scf.for" and idx == -1:  # the induction variable
                lb, ub, step = (self.of(v) for v in op.operands[:3])
                if lb and ub and step and step[0] > 0:
                    return lb[0], max(lb[0], ub[1] - 1)
            return None
        n = op.name
        ins = [self.of(v) for v in op.operands]
        if n == "arith.constant":
            if m := re.search(r"value = (-?\d+) : (?:i\d+|index)\b", op.attrs):
                return int(m[1]), int(m[1])
            if m := re.search(r"value = dense<(-?\d+)>", op.attrs):
                return int(m[1]), int(m[1])
            if m := re.search(r"value = dense<\[([-\d, ]+)\]>", op.attrs):
                vals = [int(v) for v in m[1].split(",")]
                return min(vals), max(vals)
            return None
        if n == "tt.get_program_id":
            size = self.program_ids.get(_attr_int(op, "axis"))
            return (0, size - 1) if size else None
        if n == "tt.make_range":
            return _attr_int(op, "start"), _attr_int(op, "end") - 1
        if n == "tpu.iota":
            shape = _shape(op.result_types[0])
            dims = re.search(r"dimensions = array<i32(?::([\d, ]+))?>", op.attrs)
            axes = [int(d) for d in dims[1].split(",")] if dims and dims[1] else range(len(shape))
            return 0, max(shape[a] for a in axes) - 1
        if n == "arith.cmpi":
            return 0, 1
        if n in self._SAME:
            return ins[0]
        if n == "arith.extui":
            if ins[0] is None:
                return None
            return ins[0] if ins[0][0] >= 0 else (0, 2 ** int_width(self.func.types.get(op.operands[0])) - 1)
        if n == "arith.trunci":
            width = int_width(op.result_types[0])
            r = ins[0]
            return r if r and -(2 ** (width - 1)) <= r[0] and r[1] < 2 ** (width - 1) else None
        if any(r is None for r in ins[: 3 if n == "arith.select" else 2]):
            return None
        if n == "arith.select":
            return min(ins[1][0], ins[2][0]), max(ins[1][1], ins[2][1])
        (alo, ahi), (blo, bhi) = ins[:2]
        if n == "arith.addi":
            return alo + blo, ahi + bhi
        if n == "arith.subi":
            return alo - bhi, ahi - blo
        if n == "arith.muli":
            corners = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
            return min(corners), max(corners)
        if n in ("arith.maxsi", "arith.maxui"):
            return max(alo, blo), max(ahi, bhi)
        if n in ("arith.minsi", "arith.minui"):
            return min(alo, blo), min(ahi, bhi)
        if alo < 0 or blo <= 0:
            return None  # the rest: non-negative by positive only
        if n in ("arith.divsi", "arith.divui", "arith.floordivsi"):
            return alo // bhi, ahi // blo
        if n in ("arith.ceildivsi", "arith.ceildivui"):
            return -(-alo // bhi), -(-ahi // blo)
        if n in ("arith.remsi", "arith.remui"):
            return 0, min(ahi, bhi - 1)
        if n == "arith.andi":
            return 0, min(ahi, bhi)
        return None


# --- Triton: capture the kernels' tt.func and check their offsets -------------------------


@dataclasses.dataclass
class TritonKernel:
    name: str
    text: str
    grid: tuple[int, ...]
    buffers: list[jax.ShapeDtypeStruct]  # per tt.func argument: the whole array it points to


@dataclasses.dataclass
class Access:
    """One tt.addptr into a kernel argument."""

    kernel: str
    arg: int
    buffer: jax.ShapeDtypeStruct
    bits: int
    max_offset: int | None


def lower_triton(fn: Callable, *args) -> tuple[str, list[TritonKernel]]:
    """Lowers ``fn`` for an abstract H100; returns the module text and every Triton kernel in it."""
    from jax._src.pallas.triton import lowering as triton_lowering

    kernels: list[TritonKernel] = []
    stock = triton_lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, *rest, **kwargs):
        result = stock(jaxpr, grid_mapping, *rest, **kwargs)
        kernels.append(
            TritonKernel(
                name=jaxpr.debug_info.func_name,
                text=result.module.operation.get_asm(print_generic_op_form=True),
                grid=tuple(result.grid),
                buffers=[S(bm.array_aval.shape, bm.array_aval.dtype) for bm in grid_mapping.block_mappings],
            )
        )
        return result

    # The Mosaic GPU kernels would take the aligned bf16 dense cases on an H100; they
    # address memory only through TMA descriptors (a 64-bit base, one int32 coordinate
    # per dimension), so it is the Triton kernels -- what other GPUs and the other
    # shapes run -- whose offsets are checked here.
    with mock.patch.object(triton_lowering, "lower_jaxpr_to_triton_module", capture), \
            mock.patch.object(_common, "is_hopper", lambda: False):
        text = lower_for("cuda", fn, *args)
    assert kernels and len(kernels) == text.count(KERNEL_CUSTOM_CALL["cuda"]), "every Triton kernel captured"
    return text, kernels


_PTR_SAME = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans")
_MEMORY_OPS = ("tt.load", "tt.store", "tt.atomic_rmw", "tt.atomic_cas")


def _offset_chain_violations(ranges: Ranges, offset: str) -> list[str]:
    """Every i32 value an i64 offset is computed from must be bounded and fit i32."""
    found, seen, todo = [], set(), [offset]
    func = ranges.func
    while todo:
        value = todo.pop()
        if value in seen or value not in func.defs:
            continue
        seen.add(value)
        width = int_width(func.types.get(value))
        if width is None or width == 1:
            continue
        op, idx = func.defs[value]
        if width == 32:
            r = ranges.of(value)
            if r is None:
                found.append(f"i32 {value} (`{op.line[:120]}`) feeds a 64-bit offset and cannot be bounded")
            elif r[0] < I32_MIN or r[1] > I32_MAX:
                found.append(f"i32 {value} (`{op.line[:120]}`) reaches [{r[0]}, {r[1]}]: it wraps before it is widened")
        if idx >= 0:
            todo.extend(op.operands)
    return found


def triton_offset_violations(kernel: TritonKernel) -> tuple[list[str], list[Access]]:
    """(violations, accesses) of one kernel; see the module docstring for the rules."""
    (func,) = parse_funcs(kernel.text).values()
    args = func.op.block_args
    assert len(args) == len(kernel.buffers), (kernel.name, args, kernel.buffers)
    ranges = Ranges(func, program_ids=dict(enumerate(kernel.grid)))
    violations: list[str] = []
    accesses: list[Access] = []

    def root_of(ptr: str) -> int | None:
        """The kernel argument a pointer value points into (through addptr, splat, broadcast...)."""
        while ptr not in args:
            if ptr not in func.defs or func.defs[ptr][1] < 0:
                return None
            op, _ = func.defs[ptr]
            if op.name not in ("tt.addptr", *_PTR_SAME):
                return None
            ptr = op.operands[0]
        return args.index(ptr)

    for op in func.ops:
        where = f"{kernel.name}: `{op.line[:140]}`"
        if any("!tt.ptr" in t for t in op.result_types) and op.name not in ("tt.addptr", *_PTR_SAME):
            violations.append(f"{where}: pointer op the checker does not analyse")
        if op.name in _MEMORY_OPS and root_of(op.operands[0]) is None:
            violations.append(f"{where}: pointer not traced to a kernel argument")
        if op.name != "tt.addptr":
            continue
        arg = root_of(op.results[0])
        if arg is None:
            violations.append(f"{where}: pointer not traced to a kernel argument")
            continue
        buffer = kernel.buffers[arg]
        numel = math.prod(buffer.shape)
        offset = op.operands[1]
        bits = int_width(func.types.get(offset))
        bound = ranges.of(offset)
        accesses.append(Access(kernel.name, arg, buffer, bits, bound and bound[1]))
        label = f"{kernel.name}: arg {arg} {buffer.dtype}{list(buffer.shape)} ({numel} elements)"
        if bits not in (32, 64):
            violations.append(f"{label}: offset {offset} has type {func.types.get(offset)}")
        elif bits == 32 and numel > 2**31:
            violations.append(f"{label}: i32 offsets ({offset}) into more than 2**31 elements wrap")
        elif bits == 64:
            violations.extend(f"{label}: {v}" for v in _offset_chain_violations(ranges, offset))
    return violations, accesses


def summary(accesses: list[Access]) -> str:
    """One line per (kernel, argument): the array, the offset widths and the largest offset."""
    rows: dict[tuple[str, int], Access] = {}
    bits: dict[tuple[str, int], set] = {}
    for a in accesses:
        key = (a.kernel, a.arg)
        bits.setdefault(key, set()).add(a.bits)
        if key not in rows or (a.max_offset or 0) > (rows[key].max_offset or 0):
            rows[key] = a
    return "\n".join(
        f"  {k}[{arg}] {a.buffer.dtype}{list(a.buffer.shape)}: i{'/i'.join(map(str, sorted(bits[k, arg])))}"
        f" offsets, max {a.max_offset} (2**31 - 1 = {I32_MAX})"
        for (k, arg), a in rows.items()
    )


def assert_triton_offsets_bounded(fn: Callable, *args) -> tuple[list[TritonKernel], list[Access]]:
    """Lowers ``fn(*args)``'s Triton kernels and fails on any 32-bit offset that can pass
    2**31; returns the kernels and every access traced, for further checks."""
    _, kernels = lower_triton(fn, *args)
    violations, accesses = [], []
    for kernel in kernels:
        v, a = triton_offset_violations(kernel)
        violations += v
        accesses += a
    assert not violations, "\n".join(violations) + "\n" + summary(accesses)
    return kernels, accesses


# --- the public ops, forward and backward ----------------------------------------------------


def xent_int(n, v, dtype):
    def f(logits, labels):
        loss, vjp = jax.vjp(
            lambda x: ops.softmax_cross_entropy_with_integer_labels(
                x, labels, label_smoothing=0.1, z_loss=1e-4, impl="pallas"
            ),
            logits,
        )
        return loss, vjp(jnp.ones_like(loss))

    return f, (S((n, v), dtype), S((n,), jnp.int32))


def xent_prob(n, v, dtype, label_dtype=None):
    def f(logits, labels):
        loss, vjp = jax.vjp(lambda x, t: ops.softmax_cross_entropy(x, t, impl="pallas"), logits, labels)
        return loss, vjp(jnp.ones_like(loss))

    return f, (S((n, v), dtype), S((n, v), label_dtype or dtype))


def dense_tanh(m, k, n, dtype):
    def f(x, w, b):
        a, vjp = jax.vjp(lambda *p: ops.dense_tanh(*p, impl="pallas"), x, w, b)
        return a, vjp(a)

    return f, (S((m, k), dtype), S((k, n), dtype), S((n,), dtype))


def layer_norm(n, d, dtype):
    def f(x, scale, bias):
        y, vjp = jax.vjp(lambda *p: ops.layer_norm(*p, impl="pallas"), x, scale, bias)
        return y, vjp(y)

    return f, (S((n, d), dtype), S((d,), dtype), S((d,), dtype))


# (id, builder, its arguments). "edge": arrays of 2**31 bf16 elements = 4 GiB exactly, the
# largest the lowering gives i32 offsets; "past": arrays beyond 4 GiB (i64 offsets).
CASES = [
    ("xent-int-edge-16384x131072-bf16", xent_int, (16384, 131072, jnp.bfloat16)),
    ("xent-int-past-32768x131072-bf16", xent_int, (32768, 131072, jnp.bfloat16)),
    ("xent-int-past-16384x131072-f32", xent_int, (16384, 131072, jnp.float32)),
    ("xent-int-past-ragged-20000x128256-bf16", xent_int, (20000, 128256, jnp.bfloat16)),
    ("xent-prob-past-32768x131072-bf16", xent_prob, (32768, 131072, jnp.bfloat16)),
    ("dense-tanh-edge-2097152x1024x1024-bf16", dense_tanh, (2**21, 1024, 1024, jnp.bfloat16)),
    ("dense-tanh-past-ragged-3000000x1000x1000-bf16", dense_tanh, (3_000_000, 1000, 1000, jnp.bfloat16)),
    ("layer-norm-edge-2097152x1024-bf16", layer_norm, (2**21, 1024, jnp.bfloat16)),
    ("layer-norm-past-ragged-3000000x1000-bf16", layer_norm, (3_000_000, 1000, jnp.bfloat16)),
]


def _nbytes(a) -> int:
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


@pytest.mark.parametrize("case, build, params", CASES, ids=[c[0] for c in CASES])
def test_triton_offsets_fit_their_integer_type(case, build, params):
    fn, args = build(*params)
    kernels, accesses = assert_triton_offsets_bounded(fn, *args)
    # Every argument of every kernel was read or written through a traced offset.
    for kernel in kernels:
        assert {a.arg for a in accesses if a.kernel == kernel.name} == set(range(len(kernel.buffers))), kernel.name
    # Past 4 GiB the lowering still switches to i64 (what every case past the line relies on).
    past = [a for a in accesses if _nbytes(a.buffer) > 2**32]
    assert {a.bits for a in past} == ({64} if "past" in case else set()), summary(accesses)
    if "edge" in case:
        # Exactly at the line the bound is tight: offsets into the 2**31-element arrays reach
        # numel - 1 = 2**31 - 1 and no further (these shapes have no ragged block).
        edge = [a for a in accesses if math.prod(a.buffer.shape) == 2**31]
        assert edge and max(a.max_offset for a in edge) == I32_MAX, summary(accesses)


def test_triton_offsets_float8_probability_labels_past_2_31_elements():
    """2**32 float8 labels are 2**32 bytes, not over the lowering's 64-bit line: they got
    i32 offsets that wrapped (this checker found it) until the kernels' entry widened
    1-byte probabilities to bf16 (``softmax_cross_entropy._kernel_labels``)."""
    fn, args = xent_prob(32768, 131072, jnp.bfloat16, jnp.float8_e4m3fn)
    _, kernels = lower_triton(fn, *args)
    violations = [v for k in kernels for v in triton_offset_violations(k)[0]]
    assert not violations, "\n".join(violations)


# --- the checker bites: planted kernels -------------------------------------------------------


def _tile_copy(n, v, dtype, block=(2, 2048)):
    """A Triton tile copy of an [n, v] array: offsets as the real kernels compute them."""

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def f(x):
        spec = pl.BlockSpec(block, lambda i, j: (i, j))
        return pl.pallas_call(
            kernel,
            grid=(pl.cdiv(n, block[0]), pl.cdiv(v, block[1])),
            in_specs=[spec],
            out_specs=spec,
            out_shape=S((n, v), dtype),
            compiler_params=_common.triton_params(4, 1),
            name="planted_tile_copy",
        )(x)

    return f, (S((n, v), dtype),)


def _row_sum(n, v, *, by_hand, block_v=2048):
    """Row sums of an [n, v] bf16 array. ``by_hand`` passes it flat ([n * v]) and computes
    the row base as ``program_id * v`` in int32 -- the refactor that wraps past 2**31
    elements; otherwise it stays [n, v] and the lowering computes the offsets."""

    def kernel(x_ref, o_ref):
        row = pl.program_id(0)

        def body(j, acc):
            if by_hand:
                block = x_ref[pl.ds(row * v + j * block_v, block_v)]
            else:
                block = x_ref[pl.ds(row, 1), pl.ds(j * block_v, block_v)][0]
            return acc + jnp.sum(block.astype(jnp.float32))

        o_ref[0] = jax.lax.fori_loop(0, v // block_v, body, jnp.float32(0))

    def f(x):
        x = x.reshape(n * v) if by_hand else x
        return pl.pallas_call(
            kernel,
            grid=(n,),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((1,), lambda i: (i,)),
            out_shape=S((n,), jnp.float32),
            compiler_params=_common.triton_params(4, 1),
            name="planted_row_sum",
        )(x)

    return f, (S((n, v), jnp.bfloat16),)


def _all_violations(fn, args) -> list[str]:
    _, kernels = lower_triton(fn, *args)
    return [v for k in kernels for v in triton_offset_violations(k)[0]]


def test_checker_flags_i32_offsets_into_a_1_byte_array_past_2_31_elements():
    # int8 [32768, 131072]: 2**32 elements in 2**32 bytes -- not above the lowering's
    # 2**32-byte line, so it gets i32 offsets, which wrap at 2**31.
    violations = _all_violations(*_tile_copy(32768, 131072, jnp.int8))
    assert violations and all("i32 offsets" in v and "int8[32768, 131072]" in v for v in violations), violations
    # The same copy in bf16 (i64 offsets) and in int8 below 2**31 elements is clean.
    assert not _all_violations(*_tile_copy(32768, 131072, jnp.bfloat16))
    assert not _all_violations(*_tile_copy(16384, 131072, jnp.int8))


def test_checker_flags_a_row_base_computed_in_int32():
    violations = _all_violations(*_row_sum(32768, 131072, by_hand=True))
    assert violations and any("wraps before it is widened" in v for v in violations), violations
    assert not _all_violations(*_row_sum(32768, 131072, by_hand=False))
    # Below 2**31 elements the hand-computed base fits i32 and the checker says so.
    assert not _all_violations(*_row_sum(8192, 131072, by_hand=True))


# --- Mosaic TPU: block indices from the index maps, i32 values in the kernel bodies --------


@dataclasses.dataclass
class MosaicKernel:
    name: str
    text: str
    buffers: list[jax.ShapeDtypeStruct]  # per window_params entry: the whole array


def lower_tpu(fn: Callable, *args) -> tuple[str, list[MosaicKernel]]:
    """Lowers ``fn`` for an abstract TPU; returns the module text and every Mosaic kernel in it."""
    from jax._src.pallas.mosaic import lowering as mosaic_lowering

    kernels: list[MosaicKernel] = []
    stock = mosaic_lowering.lower_jaxpr_to_pipelined_module

    def capture(ctx, grid_mapping, jaxpr, *rest, **kwargs):
        module = stock(ctx, grid_mapping, jaxpr, *rest, **kwargs)
        kernels.append(
            MosaicKernel(
                name=jaxpr.debug_info.func_name,
                text=module.operation.get_asm(print_generic_op_form=True),
                buffers=[S(bm.array_aval.shape, bm.array_aval.dtype) for bm in grid_mapping.block_mappings],
            )
        )
        return module

    with mock.patch.object(mosaic_lowering, "lower_jaxpr_to_pipelined_module", capture):
        text = lower_for("tpu", fn, *args)
    assert kernels and len(kernels) == text.count(KERNEL_CUSTOM_CALL["tpu"]), "every Mosaic kernel captured"
    return text, kernels


def _i64_array(op: Op, key: str) -> list[int] | None:
    m = re.search(rf"{key} = array<i64(?::([-\d, ]+))?>", op.attrs)
    return [int(x) for x in m[1].split(",")] if m and m[1] else ([] if m else None)


def tpu_index_violations(kernel: MosaicKernel) -> tuple[list[str], list[str]]:
    """(violations, one line per window: its block-index ranges and largest element start)."""
    funcs = parse_funcs(kernel.text)
    (main,) = [f for f in funcs.values() if "window_params" in f.op.attrs]
    grid = _i64_array(main.op, "iteration_bounds")
    windows = re.findall(r"\{([^{}]*)\}", main.op.attrs[main.op.attrs.index("window_params") :])
    windows = windows[: len(kernel.buffers)]
    assert len(windows) == len(kernel.buffers), (kernel.name, windows, kernel.buffers)
    violations, lines = [], []

    def grid_args(func: Func) -> dict[str, tuple[int, int]]:
        return {a: (0, b - 1) for a, b in zip(func.op.block_args, grid)}

    for i, (window, buffer) in enumerate(zip(windows, kernel.buffers)):
        transform = re.search(r"transform_indices = @(\w+)", window)
        if not transform:
            lines.append(f"  {kernel.name}[{i}] {buffer.dtype}{list(buffer.shape)}: no window (whole array)")
            continue
        bounds = [int(x) for x in re.search(r"window_bounds = array<i64: ([\d, ]+)>", window)[1].split(",")]
        func = funcs[transform[1]]
        ranges = Ranges(func, args=grid_args(func))
        (ret,) = [op for op in func.ops if op.name == "func.return" and op.parent is func.op]
        label = f"{kernel.name}[{i}] {buffer.dtype}{list(buffer.shape)} window {bounds}"
        starts = []
        for d, (value, w, size) in enumerate(zip(ret.operands, bounds, buffer.shape)):
            r = ranges.of(value)
            # i32, or i64 under x64 (where Python ints in index maps are int64): both bounded.
            if int_width(func.types.get(value)) not in (32, 64) or r is None:
                violations.append(f"{label}: block index {d} ({value}: {func.types.get(value)}) cannot be bounded")
                continue
            if r[0] < 0 or r[1] > pl.cdiv(size, w) - 1:
                violations.append(f"{label}: block index {d} ranges over {r}, outside [0, {pl.cdiv(size, w)}) blocks")
            if r[1] * w > I32_MAX:
                violations.append(f"{label}: block start {d} reaches {r[1] * w} elements, past int32")
            starts.append(f"{r[1]} (x{w} = {r[1] * w})")
        lines.append(f"  {label}: largest block index per dim {', '.join(starts)}")

    # The kernel body: every i32/index value that can be bounded stays inside int32.
    ranges = Ranges(main, args=grid_args(main))
    for op in main.ops:
        for value in op.results:
            if int_width(main.types.get(value)) not in (32, 64):
                continue
            r = ranges.of(value)
            if r is not None and (r[0] < I32_MIN or r[1] > I32_MAX):
                violations.append(f"{kernel.name}: `{op.line[:140]}` reaches {r}, past int32")
    return violations, lines


@pytest.mark.parametrize("case, build, params", CASES, ids=[c[0] for c in CASES])
def test_tpu_block_indices_stay_inside_the_arrays(case, build, params):
    fn, args = build(*params)
    _, kernels = lower_tpu(fn, *args)
    violations, lines = [], []
    for kernel in kernels:
        v, w = tpu_index_violations(kernel)
        violations += v
        lines += w
    assert not violations, "\n".join(violations + lines)


def _tpu_tile_copy(n, v, index_map, *, write_flat_index=False, block=(8, 2048)):
    """A Mosaic tile copy of an [n, v] int32 array; ``write_flat_index`` stores each
    element's flat index ``row * v + col``, computed in int32 in the kernel body."""

    def kernel(x_ref, o_ref):
        if write_flat_index:
            i, j = pl.program_id(0), pl.program_id(1)
            rows = i * block[0] + jax.lax.broadcasted_iota(jnp.int32, block, 0)
            cols = j * block[1] + jax.lax.broadcasted_iota(jnp.int32, block, 1)
            o_ref[...] = rows * v + cols
        else:
            o_ref[...] = x_ref[...]

    def f(x):
        spec = pl.BlockSpec(block, index_map)
        return pl.pallas_call(
            kernel,
            grid=(pl.cdiv(n, block[0]), pl.cdiv(v, block[1])),
            in_specs=[spec],
            out_specs=spec,
            out_shape=S((n, v), jnp.int32),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            name="planted_tpu_copy",
        )(x)

    return f, (S((n, v), jnp.int32),)


def _tpu_violations(fn, args) -> list[str]:
    _, kernels = lower_tpu(fn, *args)
    return [v for k in kernels for v in tpu_index_violations(k)[0]]


def test_tpu_checker_flags_element_offsets_returned_as_block_indices():
    n, v = 32768, 131072
    violations = _tpu_violations(*_tpu_tile_copy(n, v, lambda i, j: (i * 8, j * 2048)))
    assert len(violations) == 4 and all("outside [0, " in x for x in violations), violations
    assert not _tpu_violations(*_tpu_tile_copy(n, v, lambda i, j: (i, j)))


def test_tpu_checker_flags_a_flat_index_computed_in_int32():
    violations = _tpu_violations(*_tpu_tile_copy(32768, 131072, lambda i, j: (i, j), write_flat_index=True))
    assert violations and all("past int32" in x for x in violations), violations
    assert not _tpu_violations(*_tpu_tile_copy(8192, 131072, lambda i, j: (i, j), write_flat_index=True))
