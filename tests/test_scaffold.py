"""The scaffold writes importable skeletons with TODOs, and refuses to overwrite; it writes
all of them or nothing."""

import importlib.util
import inspect
import os
import pathlib
import py_compile
import shutil
import sys

import jax.numpy as jnp
import pytest

from conftest import REPO
from fusedvjp import scaffold
from fusedvjp.kernels import _common

KERNEL_FILES = ("__init__.py", "common.py", "triton.py", "mosaic_tpu.py")


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


@pytest.fixture
def import_kernels():
    """Imports a generated kernel package under its real name, ``fusedvjp.kernels.<op>``
    (its modules import each other by it), and forgets it and its modules afterwards."""
    imported = []

    def load(root, op):
        name = f"fusedvjp.kernels.{op}"
        package = root / "kernels" / op
        spec = importlib.util.spec_from_file_location(
            name, package / "__init__.py", submodule_search_locations=[str(package)]
        )
        module = importlib.util.module_from_spec(spec)
        imported.append(name)
        sys.modules[name] = module
        spec.loader.exec_module(module)  # imports common, triton, mosaic_tpu from `package`
        return module

    yield load
    for name in imported:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_writes_skeleton_with_todos(tmp_path, monkeypatch, import_kernels):
    root = _tree(tmp_path)
    touched = scaffold.scaffold("my_op", root, ["scale", "bias"], {"eps": "1e-6"})
    assert {p.relative_to(root).as_posix() for p in touched} == {
        *(f"kernels/my_op/{f}" for f in KERNEL_FILES),
        "ops/my_op.py", "tests/test_ops_my_op.py", "ops/registry.py", "ops/__init__.py",
    }
    for path in touched:
        py_compile.compile(str(path), doraise=True)
        if path.relative_to(root).as_posix() not in ("ops/registry.py", "ops/__init__.py"):
            assert "TODO(scaffold)" in path.read_text(), path
    ops_mod = _import(root / "ops" / "my_op.py", "scaffolded_ops_my_op", monkeypatch)
    sig = inspect.signature(ops_mod.my_op)
    assert list(sig.parameters) == ["x", "scale", "bias", "eps", "impl"]
    assert sig.parameters["eps"].default == 1e-6 and sig.parameters["impl"].default == "auto"

    kernels_mod = import_kernels(root, "my_op")
    assert list(inspect.signature(kernels_mod.my_op_fwd).parameters) == [
        "x", "scale", "bias", "eps", "backend", "block_sizes"]
    assert list(inspect.signature(kernels_mod.my_op_bwd).parameters) == [
        "x", "scale", "bias", "residuals", "g", "eps", "backend", "block_sizes"]
    with pytest.raises(ValueError, match="must be a positive int, got 0"):
        kernels_mod.MyOpBlockSizes(block_rows=0, block_cols=128)
    # One module per backend, each in the table platform_dispatch chooses from, with one
    # launcher signature; the block sizes live in common.py, shared by all.
    assert list(kernels_mod._BACKENDS) == ["triton", "mosaic_tpu"]
    assert set(kernels_mod._BACKENDS) <= set(_common.BACKEND_NAMES)
    for backend, module in kernels_mod._BACKENDS.items():
        assert module.__name__ == f"fusedvjp.kernels.my_op.{backend}"
        assert module.MyOpBlockSizes is kernels_mod.MyOpBlockSizes
        assert list(inspect.signature(module.fwd).parameters) == [
            "x", "scale", "bias", "eps", "block_sizes", "interpret"]
        assert list(inspect.signature(module.bwd).parameters) == [
            "x", "scale", "bias", "residuals", "g", "eps", "block_sizes", "interpret"]
        assert callable(module.default_block_sizes) and callable(module.check_block_sizes)
        assert 'name="fusedvjp_my_op_fwd"' in (root / "kernels" / "my_op" / f"{backend}.py").read_text()
    registry = (root / "ops" / "registry.py").read_text()
    assert 'name="my_op"' in registry and "diff_argnums=(0, 1, 2)" in registry and '"eps": 1e-6' in registry
    assert "from fusedvjp.ops.my_op import my_op" in (root / "ops" / "__init__.py").read_text()
    # The kernel test calls the launchers with the options (they are keyword-only there).
    assert "my_op_fwd(*args, eps=1e-6, backend=backend" in (root / "tests" / "test_ops_my_op.py").read_text()


def test_placeholders_raise_rather_than_pass(tmp_path, monkeypatch, import_kernels):
    root = _tree(tmp_path)
    scaffold.scaffold("my_op", root)
    ops_mod = _import(root / "ops" / "my_op.py", "scaffolded_ops_my_op2", monkeypatch)
    with pytest.raises(NotImplementedError, match="TODO"):
        ops_mod.my_op_reference(None)
    kernels_mod = import_kernels(root, "my_op")
    block_sizes = kernels_mod.MyOpBlockSizes
    # default() and check() reach each backend module's placeholders.
    with pytest.raises(NotImplementedError, match=r"TODO\(scaffold\): my_op default_block_sizes \(Triton\)"):
        block_sizes.default(37, 300, jnp.float32, "triton")
    with pytest.raises(NotImplementedError, match=r"TODO\(scaffold\): my_op check_block_sizes \(Mosaic TPU\)"):
        block_sizes(block_rows=8, block_cols=128).check(37, 300, "mosaic_tpu")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        block_sizes(block_rows=8, block_cols=128).check(37, 300, "cuda")
    # The launchers go through platform_dispatch to each backend's placeholder launcher.
    x = jnp.ones((4, 8), jnp.float32)
    for backend, which in ((None, "Triton"), ("triton", "Triton"), ("mosaic_tpu", "Mosaic TPU")):
        with pytest.raises(NotImplementedError, match=rf"TODO\(scaffold\): my_op forward launcher \({which}\)"):
            kernels_mod.my_op_fwd(x, backend=backend)
    with pytest.raises(NotImplementedError, match=r"TODO\(scaffold\): my_op backward launcher \(Mosaic TPU\)"):
        kernels_mod.my_op_bwd(x, (), x, backend="mosaic_tpu")
    # Explicit tiles are checked against each of the op's backends before tracing; a
    # project backend the op has no kernels for has nothing to check, and no kernel.
    tiles = block_sizes(block_rows=8, block_cols=128)
    with pytest.raises(NotImplementedError, match=r"TODO\(scaffold\): my_op check_block_sizes \(Triton\)"):
        kernels_mod.my_op_fwd(x, block_sizes=tiles)
    for other in set(_common.BACKEND_NAMES) - set(kernels_mod._BACKENDS):  # mosaic_gpu
        with pytest.raises(NotImplementedError, match=f"my_op: no implementation for backend '{other}'"):
            kernels_mod.my_op_fwd(x, backend=other, block_sizes=tiles)


def test_refuses_bad_names_and_overwrites(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(ValueError, match="lowercase Python identifiers"):
        scaffold.scaffold("My-Op", root)
    with pytest.raises(ValueError, match="must differ"):
        scaffold.scaffold("my_op", root, ["x"])
    with pytest.raises(ValueError, match="must differ"):
        scaffold.scaffold("my_op", root, ["g"])  # the launchers' cotangent argument
    with pytest.raises(ValueError, match="NAME=DEFAULT"):
        scaffold._parse_options(["eps"])
    with pytest.raises(FileExistsError, match="already registers 'dense'"):
        scaffold.scaffold("dense", root)
    (root / "kernels" / "old_op.py").write_text("")  # the one-file layout
    with pytest.raises(FileExistsError, match="old_op.py exists; refusing"):
        scaffold.scaffold("old_op", root)
    assert not (root / "kernels" / "old_op").exists()
    scaffold.scaffold("my_op", root)
    with pytest.raises(FileExistsError, match="my_op exists; refusing"):
        scaffold.scaffold("my_op", root)


def _snapshot(root):
    """Every file's bytes and every folder under ``root``, to compare before and after."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("default, match", [
    ("abc", "not a Python literal"),  # a NameError in ops/my_op.py, so in `import fusedvjp.ops`
    ("print(1)", "not a Python literal"),
    ("1,2", "not one expression in a signature"),  # `def my_op(..., eps=1,2, ...)`: a SyntaxError
    ("1e-6  # tiny", "not one expression in a signature"),  # the comment would swallow the signature's rest
    ("'\"\"\"'", "would not compile"),  # a literal, but it ends the op's docstring
])
def test_bad_defaults_write_nothing(tmp_path, default, match, capsys):
    root = _tree(tmp_path)
    before = _snapshot(root)
    with pytest.raises(ValueError, match=match):
        scaffold.scaffold("my_op", root, ["scale"], {"eps": default})
    with pytest.raises(SystemExit) as e:
        scaffold.main(["my_op", "--option", f"eps={default}", "--root", str(root)])
    assert str(e.value.code).startswith("error: ") and match in str(e.value.code)
    assert _snapshot(root) == before
    scaffold.scaffold("my_op", root, ["scale"], {"eps": "(1, 2)"})  # a tuple in parentheses is one
    assert "def my_op(x, scale, *, eps=(1, 2), impl=" in (root / "ops" / "my_op.py").read_text()


def test_an_option_given_twice_is_an_error():
    with pytest.raises(ValueError, match="option 'eps' is given twice: eps=1e-6 and eps=1e-5"):
        scaffold._parse_options(["eps=1e-6", "eps=1e-5"])


@pytest.mark.parametrize("missing", ["tests", "kernels", "ops/registry.py"])
def test_a_root_without_its_folders_writes_nothing_and_a_rerun_works(tmp_path, missing):
    """Before, a root without tests/ was left with kernels/my_op/ and ops/my_op.py written,
    and the rerun refused to overwrite them."""
    root = _tree(tmp_path)
    kept = (root / missing).read_bytes() if (root / missing).is_file() else None
    if kept is None:
        (root / missing).rmdir()
    else:
        (root / missing).unlink()
    before = _snapshot(root)
    with pytest.raises(FileNotFoundError, match=f"{root / missing} is not a "):
        scaffold.scaffold("my_op", root, ["scale"], {"eps": "1e-6"})
    assert _snapshot(root) == before
    if kept is None:
        (root / missing).mkdir()
    else:
        (root / missing).write_bytes(kept)
    scaffold.scaffold("my_op", root, ["scale"], {"eps": "1e-6"})
    assert (root / "tests" / "test_ops_my_op.py").exists()


class _Interrupt(BaseException):
    """A stand-in for KeyboardInterrupt (which pytest would take as the user's)."""


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), _Interrupt()])
@pytest.mark.parametrize("failing", ["registry.py", "__init__.py"])
def test_a_write_that_fails_is_undone(tmp_path, monkeypatch, fault, failing):
    """The last writes (the rewrites of ops/registry.py, then ops/__init__.py) fail: the
    files already written go, ops/registry.py gets its text back, and a rerun works."""
    root = _tree(tmp_path)
    (root / "ops" / "registry.py").chmod(0o640)
    before = _snapshot(root)
    real_replace = os.replace

    def failing_replace(src, dst):
        if pathlib.Path(dst).name == failing:
            raise fault
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing_replace)
        with pytest.raises(type(fault)):
            scaffold.scaffold("my_op", root, ["scale"], {"eps": "1e-6"})
    assert _snapshot(root) == before
    scaffold.scaffold("my_op", root, ["scale"], {"eps": "1e-6"})
    assert "from fusedvjp.ops.my_op import my_op" in (root / "ops" / "__init__.py").read_text()
    assert (root / "ops" / "registry.py").stat().st_mode & 0o777 == 0o640
