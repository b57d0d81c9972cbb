"""The scaffold writes importable skeletons with TODOs, and refuses to overwrite."""

import importlib.util
import inspect
import py_compile
import shutil
import sys

import pytest

from conftest import REPO
from fusedvjp import scaffold


def _tree(tmp_path):
    for d in ("kernels", "ops", "tests"):
        (tmp_path / d).mkdir()
    for f in ("ops/registry.py", "ops/__init__.py"):
        shutil.copy(REPO / f, tmp_path / f)
    return tmp_path


def _import(path, name, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_writes_skeleton_with_todos(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    touched = scaffold.scaffold("my_op", root, ["scale", "bias"], {"eps": "1e-6"})
    assert {p.name for p in touched} == {"my_op.py", "test_ops_my_op.py", "registry.py", "__init__.py"}
    for path in touched:
        py_compile.compile(str(path), doraise=True)
        if path.name != "registry.py" and path.name != "__init__.py":
            assert "TODO(scaffold)" in path.read_text(), path
    ops_mod = _import(root / "ops" / "my_op.py", "scaffolded_ops_my_op", monkeypatch)
    sig = inspect.signature(ops_mod.my_op)
    assert list(sig.parameters) == ["x", "scale", "bias", "eps", "impl"]
    assert sig.parameters["eps"].default == 1e-6 and sig.parameters["impl"].default == "auto"
    kernels_mod = _import(root / "kernels" / "my_op.py", "scaffolded_kernels_my_op", monkeypatch)
    assert list(inspect.signature(kernels_mod.my_op_fwd).parameters) == [
        "x", "scale", "bias", "eps", "backend", "block_sizes"]
    with pytest.raises(ValueError, match="must be a positive int, got 0"):
        kernels_mod.MyOpBlockSizes(block_rows=0, block_cols=128)
    registry = (root / "ops" / "registry.py").read_text()
    assert 'name="my_op"' in registry and "diff_argnums=(0, 1, 2)" in registry and '"eps": 1e-6' in registry
    assert "from fusedvjp.ops.my_op import my_op" in (root / "ops" / "__init__.py").read_text()


def test_placeholders_raise_rather_than_pass(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    scaffold.scaffold("my_op", root)
    ops_mod = _import(root / "ops" / "my_op.py", "scaffolded_ops_my_op2", monkeypatch)
    with pytest.raises(NotImplementedError, match="TODO"):
        ops_mod.my_op_reference(None)


def test_refuses_bad_names_and_overwrites(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(ValueError, match="lowercase Python identifiers"):
        scaffold.scaffold("My-Op", root)
    with pytest.raises(ValueError, match="must differ"):
        scaffold.scaffold("my_op", root, ["x"])
    with pytest.raises(ValueError, match="NAME=DEFAULT"):
        scaffold._parse_options(["eps"])
    with pytest.raises(FileExistsError, match="already registers 'dense'"):
        scaffold.scaffold("dense", root)
    scaffold.scaffold("my_op", root)
    with pytest.raises(FileExistsError, match="exists; refusing"):
        scaffold.scaffold("my_op", root)
