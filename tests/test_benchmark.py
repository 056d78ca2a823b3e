"""The comparative benchmark (benchmarks/run.py) end to end at tiny sizes, the files it writes, the harness
it shares with benchmarks/ops_bench.py and scripts/calibrate.py (benchmarks/harness.py), and the per-op
cases timed in-process.

Tiny runs: 8x8 digits at 16 px (300 train / 100 test images), 4 steps, 3 probe epochs; the ImageNet
profile at 4 classes, 32 px and a tiny ViT. The checks are on the shape and consistency of the results
(what other tools read), not on their values. The methods are the registry's (fastdd.methods): every
registered method must appear in the results without a change to the benchmark.
"""

import argparse
import csv
import importlib.util
import json
import math
import statistics
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastdd.methods as registry

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("step_time_s", "total_time_s", "peak_memory_bytes", "accuracy_mean", "accuracy_std")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REFERENCE = registry.reference().name


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("fastdd_benchmark_run", REPO / "benchmarks" / "run.py")


@pytest.fixture(scope="module")
def harness(bench):
    import harness  # benchmarks/ is on sys.path once run.py is loaded

    return harness


@pytest.fixture(scope="module")
def ops_bench(bench):
    import ops_bench

    return ops_bench


@pytest.fixture(scope="module")
def calibrate():
    return _load("fastdd_calibrate", REPO / "scripts" / "calibrate.py")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny in-process runs: one thread (spinning OpenMP threads on a shared CPU slow tiny kernels down
    several-fold; these tests check what the benchmark writes, not its timings)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _outputs(out: Path, stem: str):
    return {ext: out / f"{stem}.{ext}" for ext in ("json", "csv", "md")}


def _stem(result) -> str:
    """The results' file stem of a CPU run: the machine and the date."""
    import harness  # benchmarks/ is on sys.path once run.py is loaded (the bench fixture)

    return harness.device_slug(torch.device("cpu")) + "-" + result["date"][:10]


def _check_png(path: Path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def test_default_profile_end_to_end(bench, tmp_path):
    result = bench.main(["--tiny", "--in-process", "--quiet", "--out", str(tmp_path)])
    files = _outputs(tmp_path, _stem(result) + "-tiny")
    for path in files.values():
        assert path.is_file(), path
    tp = result["setup"]["stats_throughput"]  # the statistics pass against the encoder alone, same batches
    assert tp["images"] == 128 and tp["stats_time_s"] > 0 and tp["encoder_time_s"] > 0
    assert len(tp["ratio_per_round"]) == 2 and math.isclose(tp["throughput_ratio"], statistics.median(tp["ratio_per_round"]))
    assert "of the encoder's forward throughput" in files["md"].read_text()

    saved = json.loads(files["json"].read_text())
    assert saved["schema"] == "fastdd.benchmark/1"
    for key in ("device", "versions", "settings", "methods", "git", "setup", "date", "command"):
        assert key in saved, key
    assert saved["device"]["type"] == "cpu" and saved["device"]["cores"] >= 1
    assert saved["versions"]["torch"] and saved["versions"]["python"]
    assert saved["settings"]["dataset"] == "digits" and saved["settings"]["steps"] == 4
    methods = saved["methods"]
    assert "dm" in registry.names()  # the fourth method: picked up from the registry alone
    assert set(methods) == {*registry.names(), "random_real", *bench.CORESETS, "full_data"}
    assert {"class_centroids", "kcenter_greedy", "herding"} <= set(bench.CORESETS)
    assert list(methods)[:len(registry.names())] == list(registry.names())  # the registry's order
    assert saved["settings"]["methods"] == list(registry.names())
    for key, entry in methods.items():
        for field in REQUIRED:
            assert field in entry, (key, field)
        assert 0.0 <= entry["accuracy_mean"] <= 100.0 and entry["accuracy_std"] >= 0.0, key
    for key in registry.names():
        e = methods[key]
        assert e["kind"] == "distilled" and e["status"] == "ok" and e["method"] == key
        assert e["step_time_s"] > 0 and e["total_time_s"] >= e["step_time_s"]
        assert e["peak_memory_bytes"] > 0 and e["extra_memory_bytes"] >= 0
        assert len(e["step_times_s"]) == 3  # 4 steps: 3 intervals between step callbacks
        assert e["step_time_min_s"] <= e["step_time_s"] <= e["step_time_max_s"]
        assert math.isclose(e["speedup_vs_lgm"], methods[REFERENCE]["step_time_s"] / e["step_time_s"])
        assert e["ratio_reference"] == REFERENCE
        assert len(e["accuracies"]) == 2  # --tiny probes with seeds 0 and 1
        assert e["distill_settings"]["copies"] == registry.defaults(key, e["ipc"])["copies"]
    assert methods[REFERENCE]["copies"] == registry.reference().defaults["copies"] == 10
    assert methods[REFERENCE]["speedup_vs_lgm"] == 1.0
    assert saved["git"]["revision"] and isinstance(saved["git"]["dirty"], bool)
    assert methods["random_real"]["kind"] == "baseline" and len(methods["random_real"]["accuracies"]) == 4
    assert methods["full_data"]["kind"] == "ceiling" and methods["full_data"]["step_time_s"] is None

    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == list(methods)
    assert list(rows[0]) == bench.CSV_COLUMNS
    assert float(rows[0]["step_time_s"]) == pytest.approx(methods["lgm"]["step_time_s"])

    table = files["md"].read_text()
    assert "| run | status | per-step (ms)" in table and "| speed vs LGM |" in table
    for key in registry.names():
        assert f"| {key} | ok |" in table, key
    stem = files["json"].with_suffix("")
    for suffix in ("-time-memory.png", "-accuracy.png", "-images.png"):
        _check_png(Path(f"{stem}{suffix}"))
    assert all((REPO / p).is_file() or Path(p).is_file() for p in saved["files"])


@pytest.mark.slow
def test_cpu_memory_is_measured_in_a_child_process(bench, tmp_path):
    result = bench.main(["--tiny", "--methods", "sfm,lgm", "--lgm-copies", "1", "--no-evaluate", "--no-plots",
                         "--quiet", "--out", str(tmp_path)])
    assert result["settings"]["isolation"] == "one child process per method"
    for key in ("sfm", f"{REFERENCE}_k1"):
        e = result["methods"][key]
        assert e["status"] == "ok", e.get("error")
        # the child's ru_maxrss covers torch + encoder + data: far above the extra of a 4-step run
        assert e["peak_memory_bytes"] > 100 * 2 ** 20 and 0 <= e["extra_memory_bytes"] < e["peak_memory_bytes"]
        assert "child process" in e["memory_measure"]
        assert e["accuracy_mean"] is None
    # no LGM with 10 copies ran: the ratios use the LGM that did
    assert result["methods"]["sfm"]["ratio_reference"] == f"{REFERENCE}_k1"


def test_imagenet1k_profile_tiny(bench, tmp_path):
    result = bench.main(["--profile", "imagenet1k", "--tiny", "--in-process", "--quiet", "--no-ops",
                         "--out", str(tmp_path)])
    s = result["settings"]
    assert s["profile"] == "imagenet1k" and s["dataset"] == "synthetic" and s["evaluate"] is False
    assert s["chunk_size"] == 4 and result["setup"]["feature_dim"] == 192
    others = [m for m in registry.names() if m != REFERENCE]
    expected = {"lgm_k1", "lgm_k2", *others, "lgm_k1_ipc2", "lgm_k2_ipc2", *(f"{m}_ipc2" for m in others)}
    assert set(result["methods"]) == expected
    # a method of the run needs a feature bank (CLP): the statistics carry the synthetic ImageNet-sized one
    assert "random fp16 features" in result["setup"]["stats_note"]
    for key, e in result["methods"].items():
        assert e["status"] == "ok" and e["step_time_s"] > 0 and e["accuracy_mean"] is None, key
        assert e["ratio_reference"] == ("lgm_k2" if e["ipc"] == 1 else "lgm_k2_ipc2")
    assert result["methods"]["lgm_k2_ipc2"]["distill_settings"]["copies"] == 2
    assert result["methods"]["clp"]["distill_settings"]["chunk_size"] == 4
    saved = json.loads((tmp_path / f"{_stem(result)}-imagenet1k-tiny.json").read_text())
    assert set(saved["methods"]) == expected
    _check_png(tmp_path / f"{_stem(result)}-imagenet1k-tiny-time-memory.png")


def test_time_cap_stops_a_run_and_keeps_its_timing(bench, tmp_path):
    result = bench.main(["--profile", "imagenet1k", "--tiny", "--in-process", "--quiet", "--no-ops", "--no-plots",
                         "--methods", "sfm", "--ipc", "1", "--steps", "5", "--max-run-seconds", "1e-6",
                         "--out", str(tmp_path)])
    e = result["methods"]["sfm"]
    assert e["status"] == "time-capped" and e["steps_done"] == 1  # stopped at the first step's callback
    assert e["step_time_s"] is None and e["first_step_s"] > 0 and e["total_time_s"] is None


def test_runs_go_cheapest_first_by_what_they_need_from_the_real_side(bench):
    """Under a time budget the order comes from each method's needs: means (SFM, DM) before a feature bank
    (CLP) before fresh real batches every step (the reference LGM); the plan itself keeps the order given."""
    settings = {"ipc": [1], "methods": list(registry.names()), "lgm_copies": [3, 10]}
    plan = bench.run_plan(settings)
    assert plan == [(1, REFERENCE, 3), (1, REFERENCE, 10)] + [(1, m, None) for m in registry.names()[1:]]
    cheapest_first = [m for m in sorted(registry.names(), key=bench.real_side_cost)]
    assert cheapest_first[-1] == REFERENCE and registry.get(REFERENCE).needs.real_batches
    assert cheapest_first.index("clp") > max(cheapest_first.index("sfm"), cheapest_first.index("dm"))


def test_total_budget_skips_runs_and_keeps_the_table_order(bench, tmp_path):
    result = bench.main(["--profile", "imagenet1k", "--tiny", "--in-process", "--quiet", "--no-ops", "--no-plots",
                         "--ipc", "1", "--methods", "lgm,sfm", "--lgm-copies", "1", "--max-total-seconds", "1e-3",
                         "--out", str(tmp_path)])
    assert list(result["methods"]) == ["lgm_k1", "sfm"]
    assert all(e["status"] == "skipped" and e["step_time_s"] is None for e in result["methods"].values())


def test_out_of_memory_is_reported_not_raised(bench, monkeypatch):
    import fastdd

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(fastdd, "distill", exhausted)
    settings = dict(bench.PROFILES["default"], steps=4, warmup=1, seed=0)
    data = {"train_images": torch.rand(4, 3, 8, 8), "train_labels": torch.tensor([0, 0, 1, 1])}
    out = bench.run_distillation(settings, data, None, None, REFERENCE, 1, 10, torch.device("cpu"), None,
                                 progress=False, whole_process=False)
    assert out["status"] == "oom" and "out of memory" in out["error"]
    assert out["peak_memory_bytes"] is None and out["step_time_s"] is None
    assert out["floor_time_s"] is None and "oom" in out["floor_status"]  # no floor after a run that did not distil


def test_ratios_use_the_reference_lgm_of_the_same_ipc(bench):
    def run(method, ipc, copies, t, mem, status="ok"):
        return bench._entry("distilled", method, ipc, copies=copies, status=status, step_time_s=t,
                            peak_memory_bytes=mem, extra_memory_bytes=mem)

    methods = {"lgm_k3": run("lgm", 1, 3, 2.0, 300), "lgm": run("lgm", 1, 10, 4.0, 800), "sfm": run("sfm", 1, None, 0.5, 100),
               "lgm_k3_ipc10": run("lgm", 10, 3, 8.0, 900),
               "lgm_ipc10": run("lgm", 10, 10, None, None, status="oom"), "sfm_ipc10": run("sfm", 10, None, 1.0, 300)}
    bench.add_ratios(methods)
    assert methods["sfm"]["ratio_reference"] == "lgm" and methods["sfm"]["speedup_vs_lgm"] == 8.0
    assert methods["sfm"]["memory_ratio_vs_lgm"] == 8.0
    assert methods["lgm_k3"]["speedup_vs_lgm"] == 2.0
    # LGM with 10 copies ran out of memory at ipc 10: the ratio falls back to the largest K that ran
    assert methods["sfm_ipc10"]["ratio_reference"] == "lgm_k3_ipc10" and methods["sfm_ipc10"]["speedup_vs_lgm"] == 8.0
    assert methods["lgm_ipc10"]["speedup_vs_lgm"] is None
    assert bench.run_key("lgm", 10, 3, first_ipc=1) == "lgm_k3_ipc10"
    assert bench.run_key("clp", 1, None, first_ipc=1) == "clp"


def test_bad_options_are_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "lgm,foo", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert "--methods" in error and "unknown: foo" in error and ",".join(registry.names()) in error
    with pytest.raises(SystemExit, match="--steps must be >= 2"):
        bench.main(["--steps", "1", "--out", str(tmp_path)])


def test_ops_bench_runs_in_process_over_every_case_and_backend(bench, ops_bench, monkeypatch):
    """run.py's per-op benchmark is ops_bench.benchmark in this process (no child pytest): every case and
    backend, GPU-only backends reported as skipped on a CPU, --tiny leaving out torch.compile there, and
    the time budget skipping what is left."""
    monkeypatch.setattr(ops_bench, "BACKENDS", ("torch", "torch.compile", "triton"))
    monkeypatch.setattr(ops_bench, "ALL_CASES", {"flow_matching_loss": ops_bench.ALL_CASES["flow_matching_loss"],
                                                 "ridge_probe": ops_bench.ALL_CASES["ridge_probe"]})
    monkeypatch.setattr(bench.subprocess, "run", None)  # a child process would fail loudly
    out = bench.run_ops_bench(torch.device("cpu"), tiny=True)
    assert out["status"] == "ok" and out["shapes"] == "quick" and out["backends"] == ["torch", "triton"]
    assert out["timer"].startswith("wall clock") and out["machine"]["type"] == "cpu"
    rows = {(r["op"], r["backend"]): r for r in out["results"]}
    assert set(rows) == {(op, b) for op in ("flow_matching_loss", "ridge_probe") for b in ("torch", "triton")}
    timed = rows[("ridge_probe", "torch")]
    assert timed["status"] == "ok" and 0 < timed["p20_ms"] <= timed["median_ms"] <= timed["p80_ms"]
    assert out["ceilings"]["matmul"]["tflops"] > 0 and out["ceilings"]["copy"]["gbytes_per_s"] > 0
    assert 0 < timed["matmul_fraction"] and "copy_fraction" in timed
    assert rows[("ridge_probe", "triton")]["status"] == "skipped"
    assert os.environ.get("FASTDD_CHECKS") != "0"  # the checks are off only while timing
    budget = bench.run_ops_bench(torch.device("cpu"), tiny=True, max_seconds=0.0)
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in budget["results"])
    assert "| ridge_probe | solve+grad | torch |" in bench.format_table(
        {"methods": {}, "settings": {"profile": "x", "tiny": True, "dataset": "d", "encoder": "e", "ipc": [1],
                                     "steps": 2, "warmup": 0}, "device": {"type": "cpu", "name": "cpu"},
         "versions": {"torch": "t"}, "git": {}, "date": "", "command": "", "setup": {}, "ops": out})


def test_ops_targets_are_judged_against_the_measured_ceilings(ops_bench):
    """Fractions of the measured ceilings and the issue's targets (>= 60% of the matmul rate for the
    streamed cross-entropy, >= 75% of the copy bandwidth for class_centers, faster than torch.compile)."""
    ceilings = {"matmul": {"tflops": 100.0}, "copy": {"gbytes_per_s": 1000.0}}

    def row(op, variant, backend, ms, tflops, gbs):
        return {"op": op, "variant": variant, "backend": backend, "status": "ok", "median_ms": ms,
                "tflops": tflops, "gbytes_per_s": gbs}

    rows = [row("linear_cross_entropy", "loss", "triton", 1.0, 70.0, 10.0),
            row("linear_cross_entropy", "loss", "torch.compile", 2.0, 35.0, 5.0),
            row("class_centers", "atomic", "triton", 3.0, 1.0, 700.0),
            row("class_centers", "atomic", "torch.compile", 2.0, 1.0, 900.0),
            {"op": "class_centers", "variant": "deterministic", "backend": "triton", "status": "skipped"}]
    verdicts = {(v["op"], v["variant"], v["check"]): v for v in ops_bench.against_ceilings(rows, ceilings)}
    assert rows[0]["matmul_fraction"] == pytest.approx(0.7) and rows[2]["copy_fraction"] == pytest.approx(0.7)
    assert verdicts[("linear_cross_entropy", "loss", ">= 60% of the measured matmul rate")]["met"] is True
    assert verdicts[("linear_cross_entropy", "loss", "faster than torch.compile")]["value"] == pytest.approx(2.0)
    assert verdicts[("class_centers", "atomic", ">= 75% of the measured copy rate")]["met"] is False
    assert verdicts[("class_centers", "atomic", "faster than torch.compile")]["met"] is False
    assert verdicts[("class_centers", "deterministic", "faster than torch.compile")]["met"] is None


def test_ops_benchmark_refuses_unknown_ops_and_backends(ops_bench):
    with pytest.raises(ValueError, match="nope"):
        ops_bench.benchmark(torch.device("cpu"), quick=True, ops=["nope"])
    with pytest.raises(ValueError, match="tpu"):
        ops_bench.benchmark(torch.device("cpu"), quick=True, backends=["tpu"])


# ---- every per-op case at its quick CPU shapes, timed in-process by the harness ----------------------
# (benchmarks/ops_bench.py's cases; the torch eager backend, a few repetitions each)

def _quick_cases():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ops_bench

    return [pytest.param(case, id=f"{case.op}-{case.variant}")
            for make_cases in ops_bench.ALL_CASES.values() for case in make_cases(True)]


@pytest.mark.parametrize("case", _quick_cases())
def test_ops_case_is_timed_in_process(ops_bench, case):
    row = ops_bench.run_case(case, "torch", torch.device("cpu"), reps=3, warmup=1)
    case.release()
    assert row["status"] == "ok", row.get("error")
    assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert row["tflops"] > 0 and row["gbytes_per_s"] > 0 and row["peak_extra_mib"] is None  # GPU only


# ---- the harness (benchmarks/harness.py) ------------------------------------------------------------

def test_time_call_is_the_median_of_the_repetitions_after_warm_up(harness, monkeypatch):
    calls = []
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0, 30.0, 32.0])  # the timed calls take 5, 1, 3, 2 s
    monkeypatch.setattr(harness, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # the harness's only
    timing = harness.time_call(lambda: calls.append(1), torch.device("cpu"), reps=4, warmup=3)
    assert len(calls) == 7  # 3 warm-up calls, untimed, then 4 timed
    assert timing.samples == (5.0, 1.0, 3.0, 2.0) and timing.median == 2.5
    assert (timing.min, timing.p20, timing.p80, timing.max) == (1.0, 1.0, 3.0, 5.0)
    assert "wall clock" in timing.timer
    with pytest.raises(ValueError, match="reps"):
        harness.time_call(lambda: None, torch.device("cpu"), reps=0)
    with pytest.raises(ValueError, match="at least one"):
        harness.Timing.from_samples([])


def test_machine_versions_and_revision(harness):
    info = harness.machine_info(torch.device("cpu"))
    assert info["type"] == "cpu" and info["cores"] >= 1 and info["torch_threads"] == torch.get_num_threads()
    assert info["torch_interop_threads"] >= 1 and info["cpu"] in info["name"] and len(info["load_average"]) == 3
    versions = harness.versions()
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert versions["python"] and "triton" in versions and "timm" in versions
    git = harness.git_info()
    assert len(git["revision"]) == 40 and isinstance(git["dirty"], bool)
    assert harness.git_label({"revision": "0123456789abcdef", "dirty": True}) == "0123456+dirty"
    assert harness.git_label({"revision": "0123456789abcdef", "dirty": False}) == "0123456"
    assert harness.git_label({"revision": None, "dirty": None}) == "unknown"
    slug = harness.device_slug(torch.device("cpu"))  # the machine in the file name: another never overwrites it
    assert re.fullmatch(rf"cpu-[a-z0-9-]+-{os.cpu_count()}c", slug), slug


def test_write_json_is_atomic_and_json_safe(harness, tmp_path):
    path = tmp_path / "sub" / "result.json"
    harness.write_json(path, {"nan": float("nan"), "shape": (1, 2), "dtype": torch.float16, 3: "x"})
    assert json.loads(path.read_text()) == {"nan": None, "shape": [1, 2], "dtype": "torch.float16", "3": "x"}

    class Unwritable:
        def __str__(self):
            raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        harness.write_json(path, {"bad": Unwritable()})
    assert json.loads(path.read_text())["shape"] == [1, 2]  # the previous file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary file left
    harness.write_csv(tmp_path / "t.csv", ["a", "b"], [{"a": 1, "b": 2, "extra": 3}])
    assert list(csv.DictReader(open(tmp_path / "t.csv", newline=""))) == [{"a": "1", "b": "2"}]


def test_memory_meter_sees_an_allocation(harness):
    meter = harness.MemoryMeter(torch.device("cpu"), work="the test").start()
    block = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
    out = meter.stop()
    del block
    assert out["peak_memory_bytes"] > 0 and out["extra_memory_bytes"] >= 0 and "the test" in out["memory_measure"]
    if meter.reset:  # the high-water mark could be reset: the extra is this allocation's
        assert out["extra_memory_bytes"] >= 48 * 2 ** 20


def test_scoped_env_restores(harness, monkeypatch):
    monkeypatch.delenv("FASTDD_TEST_SCOPED", raising=False)
    monkeypatch.setenv("FASTDD_TEST_KEPT", "before")
    with harness.scoped_env(FASTDD_TEST_SCOPED="1", FASTDD_TEST_KEPT="during"):
        assert os.environ["FASTDD_TEST_SCOPED"] == "1" and os.environ["FASTDD_TEST_KEPT"] == "during"
    assert "FASTDD_TEST_SCOPED" not in os.environ and os.environ["FASTDD_TEST_KEPT"] == "before"


# ---- the registry drives the plots and the calibration ---------------------------------------------

def test_plot_colours_come_from_the_registry(bench):
    import plots

    colours = [plots.method_color({"kind": "distilled", "method": m}) for m in registry.names()]
    assert len(set(colours)) == len(colours) and plots.BASELINE_COLOR not in colours
    assert plots.method_color({"kind": "baseline", "method": "random_real"}) == plots.BASELINE_COLOR


def test_calibration_passes_method_options_and_tables_every_method(calibrate):
    kw, options = calibrate.distill_arguments(calibrate.distilled_spec(
        "g", "clp", 1, 0, 10, lam=1.0, tau=0.03, lr=0.01, crop_scale=[0.5, 1.0], inheritance=True))
    assert options == {"lam": 1.0, "tau": 0.03} and kw == {"lr": 0.01, "crop_scale": (0.5, 1.0)}
    assert calibrate.distill_arguments(calibrate.distilled_spec("g", REFERENCE, 1, 0, 10, copies=2)) == (
        {"copies": 2}, {})
    args = calibrate.parse_args(["--mode", "table", "--ipcs", "1,10"])
    runs = calibrate.table_runs(args)
    distilled = [r for r in runs if r["kind"] == "distilled"]
    assert {r["method"] for r in distilled} == set(registry.names())
    reference_ipc10 = [r for r in distilled if r["method"] == REFERENCE and r["ipc"] == 10]
    assert [r["copies"] for r in reference_ipc10] == [args.reference_copies_ipc10]
    assert all(r["inheritance"] == (r["method"] == "sfm") for r in distilled if "inheritance" in r or r["method"] == "sfm")
    clp = next(r for r in distilled if r["method"] == "clp")
    assert (clp["lam"], clp["tau"]) == (registry.defaults("clp", clp["ipc"])["lam"], registry.defaults("clp")["tau"])
    with pytest.raises(SystemExit):
        calibrate.parse_args(["--inheritance", "sfm,nope"])


def test_calibration_grid_runs_levers_and_verdicts(calibrate, tmp_path):
    """The grid: every setting runs the baselines, every method with its full defaults in the spec, the
    levers at ipc 1 (a lever the defaults already hold adds no run), the full-data probe; the summary pools
    a setting's default rows apart from its levers and applies the issue's bar."""
    args = calibrate.parse_args(["--mode", "grid", "--datasets", "digits", "--sizes", "16,24", "--ipcs", "1,10",
                                 "--distill-seeds", "0,1", "--levers", "init-centroid,init-real,fixed-tau,fit-tau",
                                 "--out", str(tmp_path)])
    assert calibrate.grid_settings(args) == [("digits", 16), ("digits", 24)]
    runs = calibrate.grid_runs(args, "digits", 16)
    assert all(r["dataset"] == "digits" and r["size"] == 16 for r in runs)
    distilled = [r for r in runs if r["kind"] == "distilled"]
    for r in distilled:  # the method's every default (steps aside) is in its spec
        kw, options = calibrate.distill_arguments(r)
        assert {**kw, **options}.keys() >= set(registry.defaults(r["method"])) - {"steps"}
    ipc10 = [r for r in distilled if r["ipc"] == 10]
    assert {r["method"] for r in ipc10} == set(registry.names()) and len(ipc10) == len(registry.names())
    levers = [r for r in distilled if r["init"] == "centroid" or r.get("fit_tau") is True]
    swept = calibrate.swept_methods()
    # init-centroid for every method (the reference with --reference-seeds), fit-tau for CLP
    assert len(levers) == 2 * len(swept) + args.reference_seeds + 2
    # init-real and fixed-tau are defaults: no runs of their own beside the default rows
    assert len([r for r in distilled if r["ipc"] == 1 and r not in levers and r["method"] in swept]) == 2 * len(swept)
    labels = calibrate.grid_labels(args, "digits", 16)
    assert labels[calibrate.run_key(levers[0])] == (1, f"{levers[0]['method']} init-centroid")
    only_sfm = calibrate.parse_args(["--mode", "grid", "--datasets", "digits", "--methods", "sfm"])
    assert {r["method"] for r in calibrate.grid_runs(only_sfm, "digits", 16) if r["kind"] == "distilled"} == {"sfm"}
    sfm_levers = calibrate.parse_args(["--mode", "grid", "--datasets", "digits", "--methods", "sfm", "--levers",
                                       "init-centroid,fixed-tau"])  # --methods narrows the levers too
    assert {(r["method"], r["init"]) for r in calibrate.grid_runs(sfm_levers, "digits", 16)
            if r["kind"] == "distilled"} == {("sfm", "real"), ("sfm", "centroid")}
    # the summary still labels every method's default rows (a method left out shows as incomplete)
    assert {lab for _, lab in calibrate.grid_labels(only_sfm, "digits", 16).values()} >= set(registry.names())

    def record(spec, accuracy):
        return {**spec, "spec": spec, "accuracies": [accuracy, accuracy + 1.0]}

    centroid = next(r for r in runs if r["kind"] == "class_centroids" and r["ipc"] == 1)
    ipc1 = [r for r in distilled if r["ipc"] == 1 and calibrate.grid_labels(args, "digits", 16)[
        calibrate.run_key(r)][1] == r["method"]]
    fake = [record(centroid, 40.0)] + [record(r, 46.0 if r["method"] != "dm" else 44.0) for r in ipc1]
    cells = calibrate.grid_cells(fake, labels)
    assert cells[(1, "class_centroids")][0] == pytest.approx(40.5)
    assert calibrate.grid_verdict(cells, 1, list(registry.names())) == "incomplete"  # no random-real draw
    fake.append(record(next(r for r in runs if r["kind"] == "random_real" and r["ipc"] == 1), 30.0))
    cells = calibrate.grid_cells(fake, labels)
    assert calibrate.grid_verdict(cells, 1, list(registry.names())) == "no: dm"  # 44.5 < 40.5 + 5
    doc = {"dataset": "digits", "image_size": 16, "runs": fake, "machine": {
        "device": "cpu", "cpu": "x", "cores": 2, "torch_threads": 1, "torch": "2"}, "probe": {
        "epochs": 1, "seeds": [0], "views": 1, "full_epochs": 1}, "invocations": [
        {"command": "python scripts/calibrate.py --mode grid", "git": "abc", "started": "now"}]}
    (tmp_path / "calibration_grid-digits-16px.json").write_text(json.dumps(doc))
    calibrate.write_grid_summary(args)
    table = (tmp_path / "calibration_grid.md").read_text()
    assert "| digits | 16 | 1 | 30.5 +- 0.7 | 40.5 +- 0.7 |" in table and "no: dm" in table


def test_calibration_grid_levers_at_other_ipcs(calibrate):
    """``--lever-ipcs`` runs the levers at ipc 10 with that ipc's steps and seeds; an "every" lever (init-centroid) reaches
    the reference method too, with its reduced copies there; the labels name each lever run at its ipc."""
    args = calibrate.parse_args(["--mode", "grid", "--datasets", "digits", "--ipcs", "1,10", "--steps", "7",
                                 "--steps-ipc10", "5", "--distill-seeds", "0,1", "--levers", "init-centroid",
                                 "--lever-ipcs", "10"])
    runs = [r for r in calibrate.grid_runs(args, "digits", 16) if r["kind"] == "distilled"]
    levers = [r for r in runs if r["init"] == "centroid"]
    assert {r["ipc"] for r in levers} == {10} and {r["steps"] for r in levers} == {5}
    assert sorted(r["method"] for r in levers) == sorted(registry.names())  # one seed each at ipc 10
    reference = next(r for r in levers if registry.get(r["method"]).reference)
    assert reference["copies"] == args.reference_copies_ipc10
    labels = calibrate.grid_labels(args, "digits", 16)
    assert {labels[calibrate.run_key(r)] for r in levers} == {(10, f"{m} init-centroid") for m in registry.names()}
    cells = {(10, "sfm"): (70.0, 0.0, 1), (10, "sfm init-centroid"): (72.5, 0.0, 1)}
    table = "\n".join(calibrate.lever_table([(("digits", 16), cells)], list(registry.names()), args))
    assert "Levers at ipc 10" in table and "| SFM | init-centroid | 72.5 (+2.5) |" in table
    assert "Levers at ipc 1 " not in table
    for bad in (["--levers", "nope"], ["--ipcs", "1", "--levers", "init-centroid", "--lever-ipcs", "10"]):
        with pytest.raises(SystemExit):
            calibrate.parse_args(["--mode", "grid", *bad])


def test_calibration_grid_reference_default_copies_over_its_reduced_row(calibrate, tmp_path):
    """At ipc 10 the reference's run with its own default copies is its default row where it was measured
    (the summary's cell and the verdict read it); its reduced grid row (--reference-copies-ipc10) is a lever
    row beside it, and stands in, marked, only where the default was not measured."""
    args = calibrate.parse_args(["--mode", "grid", "--datasets", "digits", "--ipcs", "1,10", "--steps-ipc10", "5"])
    own = registry.defaults(REFERENCE, 10)["copies"]
    assert own != args.reference_copies_ipc10
    labels = calibrate.grid_labels(args, "digits", 16)
    specs = {copies: calibrate.grid_method_specs(args, REFERENCE, 10, copies=copies)[0]
             for copies in (own, args.reference_copies_ipc10)}
    assert specs[args.reference_copies_ipc10] == calibrate.grid_method_specs(args, REFERENCE, 10)[0]
    reduced = calibrate.reduced_label(args)
    assert {copies: labels[calibrate.run_key(dict(spec, dataset="digits", size=16))]
            for copies, spec in specs.items()} == {own: (10, REFERENCE), args.reference_copies_ipc10: (10, reduced)}
    measured = {(10, REFERENCE): (80.0, 0.0, 1), (10, reduced): (75.0, 0.0, 1)}
    assert calibrate.default_cell(measured, 10, REFERENCE, args) == ((80.0, 0.0, 1), False)
    assert calibrate.default_cell({(10, reduced): (75.0, 0.0, 1)}, 10, REFERENCE, args) == ((75.0, 0.0, 1), True)
    assert calibrate.default_cell({}, 10, REFERENCE, args) == (None, False)
    assert calibrate.default_cell({(10, "sfm copies-1"): (1.0, 0.0, 1)}, 10, "sfm", args) == (None, False)
    table = "\n".join(calibrate.lever_table([(("digits", 16), measured), (("digits", 24), {
        (10, reduced): (75.0, 0.0, 1), (10, f"{REFERENCE} copies-4"): (77.0, 0.0, 1)})], list(registry.names()), args))
    lever = reduced.split()[1]
    assert f"| {REFERENCE.upper()} | {lever} | 75.0 (-5.0) | 75.0 |" in table  # no difference to itself
    assert f"| {REFERENCE.upper()} | copies-4 |  | 77.0 (+2.0) |" in table  # against the stand-in
    # the summary: the reduced row stands in, marked, and the verdict reads it
    for copies, accuracy, shown in ((args.reference_copies_ipc10, 60.0, f"60.0 +- 0.0 (copies "
                                     f"{args.reference_copies_ipc10})"), (own, 70.0, "70.0 +- 0.0 |")):
        out = tmp_path / str(copies)
        out.mkdir()
        runs = [{**spec, "spec": dict(spec, dataset="digits", size=16), "accuracies": [acc, acc]} for spec, acc in (
            (specs[args.reference_copies_ipc10], 60.0), (specs[copies], accuracy),
            (calibrate.baseline_spec("ipc10", "class_centroids", 10), 65.0),
            (calibrate.baseline_spec("ipc10", "random_real", 10, 0), 50.0))]
        doc = {"dataset": "digits", "image_size": 16, "runs": runs, "machine": {
            "device": "cpu", "cpu": "x", "cores": 2, "torch_threads": 1, "torch": "2"}, "probe": {
            "epochs": 1, "seeds": [0], "views": 1, "full_epochs": 1}, "invocations": []}
        (out / "calibration_grid-digits-16px.json").write_text(json.dumps(doc))
        calibrate.write_grid_summary(argparse.Namespace(**{**vars(args), "out": out}))
        summary = (out / "calibration_grid.md").read_text()
        assert shown in summary and ("is its reduced grid row" in summary) == (copies != own)


def test_every_distilled_method_reports_its_floor(bench, tmp_path):
    """The floor of a step (the encoder alone on the step's rows: the copies K x C x ipc synthetic rows,
    forward and backward, plus the real batch of a method that draws one), measured in the run's process:
    floor_time_s > 0 for every distilled run, step / floor in the JSON, the CSV and the table's "vs floor"."""
    result = bench.main(["--tiny", "--in-process", "--quiet", "--no-evaluate", "--no-plots", "--lgm-copies", "2",
                         "--out", str(tmp_path)])
    stem = _stem(result) + "-tiny"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    classes = 10  # --tiny: the digits, 10 classes
    distilled = {k: e for k, e in saved["methods"].items() if e["kind"] == "distilled"}
    assert set(distilled) == {f"{REFERENCE}_k2", *(m for m in registry.names() if m != REFERENCE)}
    for key, e in distilled.items():
        spec = registry.get(e["method"])
        copies = e["copies"] if e["copies"] is not None else spec.defaults_at(e["ipc"])["copies"]
        assert e["floor_status"] == "ok" and e["floor_time_s"] > 0, (key, e.get("floor_status"))
        assert e["floor_synthetic_rows"] == copies * classes * e["ipc"], key
        assert e["floor_real_rows"] == (e["ipc"] * copies * classes if spec.needs.real_batches else 0), key
        assert math.isclose(e["step_vs_floor"], e["step_time_s"] / e["floor_time_s"]), key
    assert saved["methods"][f"{REFERENCE}_k2"]["floor_real_rows"] == 2 * classes  # LGM's real batch, the run's K

    with open(tmp_path / f"{stem}.csv", newline="") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    for key, e in distilled.items():
        assert float(rows[key]["floor_time_s"]) == pytest.approx(e["floor_time_s"])
        assert float(rows[key]["step_vs_floor"]) == pytest.approx(e["step_vs_floor"])

    table = (tmp_path / f"{stem}.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "vs floor" in columns and columns.index("vs floor") == columns.index("speed vs LGM") + 1
    for key, e in distilled.items():
        line = next(line for line in table.splitlines() if line.startswith(f"| {key} |"))
        assert [c.strip() for c in line.strip("|").split("|")][columns.index("vs floor")] == f"{e['step_vs_floor']:.2f}x"


def test_the_floor_is_timed_between_the_steps_and_left_out_of_their_intervals(bench, monkeypatch):
    """The floor's blocks run from the step callback (3 calls after every 10 steps past the warm-up), so
    floor and steps share the machine's minutes; the blocks' time is in neither the steps' intervals nor
    the total. A stand-in distill sleeps 10 ms a step and the floor 40 ms a call."""
    import time

    import fastdd

    def fake_distill(images, encoder, labels, stats, progress, callback, steps, **kwargs):
        for step in range(steps):
            time.sleep(0.01)
            callback(step, torch.zeros(()))

    monkeypatch.setattr(fastdd, "distill", fake_distill)
    monkeypatch.setattr(bench.StepFloor, "call", lambda self: time.sleep(0.04))
    settings = dict(bench.PROFILES["default"], steps=25, warmup=2, seed=0)
    data = {"train_images": torch.rand(4, 3, 8, 8), "train_labels": torch.tensor([0, 0, 1, 1])}
    encoder = SimpleNamespace(feature_dim=3)
    out = bench.run_distillation(settings, data, encoder, None, "sfm", 1, None, torch.device("cpu"), None,
                                 progress=False, whole_process=False)
    assert out["floor_status"] == "ok" and out["floor_after_steps"] == [11, 21]  # after 10 and 20 steps past 2
    assert out["floor_calls"] == 2 * bench.FLOOR_BLOCK
    assert 0.035 < out["floor_time_s"] < 0.08
    assert len(out["step_times_s"]) == 24 and out["steps_timed"] == 23
    assert max(out["step_times_s"]) < 0.035, out["step_times_s"]  # no interval holds a floor block
    assert out["total_time_s"] < 25 * 0.01 + 0.2  # the blocks' 0.28 s (with the warm-up call) left out


def test_memory_profile_reports_memory_at_two_ipc_with_the_chunked_engine(bench, tmp_path):
    result = bench.main(["--profile", "memory", "--tiny", "--in-process", "--quiet", "--no-plots",
                         "--out", str(tmp_path)])
    s = result["settings"]
    assert s["chunk_size"] == 4 and s["ipc"] == [1, 2] and s["evaluate"] is False
    seen = {(e["method"], e["ipc"]) for e in result["methods"].values() if e["kind"] == "distilled"}
    assert seen == {(m, ipc) for m in registry.names() for ipc in (1, 2)}
    for e in result["methods"].values():
        if e["kind"] == "distilled":
            assert e["status"] == "ok" and e["peak_memory_bytes"] > 0 and e["distill_settings"]["chunk_size"] == 4


def test_repeats_take_the_median_of_the_processes(bench, tmp_path):
    result = bench.main(["--tiny", "--in-process", "--quiet", "--no-evaluate", "--no-plots", "--methods", "sfm",
                         "--repeats", "3", "--out", str(tmp_path)])
    e = result["methods"]["sfm"]
    assert e["repeats"] == 3 and len(e["step_time_repeats_s"]) == 3 and len(e["floor_time_repeats_s"]) == 3
    assert e["step_time_s"] == sorted(e["step_time_repeats_s"])[1]
    assert e["floor_time_s"] == sorted(e["floor_time_repeats_s"])[1]
    ratios = [a / b for a, b in zip(e["step_time_repeats_s"], e["floor_time_repeats_s"])]
    assert e["step_vs_floor_repeats"] == ratios and e["step_vs_floor"] == sorted(ratios)[1]
    assert "the median of 3 processes' medians" in (tmp_path / f"{_stem(result)}-tiny.md").read_text()
    calls = []
    assert bench.median_of_repeats(lambda: calls.append(1) or {"status": "capped", "step_time_s": 1.0}, 3)["repeats"] == 0
    assert len(calls) == 1  # a run that did not end ok is not repeated


@pytest.mark.slow
def test_plain_check_times_the_benchmarks_settings_in_plain_processes(bench, tmp_path, monkeypatch):
    """A round runs the method in the benchmark's worker process and in a plain one, in the same minutes;
    the verdict is the median of the rounds' ratios (the run's recorded time only shown)."""
    bench.main(["--tiny", "--in-process", "--quiet", "--no-evaluate", "--no-plots", "--methods", "sfm",
                "--out", str(tmp_path)])
    results = next(tmp_path.glob("*-tiny.json"))
    plain = _load("fastdd_plain_check", REPO / "benchmarks" / "plain_check.py")
    assert plain.main([str(results), "--repeats", "1", "--tolerance", "1e9"]) == 0  # one real round
    check = json.loads(results.with_name(results.stem + "-plain.json").read_text())
    row = check["rows"][0]
    assert check["repeats"] == 1 and row["run"] == "sfm" and len(row["plain_per_process_ms"]) == 1
    assert row["plain_ms"] > 0 and row["benchmark_ms"] > 0 and len(row["benchmark_per_process_ms"]) == 1
    assert row["ratio"] == pytest.approx(row["benchmark_ms"] / row["plain_ms"])
    recorded = json.loads(results.read_text())["methods"]["sfm"]["step_time_s"]
    assert row["recorded_ms"] == pytest.approx(recorded * 1e3)
    assert "| sfm |" in results.with_name(results.stem + "-plain.md").read_text()

    rounds = [{"sfm": (0.10, q)} for q in (0.05, 0.105, 0.2)]  # benchmark 100 ms; plain 50, 105, 200 ms
    monkeypatch.setattr(plain, "paired_processes", lambda path, repeats: rounds)
    assert plain.main([str(results), "--repeats", "3"]) == 0  # the rounds' ratios 2.0, 0.95, 0.5: median 0.95
    row = json.loads(results.with_name(results.stem + "-plain.json").read_text())["rows"][0]
    assert row["plain_ms"] == pytest.approx(105.0) and row["benchmark_ms"] == pytest.approx(100.0) and row["agree"]
    assert row["ratio"] == pytest.approx(0.10 / 0.105) and len(row["ratio_per_round"]) == 3
    assert row["recorded_ms"] == pytest.approx(recorded * 1e3)  # shown, not compared
    assert plain.main([str(results), "--repeats", "3", "--tolerance", "0.01"]) == 1
    rounds[:] = [{"sfm": (b, q)} for b, q in ((0.1, 0.2), (0.2, 0.3), (0.3, 0.1))]  # equal medians, unpaired
    assert plain.main([str(results), "--repeats", "3"]) == 1  # the rounds' ratios 0.5, 0.67, 3: median 0.67


def test_calibration_file_keeps_the_runs_of_another_process(calibrate, tmp_path):
    """Two processes resuming one setting file: each write merges the runs (and invocations) the other
    added meanwhile, so neither loses a run; --fresh (merge=False) overwrites."""
    path = tmp_path / "calibration_grid-digits-16px.json"

    def run(seed):
        spec = {"group": "ipc1", "kind": "random_real", "method": "random_real", "ipc": 1, "seed": seed}
        return {**spec, "spec": spec, "accuracies": [50.0 + seed]}

    first = {"runs": [run(0)], "invocations": [{"command": "a", "started": "2026-01-01T00:00:00"}]}
    second = {"runs": [run(1)], "invocations": [{"command": "b", "started": "2026-01-01T00:00:01"}]}
    calibrate.save_merged(path, first)
    calibrate.save_merged(path, second)  # loaded before `first` was written: gains its run
    on_disk = json.loads(path.read_text())
    assert sorted(r["seed"] for r in on_disk["runs"]) == [0, 1]
    assert [i["command"] for i in on_disk["invocations"]] == ["a", "b"]
    calibrate.save_merged(path, {"runs": [run(2)]}, merge=False)
    assert [r["seed"] for r in json.loads(path.read_text())["runs"]] == [2]


def test_calibration_rows_never_pool_two_settings(calibrate):
    """Runs that differ in a method option outside the swept keys (CLP's fit_tau) are two rows, not one."""
    settings = dict(registry.defaults("clp", 1), steps=200, augment=True)

    def run(seed, fit_tau):
        return {"group": "ipc1", "kind": "distilled", "method": "clp", "ipc": 1, "seed": seed, "steps": 200,
                "accuracies": [60.0 + seed + 5 * fit_tau], "mean": 60.0 + seed + 5 * fit_tau, "step_s": 0.1,
                "distill_settings": dict(settings, fit_tau=fit_tau)}

    rows = calibrate.rows_of([run(0, False), run(1, False), run(0, True), run(1, True)])
    assert [(r["runs"], r["per_run_means"]) for r in rows] == [(2, [60.0, 61.0]), (2, [65.0, 66.0])]
    assert "fit_tau=True" in rows[1]["setting"] and "fit_tau" not in rows[0]["setting"]
