"""The scaffold writes compilable skeletons with TODOs, and refuses to overwrite."""

import py_compile
import shutil

import pytest

from conftest import REPO
from fusedvjp import scaffold


def _tree(tmp_path):
    for d in ("kernels", "ops", "tests"):
        (tmp_path / d).mkdir()
    for f in ("ops/registry.py", "ops/__init__.py"):
        shutil.copy(REPO / f, tmp_path / f)
    return tmp_path


def test_writes_skeleton_with_todos(tmp_path):
    root = _tree(tmp_path)
    touched = scaffold.scaffold("my_op", root)
    assert {p.name for p in touched} == {"my_op.py", "test_ops_my_op.py", "registry.py", "__init__.py"}
    for path in touched:
        py_compile.compile(str(path), doraise=True)
    assert "TODO(scaffold)" in (root / "kernels" / "my_op.py").read_text()
    assert "class MyOpBlockSizes" in (root / "kernels" / "my_op.py").read_text()
    assert 'name="my_op"' in (root / "ops" / "registry.py").read_text()
    assert "from fusedvjp.ops.my_op import my_op" in (root / "ops" / "__init__.py").read_text()


def test_refuses_bad_names_and_overwrites(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(ValueError, match="lowercase Python identifier"):
        scaffold.scaffold("My-Op", root)
    with pytest.raises(FileExistsError, match="already registers 'dense'"):
        scaffold.scaffold("dense", root)
    scaffold.scaffold("my_op", root)
    with pytest.raises(FileExistsError, match="exists; refusing"):
        scaffold.scaffold("my_op", root)
