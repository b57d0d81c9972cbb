"""README.md and docs/*.md name only files, tests and attributes that exist."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("kernels/", "ops/", "model/", "bench/", "fusedvjp/", "tests/", "tests_aot/", "tests_multidevice/", "docs/",
       ".ci/", "pyproject.toml", "constraints.txt")
# `path`, `path::test_name` or `path/module.attribute` in backticks; placeholders (<op>,
# *, my_op: the walk-through's example) are not files.
CITED = re.compile(r"`((?:%s)[^`\s]*)`" % "|".join(re.escape(t) for t in TOP))


def _cited(doc):
    for ref in CITED.findall(doc.read_text()):
        if not re.search(r"[<>*{}]|my_op", ref):
            yield ref


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_files_exist(doc):
    missing = []
    for ref in _cited(doc):
        path, _, test = ref.partition("::")
        if (REPO / path).exists():
            if test and not re.search(rf"^def {test}\b", (REPO / path).read_text(), re.M):
                missing.append(ref)
            continue
        module, _, attribute = path.rpartition(".")  # kernels/_common.BACKENDS
        source = REPO / f"{module}.py"
        if not (module and source.is_file() and re.search(rf"\b{re.escape(attribute)}\b", source.read_text())):
            missing.append(ref)
    assert not missing, f"{doc.name} cites what does not exist: {missing}"


def test_the_check_reads_the_citations():
    """The pattern finds the README's citations of each kind (a check that finds nothing passes anything)."""
    refs = set(_cited(REPO / "README.md"))
    assert {"tests/test_semantics.py", "kernels/_common.BACKENDS",
            "tests/test_bench.py::test_device_check_quick_runs_every_phase"} <= refs, sorted(refs)
