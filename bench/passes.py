"""Full passes over an op's large array in XLA's optimized HLO: the bytes a compile moves.

A memory-bound op's time is the bytes it moves, and at LLM shapes nearly all of them are
reads and writes of one large array (the [N, V] logits, the [M, N] activations). This
counts them in the optimized HLO of an executable (``compiled.as_text()``): every
top-level instruction (a fusion, a custom call such as a cuBLAS gemm, a copy) that takes
a buffer of the large array's element count as an operand *reads* it once, and one that
produces such a buffer *writes* it once. Two exceptions, because they touch a few
elements per row, not the array:

* an operand a fusion only gathers from or slices (the label's logit of a cross-entropy);
* the operand and result of an in-place scatter or dynamic-update-slice (the ``- 1`` that
  autodiff of a gather adds at each row's label): XLA aliases them.

Used by ``tests_aot/test_baseline_passes.py`` (the benchmark's baselines move no more
than what users write) and by the issue's tables.
"""

from __future__ import annotations

import dataclasses
import math
import re

# "%name = SHAPE opcode(operands), attributes" -- SHAPE is one array type or a tuple of them.
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*|c\d+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"\bcalls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
# Instructions that only rename a buffer: no bytes move.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id", "replica-id"}
# Inside a fusion: uses of a parameter that read a few elements per row, not the array.
_SPARSE_READS = {"gather", "dynamic-slice"}
# Results written in place into their first operand (XLA aliases the buffers).
_IN_PLACE = {"scatter", "dynamic-update-slice"}
# Inside a fusion: ops that pass a buffer through unchanged (followed to find its real users).
_VIEWS = {"bitcast", "reshape", "get-tuple-element"}


@dataclasses.dataclass(frozen=True)
class _Instruction:
    root: bool
    name: str
    shape: str
    opcode: str
    args: str  # the text inside the parentheses: operand names, or a parameter's number
    attributes: str

    @property
    def operands(self) -> list[str]:
        return _OPERAND.findall(self.args)

    def arrays(self) -> list[int]:
        """Element counts of the array(s) this instruction produces."""
        return [math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(self.shape)]


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """{computation name: its instructions} and the name of the entry computation."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            root, *fields = m.groups()
            computations[current].append(_Instruction(bool(root), *fields))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _views_of(body: list[_Instruction], name: str) -> set[str]:
    """``name`` and every view of it (bitcast, reshape) in ``body``."""
    views = {name}
    for inst in body:  # HLO lists an instruction after its operands
        if inst.opcode in _VIEWS and set(inst.operands) & views:
            views.add(inst.name)
    return views


def _reads_whole(body: list[_Instruction], param_index: int) -> bool:
    """Whether the fused computation ``body`` reads its parameter ``param_index`` whole:
    False when every use gathers or slices a few elements from it, or is the operand that
    an in-place scatter / dynamic-update-slice writes into."""
    param = next((i for i in body if i.opcode == "parameter" and i.args.strip() == str(param_index)), None)
    if param is None:
        return True
    views = _views_of(body, param.name)
    for inst in body:
        if inst.name in views or not views & set(inst.operands):
            continue
        first_only = [op in views for op in inst.operands] == [True] + [False] * (len(inst.operands) - 1)
        if not (first_only and (inst.opcode in _SPARSE_READS or inst.opcode in _IN_PLACE)):
            return True
    return False


def _in_place_outputs(body: list[_Instruction]) -> int:
    """How many of the fusion's outputs are in-place scatters / dynamic-update-slices into
    one of its parameters (aliased: not a pass)."""
    params = set()
    for inst in body:
        if inst.opcode == "parameter":
            params |= _views_of(body, inst.name)
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    if root is None:
        return 0
    outputs = [by_name[n] for n in root.operands] if root.opcode == "tuple" else [root]
    return sum(1 for out in outputs if out.opcode in _IN_PLACE and out.operands and out.operands[0] in params)


@dataclasses.dataclass(frozen=True)
class Passes:
    """Full passes over buffers of the large array's size: ``reads`` and ``writes``, and
    which instruction made each (``"r name"`` / ``"w name"``) for a failure message."""

    reads: int
    writes: int
    where: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.reads}r+{self.writes}w"

    @property
    def total(self) -> int:
        return self.reads + self.writes


def count(hlo_text: str, elements: int) -> Passes:
    """Full reads and writes of buffers with ``elements`` elements (or more) in the entry
    computation of an optimized HLO module (see the module docstring for what counts).

    Args:
      hlo_text: ``compiled.as_text()`` of an executable.
      elements: the large array's element count (N * V for a cross-entropy's logits).

    Raises:
      ValueError: the text holds no ENTRY computation, or a loop (a while or conditional,
        whose body this count cannot weigh by its trip count).
    """
    computations, entry = _parse(hlo_text)
    shapes = {i.name: i.arrays() for i in computations[entry]}
    reads = writes = 0
    where = []
    for inst in computations[entry]:
        if inst.opcode in _FREE:
            continue
        if inst.opcode in ("while", "conditional", "call"):
            raise ValueError(f"{inst.opcode} {inst.name}: a loop or call body is not counted")
        called = _CALLS.search(inst.attributes)
        body = computations.get(called.group(1), []) if called and inst.opcode == "fusion" else None
        for position, operand in enumerate(inst.operands):
            if inst.opcode in _IN_PLACE and position == 0:
                continue  # written into in place, a few elements per row
            if any(n >= elements for n in shapes.get(operand, [])) and (body is None or _reads_whole(body, position)):
                reads += 1
                where.append(f"r {inst.name}({operand})")
        big = sum(1 for n in inst.arrays() if n >= elements)
        if big and body is not None:
            big -= min(big, _in_place_outputs(body))
        if inst.opcode in _IN_PLACE:
            big = 0
        writes += big
        where.extend([f"w {inst.name}"] * big)
    return Passes(reads, writes, tuple(where))
