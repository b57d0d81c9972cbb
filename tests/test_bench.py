"""The benchmark's whole CLI path at --quick shapes, its statistics and its report logic.

No timing asserts: benchmarks measure, tests check that what they report is well formed
and computed right.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusedvjp import ops
from fusedvjp.bench import __main__ as cli
from fusedvjp.bench import cases as cases_lib
from fusedvjp.bench import measure, report, timing
from fusedvjp.bench.roofline import Roofline, row_metrics
from fusedvjp.ops import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
OP_NAMES = set(ops.__all__) | {"mnist_train_step"}
ROW_KEYS = {"op": str, "shape": list, "dtype": str, "mode": str, "impl": str, "median_ms": float, "p20_ms": float,
            "p80_ms": float, "compile_s": float, "bytes": int, "flops": int, "peak_temp_bytes": int}
TIMING_KEYS = ("median_ms", "p20_ms", "p80_ms", "compile_s")
# A subset that still covers a matmul op, a loss, the train step, both modes and all impls.
QUICK_ARGS = ["--quick", "--ops", "dense_tanh,xent,mnist_train_step", "--shapes", "mnist", "--dtypes", "f32",
              "--impls", "pallas,user,xla,jnp"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    doc = cli.main([*QUICK_ARGS, "--out", str(out)])
    return doc, out


def _is_type(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_schema(doc: dict) -> None:
    assert set(doc) == {"device", "platform", "jax_version", "date", "roofline", "device_time", "tuning", "peers",
                        "results"}
    assert set(doc["peers"]) == {"requested", "ran", "skipped", "not_covered"}
    assert all(s["peer"].startswith("peer:") and s["reason"] for s in doc["peers"]["skipped"])
    assert doc["device_time"]["measured"] == (doc["platform"] != "cpu")
    assert set(doc["tuning"]) >= {"file", "device_entries"}
    assert isinstance(doc["device"], str) and doc["device"]
    assert doc["platform"] in ("gpu", "tpu", "cpu")
    assert doc["jax_version"] == jax.__version__
    datetime.datetime.fromisoformat(doc["date"])
    assert set(doc["roofline"]) == {"hbm_gbps", "bf16_tflops", "f32_tflops"}
    assert all(_is_type(v, float) and v > 0 for v in doc["roofline"].values())
    assert doc["results"]
    for row in doc["results"]:
        assert set(ROW_KEYS) <= set(row), f"missing keys {set(ROW_KEYS) - set(row)}"
        assert list(row)[5:7] == ["median_ms", "device_ms"], "device_ms sits beside median_ms"
        errored = "error" in row
        peer = row["impl"].startswith("peer:")
        for key, kind in ROW_KEYS.items():
            if errored and key in TIMING_KEYS or peer and key == "peak_temp_bytes" and row[key] is None:
                assert row[key] is None
            else:
                assert _is_type(row[key], kind), f"{key}={row[key]!r} is not {kind.__name__}"
        assert row["op"] in OP_NAMES
        assert all(_is_type(d, int) and d > 0 for d in row["shape"])
        assert row["dtype"] in cases_lib.DTYPES
        assert row["mode"] in ("fwd", "fwd+bwd")
        assert row["impl"] in cases_lib.IMPLS or peer and row["impl"][5:]
        assert row["bytes"] > 0 and row["flops"] > 0 and (row["peak_temp_bytes"] or 0) >= 0
        if errored:
            assert isinstance(row["error"], str) and row["error"]
            continue
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["compile_s"] >= 0
        if doc["platform"] == "cpu":
            assert row["device_ms"] is None and row["device_note"] == "n/a (CPU)"
        elif row["device_ms"] is not None:
            assert 0 < row["device_p20_ms"] <= row["device_ms"] <= row["device_p80_ms"]
            assert row["device_source"] in ("trace", "cuda_events")
        else:
            assert row["device_note"]
        if "loop_ms" in row:
            assert _is_type(row["loop_ms"], float) and row["loop_ms"] > 0 and row["loop_n"] >= 2
            assert row["median_ms"] < measure.LAUNCH_BOUND_MS, "only launch-bound rows are looped"


def test_quick_cli_results_json(quick_run):
    doc, out = quick_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    _check_schema(on_disk)
    expected = {(c.op, c.shape, c.dtype, c.mode) for c in cases_lib.build_cases(
        ["dense_tanh", "xent", "mnist_train_step"], ["mnist"], ["f32"], quick=True)}
    got = [(r["op"], tuple(r["shape"]), r["dtype"], r["mode"], r["impl"]) for r in on_disk["results"]]
    assert len(got) == len(set(got)), "a (case, impl) row appears twice"
    assert {g[:4] for g in got} == expected
    assert {g[4] for g in got} == {"pallas", "user", "xla", "jnp"}
    assert {g[0] for g in got} == {"dense_tanh", "softmax_cross_entropy_with_integer_labels", "mnist_train_step"}
    assert not [r for r in on_disk["results"] if r["impl"] != "pallas" and "error" in r], "user/xla/jnp rows must run"


def test_quick_cli_derived_numbers(quick_run):
    doc, _ = quick_run
    rows = doc["results"]
    roof = Roofline(**doc["roofline"])
    baseline = {}
    for r in rows:
        if r["impl"] in ("user", "xla") and r.get("median_ms"):
            key = report.case_key(r)
            baseline[key] = min(baseline.get(key, r["median_ms"]), r["median_ms"])
    for r in rows:
        case = cases_lib.Case(r["op"], tuple(r["shape"]), r["dtype"], r["mode"])
        assert (r["bytes"], r["flops"]) == (case.bytes(), case.flops())
        if "error" in r:
            assert r["speedup"] is None
            continue
        base = baseline[report.case_key(r)]
        assert r["speedup"] == pytest.approx(base / r["median_ms"], rel=1e-12)
        assert r["baseline"] in ("user", "xla")
        if r["impl"] == r["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
        else:
            assert r["impl"] not in ("user", "xla") or r["speedup"] <= 1.0, "the baseline is the faster of the two"
        roofline_s = max(r["bytes"] / (roof.hbm_gbps * 1e9), r["flops"] / (roof.peak_tflops(r["dtype"]) * 1e12))
        assert r["pct_of_roofline"] == pytest.approx(100 * roofline_s / (r["median_ms"] * 1e-3))
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)


def test_quick_cli_files_and_table(quick_run, capsys):
    doc, out = quick_run
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "not measured" in md and "Precision.HIGHEST" in md and "--quick" in md
    if doc["platform"] == "cpu":
        assert "GPU only" in md
    for t in report.targets():
        assert t.description in md
    cli.main(["--table", str(out / "results.json")])
    table = capsys.readouterr().out
    head = next(ln for ln in table.splitlines() if "median ms" in ln)
    assert head.split()[0] == "speedup", "the speedup must be each row's first number"
    body = table.split("targets (")[0].splitlines()
    base_rows = [ln.split() for ln in body if len(ln.split()) > 6 and ln.split()[5] in ("user", "xla")]
    assert len(base_rows) == len([r for r in doc["results"] if r["impl"] in ("user", "xla")])
    assert all(cells[0] == "1.00x" or float(cells[0][:-1]) < 1.0 for cells in base_rows)
    assert "user = the users' code" in table and "optax.softmax_cross_entropy_with_integer_labels" in table


def test_failing_impl_is_recorded_not_fatal(tmp_path, monkeypatch):
    original = cases_lib.Case.function

    def function(self, impl):
        if impl == "pallas":
            def broken(*args):
                raise NotImplementedError("no kernel for this case (test)")
            return broken
        return original(self, impl)

    monkeypatch.setattr(cases_lib.Case, "function", function)
    doc = cli.main(["--quick", "--ops", "xent", "--shapes", "mnist", "--dtypes", "f32", "--modes", "fwd",
                    "--out", str(tmp_path)])
    _check_schema(json.loads((tmp_path / "results.json").read_text()))
    rows = {r["impl"]: r for r in doc["results"]}
    assert "no kernel for this case (test)" in rows["pallas"]["error"]
    assert rows["pallas"]["median_ms"] is None and rows["pallas"]["speedup"] is None
    assert rows["xla"]["median_ms"] > 0 and rows["jnp"]["median_ms"] > 0
    assert "## Errors" in (tmp_path / "results.md").read_text()


def _no_timing(monkeypatch):
    """Makes any measurement fail the test: the checks below must come before the first timing."""
    def measured(*args, **kwargs):
        raise AssertionError("timing started before the arguments were checked")

    monkeypatch.setattr(cli.roofline, "measure", measured)
    monkeypatch.setattr(cli, "run_case", measured)


def test_table_of_a_missing_or_invalid_file_is_a_clean_error(tmp_path):
    (tmp_path / "not-json.json").write_text("{ results: oops")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "keys.json").write_text(json.dumps({"device": "x", "results": []}))
    (tmp_path / "rows.json").write_text(json.dumps({"device": "x", "platform": "cpu", "jax_version": "0",
                                                    "date": "2026-01-01", "roofline": {"hbm_gbps": 1.0},
                                                    "results": [{"op": "dense_tanh"}]}))
    cases = [("missing.json", "cannot read it"), (".", "cannot read it"), ("not-json.json", "not JSON"),
             ("list.json", "not a results.json"), ("keys.json", "missing platform, jax_version, date, roofline"),
             ("rows.json", "malformed results.json")]
    for name, what in cases:
        path = tmp_path / name
        with pytest.raises(SystemExit) as e:
            cli.main(["--table", str(path)])
        assert isinstance(e.value.code, str), f"{name}: exit status must be non-zero"
        assert str(path) in e.value.code and what in e.value.code, e.value.code


def test_table_error_exits_nonzero_without_a_traceback(tmp_path):
    import sys

    path = tmp_path / "missing.json"
    proc = subprocess.run([sys.executable, "-m", "fusedvjp.bench", "--table", str(path)], capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and str(path) in proc.stderr


def test_empty_selection_says_what_was_selected(monkeypatch):
    _no_timing(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["--quick", "--shapes", "llm", "--ops", "mnist_train_step"])
    msg = str(e.value.code)
    assert "no benchmark case" in msg and "--ops mnist_train_step" in msg and "--shapes llm" in msg
    assert "mnist_train_step: shapes mnist, modes fwd+bwd" in msg
    with pytest.raises(SystemExit) as e:
        cli.main(["--quick", "--ops", "mnist_train_step", "--modes", "fwd"])
    assert "--modes fwd" in str(e.value.code)


@pytest.mark.parametrize("argv, match", [
    (["--budget-s", "nan"], "--budget-s must be > 0"), (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--per-bucket", "0"], "--per-bucket must be >= 1"), (["--workers", "0"], "--workers must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_sweep_rejects_degenerate_options(argv, match, capsys):
    from fusedvjp.bench import sweep

    with pytest.raises(SystemExit) as e:
        sweep.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_bench_rejects_a_negative_seed(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--quick", "--seed", "-1"])
    assert e.value.code == 2 and "--seed must be >= 0" in capsys.readouterr().err


def test_unwritable_out_fails_before_any_timing(tmp_path, monkeypatch):
    _no_timing(monkeypatch)
    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run"):  # root ignores permission bits: use a file
        with pytest.raises(SystemExit) as e:
            cli.main(["--quick", "--ops", "xent", "--shapes", "mnist", "--dtypes", "f32", "--modes", "fwd",
                      "--out", str(out)])
        assert str(out) in str(e.value.code) and "not a writable directory" in str(e.value.code)


# --- timing ----------------------------------------------------------------------------------


def test_summarize_percentiles():
    stats = timing.summarize([0.010, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009])
    assert stats.n == 10
    assert stats.median == pytest.approx(0.0055)
    assert stats.p20 == pytest.approx(0.0028)
    assert stats.p80 == pytest.approx(0.0082)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_time_calls_on_a_fake_clock():
    """Each call 'takes' a scripted duration on a fake clock; inputs rotate; warm-up is untimed."""
    durations = iter([5.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # first: the warm-up call
    now = [0.0]
    calls, synced = [], []

    def clock():
        return now[0]

    def fn(*args):
        calls.append(args)
        now[0] += next(durations)
        return args

    times = timing.time_calls(fn, [("a",), ("b",), ("c",)], warmup=1, min_iters=6, max_iters=6,
                              clock=clock, sync=synced.append)
    assert times == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [c[0] for c in calls] == ["a", "b", "c", "a", "b", "c", "a"]
    assert len(synced) == 7
    stats = timing.summarize(times)
    assert (stats.median, stats.p20, stats.p80) == pytest.approx((3.5, 2.0, 5.0))


def test_choose_iters_clamps():
    assert timing.choose_iters(1e-6, 30, 200, 0.3) == 200
    assert timing.choose_iters(1.0, 30, 200, 0.3) == 30
    assert timing.choose_iters(0.003, 30, 200, 0.3) == 100
    assert timing.choose_iters(math.inf, 30, 200, 0.3) == 30


def test_compile_fn_reports_memory_and_time():
    x = jnp.ones((8, 8), jnp.float32) * 2
    compiled = timing.compile_fn(lambda a: jnp.tanh(a @ a), [x])
    assert compiled.compile_s > 0 and compiled.peak_temp_bytes >= 0
    np.testing.assert_allclose(compiled.fn(x), np.tanh(np.full((8, 8), 32.0)), rtol=1e-6)


# --- cases and report ----------------------------------------------------------------------


def test_build_cases_follow_the_registry():
    full = cases_lib.build_cases(["xent", "dense_tanh", "mnist_train_step"], ["mnist", "llm"], ["bf16"])
    xent = "softmax_cross_entropy_with_integer_labels"
    assert {c.shape for c in full if c.op == xent and c.shape_set == "llm"} == \
        set(registry.get(xent).bench_shapes["llm"])
    assert [c.mode for c in full if c.op == "mnist_train_step"] == ["fwd+bwd"]
    quick = cases_lib.build_cases(None, ["mnist", "llm"], ["f32"], quick=True)
    assert {c.op for c in quick} == set(registry.REGISTRY) | {"mnist_train_step"}
    assert len({(c.op, c.shape, c.mode) for c in quick}) == len(quick)
    assert all(d <= 1000 for c in quick for d in c.shape)
    with pytest.raises(ValueError, match="unknown op"):
        cases_lib.build_cases(["nope"])
    with pytest.raises(ValueError, match="dtype"):
        cases_lib.build_cases(["xent"], dtypes=["f16"])


@pytest.mark.parametrize("op", sorted(registry.REGISTRY))
def test_device_inputs_match_the_registry(op):
    case = cases_lib.Case(op, cases_lib.quick_shape(registry.get(op).test_shapes[0]), "bf16", "fwd+bwd")
    spec = registry.get(op)
    # The registry's make_inputs must run on DeviceRng (else LLM-size inputs are drawn on the host).
    spec.make_inputs(cases_lib.DeviceRng(0), case.shape, jnp.bfloat16)
    *args, g = case.make_inputs(seed=1)
    abstract = spec.abstract_inputs(case.shape, jnp.bfloat16)
    assert [(a.shape, a.dtype) for a in args] == [(a.shape, a.dtype) for a in abstract]
    floats = [a for a in args if jnp.issubdtype(a.dtype, jnp.floating)] + [g]
    assert all(np.count_nonzero(np.asarray(a, np.float32)) > 0.9 * a.size for a in floats), "inputs look like zeros"
    copies = case.input_copies(seed=1, max_copies=3)
    assert len(copies) == 3 and not np.array_equal(np.asarray(copies[0][0]), np.asarray(copies[1][0]))


def test_train_step_cost_sums_the_layers():
    b, d, h, c = cases_lib.TRAIN_STEP_SHAPE
    case = cases_lib.Case("mnist_train_step", (b, d, h, c), "f32", "fwd+bwd")
    layer_flops = 3 * 2 * b * d * h + 3 * 2 * b * h * c
    assert case.flops() > layer_flops - 2 * b * d * h
    assert case.bytes() > 4 * (d * h + h * c)  # the weights are read at least once


def _row(op, shape, impl, median_ms, *, dtype="bf16", mode="fwd+bwd", nbytes=10**9, flops=10**12):
    return {"op": op, "shape": list(shape), "dtype": dtype, "mode": mode, "impl": impl, "median_ms": median_ms,
            "bytes": nbytes, "flops": flops}


def test_targets_met_missed_and_not_measured():
    roof = Roofline(hbm_gbps=1000.0, bf16_tflops=500.0, f32_tflops=50.0)
    xent = "softmax_cross_entropy_with_integer_labels"
    rows = [
        _row(xent, (8192, 32768), "xla", 3.0), _row(xent, (8192, 32768), "pallas", 1.2),  # 2.5x; floor 1 ms
        _row("dense_tanh", (8192, 4096, 4096), "xla", 3.0),
        _row("dense_tanh", (8192, 4096, 4096), "pallas", 4.0),  # 0.75x; 250 TFLOP/s = 50% of 500
    ]
    report.add_speedups(rows)
    results = {(t.op, t.shape, t.metric): report.evaluate(t, rows, roof) for t in report.targets()}
    assert results[(xent, (8192, 32768), "speedup")]["status"] == "met"
    assert results[(xent, (8192, 32768), "speedup")]["ratio"] == pytest.approx(2.5)
    assert results[(xent, (8192, 32768), "floor")]["ratio"] == pytest.approx(1.2)
    assert results[(xent, (8192, 32768), "floor")]["status"] == "met"
    assert results[(xent, (8192, 131072), "speedup")]["status"] == "not measured"
    missed = results[("dense_tanh", (8192, 4096, 4096), "speedup")]
    assert missed["status"] == "missed" and missed["ratio"] == pytest.approx(0.75) and "0.75x" in missed["detail"]
    rate = results[("dense_tanh", (8192, 4096, 4096), "matmul_rate")]
    assert rate["status"] == "missed" and rate["ratio"] == pytest.approx(0.5)
    assert results[("mnist_train_step", cases_lib.TRAIN_STEP_SHAPE, "speedup")]["status"] == "not measured"


def test_row_metrics_pick_the_binding_ceiling():
    roof = Roofline(hbm_gbps=1000.0, bf16_tflops=500.0, f32_tflops=50.0)
    m = row_metrics(10**9, 10**12, "f32", 0.04, roof)  # memory 1 ms, compute 20 ms
    assert m["bound"] == "compute" and m["pct_of_roofline"] == pytest.approx(50.0)
    m = row_metrics(10**9, 10**9, "bf16", 0.002, roof)
    assert m["bound"] == "memory" and m["pct_of_roofline"] == pytest.approx(50.0)


def test_targets_first_times_the_judged_cases_first(monkeypatch):
    seen = []
    monkeypatch.setattr(cli.roofline, "measure", lambda platform, quick=False: Roofline(1.0, 1.0, 1.0))
    monkeypatch.setattr(cli, "run_case", lambda case, *args, **kwargs: seen.append(case) or [])
    argv = ["--ops", "xent,dense_tanh", "--shapes", "mnist", "--dtypes", "f32,bf16", "--peers", "none"]
    cli.main([*argv, "--targets-first"])
    judged = {(t.op, t.shape, t.dtype, t.mode) for t in report.targets()}
    flags = [(c.op, c.shape, c.dtype, c.mode) in judged for c in seen]
    assert flags == [True, True] + [False] * (len(seen) - 2), [c.label for c in seen]
    assert [c.dtype for c in seen[:2]] == ["f32", "bf16"]
    rest, seen[:] = seen[2:], []
    cli.main(argv)
    assert [c for c in seen if c not in rest] == [c for c in seen if (c.op, c.shape, c.dtype, c.mode) in judged]
    assert [c for c in seen if c in rest] == rest, "the others keep their order"


def test_device_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(REPO / "bench" / "device_check.sh")], check=True)


def _fake_wheel(directory: pathlib.Path, name: str, version: str) -> pathlib.Path:
    """A minimal valid wheel (pure Python, one module), for the install phase's dry run."""
    import zipfile

    path = directory / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "", f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


@pytest.mark.slow
def test_device_check_quick_runs_every_phase(tmp_path):
    """The GPU window's script, start to end, in QUICK mode on this CPU: every phase runs and
    succeeds, the summary says so, and the files the device tool returns are there."""
    import importlib.metadata
    import os
    import sys

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "fusedvjp_fake_peer", "0.1")  # missing here: installed (dry run)
    _fake_wheel(wheels, "numpy", importlib.metadata.version("numpy"))  # present: must not be reinstalled
    out = tmp_path / "out"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(wheels),
           "TRAIN_IMPLS": "xla", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([bash, str(REPO / "bench" / "device_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in ("install-package", "install-peer-wheels", "tests", "sweep", "bench", "train-xla"):
        assert f"   {phase}: ok (" in summary, (phase, summary)
    assert "3 of 3 buckets timed on cpu" in summary  # dense_tanh: its fwd, dx and dW kernels
    log = (out / "log.txt").read_text()
    assert "Would install fusedvjp_fake_peer-0.1" in log, log[-2000:]
    assert f"numpy {importlib.metadata.version('numpy')} already installed" in log
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"log.txt", "summary.txt", "tuning.json", "sweep.json", "bench/results.json", "bench/results.md",
                     "bench/roofline.png", "train/metrics.json"}, files
    tuning = json.loads((out / "tuning.json").read_text())
    entries = tuning["entries"]["cpu"]
    assert sorted(k.split("/")[0] for k in entries) == ["dense_dw", "dense_dx", "dense_fwd"], entries
    for key, entry in entries.items():
        assert key.split("/")[1:3] == ["triton", "float32"] and entry["evidence"]["candidates_timed"] == 2
    doc = json.loads((out / "bench" / "results.json").read_text())
    _check_schema(doc)
    assert doc["tuning"] == {"file": str(out / "tuning.json"), "device_entries": 3}, "the bench must read the sweep's table"
    assert {s["peer"] for s in doc["peers"]["skipped"]} >= {"peer:torch", "peer:tokamax", "peer:liger"}
    assert "## Peers" in (out / "bench" / "results.md").read_text()
    assert "xla" in json.loads((out / "train" / "metrics.json").read_text())
    assert "speedup" in proc.stdout and "device ms" in proc.stdout, "the benchmark table comes last"
