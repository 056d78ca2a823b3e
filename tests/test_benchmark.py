"""The comparative benchmark (benchmarks/run.py) end to end at tiny sizes, and the files it writes.

Tiny runs: 8x8 digits at 16 px (300 train / 100 test images), 4 steps, 3 probe epochs; the ImageNet
profile at 4 classes, 32 px and a tiny ViT. The checks are on the shape and consistency of the results
(what other tools read), not on their values.
"""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("step_time_s", "total_time_s", "peak_memory_bytes", "accuracy_mean", "accuracy_std")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fastdd_benchmark_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny in-process runs: one thread. torch is imported before benchmarks/run.py can set
    OMP_WAIT_POLICY=PASSIVE for this process, and spinning OpenMP threads on a shared CPU slow tiny
    kernels down several-fold; the child processes of the benchmark get the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _outputs(out: Path, stem: str):
    return {ext: out / f"{stem}.{ext}" for ext in ("json", "csv", "md")}


def _check_png(path: Path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def test_default_profile_end_to_end(bench, tmp_path):
    result = bench.main(["--tiny", "--in-process", "--quiet", "--out", str(tmp_path)])
    files = _outputs(tmp_path, "cpu-" + result["date"][:10] + "-tiny")
    for path in files.values():
        assert path.is_file(), path

    saved = json.loads(files["json"].read_text())
    assert saved["schema"] == "fastdd.benchmark/1"
    for key in ("device", "versions", "settings", "methods", "git", "setup", "date", "command"):
        assert key in saved, key
    assert saved["device"]["type"] == "cpu" and saved["device"]["cores"] >= 1
    assert saved["versions"]["torch"] and saved["versions"]["python"]
    assert saved["settings"]["dataset"] == "digits" and saved["settings"]["steps"] == 4
    methods = saved["methods"]
    assert set(methods) == {"lgm", "sfm", "clp", "random_real", "class_centroids", "full_data"}
    for key, entry in methods.items():
        for field in REQUIRED:
            assert field in entry, (key, field)
        assert 0.0 <= entry["accuracy_mean"] <= 100.0 and entry["accuracy_std"] >= 0.0, key
    for key in ("lgm", "sfm", "clp"):
        e = methods[key]
        assert e["kind"] == "distilled" and e["status"] == "ok" and e["method"] == key
        assert e["step_time_s"] > 0 and e["total_time_s"] >= e["step_time_s"]
        assert e["peak_memory_bytes"] > 0 and e["extra_memory_bytes"] >= 0
        assert len(e["step_times_s"]) == 3  # 4 steps: 3 intervals between step callbacks
        assert math.isclose(e["speedup_vs_lgm"], methods["lgm"]["step_time_s"] / e["step_time_s"])
        assert len(e["accuracies"]) == 2  # --tiny probes with seeds 0 and 1
    assert methods["lgm"]["copies"] == 10 and methods["lgm"]["speedup_vs_lgm"] == 1.0
    assert methods["random_real"]["kind"] == "baseline" and len(methods["random_real"]["accuracies"]) == 4
    assert methods["full_data"]["kind"] == "ceiling" and methods["full_data"]["step_time_s"] is None

    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == list(methods)
    assert list(rows[0]) == bench.CSV_COLUMNS
    assert float(rows[0]["step_time_s"]) == pytest.approx(methods["lgm"]["step_time_s"])

    table = files["md"].read_text()
    assert "| run | status | per-step (ms)" in table and "| clp | ok |" in table
    stem = files["json"].with_suffix("")
    for suffix in ("-time-memory.png", "-accuracy.png", "-images.png"):
        _check_png(Path(f"{stem}{suffix}"))
    assert all((REPO / p).is_file() or Path(p).is_file() for p in saved["files"])


@pytest.mark.slow
def test_cpu_memory_is_measured_in_a_child_process(bench, tmp_path):
    result = bench.main(["--tiny", "--methods", "sfm,lgm", "--lgm-copies", "1", "--no-evaluate", "--no-plots",
                         "--quiet", "--out", str(tmp_path)])
    assert result["settings"]["isolation"] == "one child process per method"
    for key in ("sfm", "lgm_k1"):
        e = result["methods"][key]
        assert e["status"] == "ok", e.get("error")
        # the child's ru_maxrss covers torch + encoder + data: far above the extra of a 4-step run
        assert e["peak_memory_bytes"] > 100 * 2 ** 20 and 0 <= e["extra_memory_bytes"] < e["peak_memory_bytes"]
        assert "child process" in e["memory_measure"]
        assert e["accuracy_mean"] is None
    # no LGM with 10 copies ran: the ratios use the LGM that did
    assert result["methods"]["sfm"]["ratio_reference"] == "lgm_k1"


def test_imagenet1k_profile_tiny(bench, tmp_path):
    result = bench.main(["--profile", "imagenet1k", "--tiny", "--in-process", "--quiet", "--no-ops",
                         "--out", str(tmp_path)])
    s = result["settings"]
    assert s["profile"] == "imagenet1k" and s["dataset"] == "synthetic" and s["evaluate"] is False
    assert s["chunk_size"] == 4 and result["setup"]["feature_dim"] == 192
    expected = {"lgm_k1", "lgm_k2", "sfm", "clp", "lgm_k1_ipc2", "lgm_k2_ipc2", "sfm_ipc2", "clp_ipc2"}
    assert set(result["methods"]) == expected
    for key, e in result["methods"].items():
        assert e["status"] == "ok" and e["step_time_s"] > 0 and e["accuracy_mean"] is None, key
        assert e["ratio_reference"] == ("lgm_k2" if e["ipc"] == 1 else "lgm_k2_ipc2")
    assert result["methods"]["lgm_k2_ipc2"]["distill_settings"]["copies"] == 2
    assert result["methods"]["clp"]["distill_settings"]["chunk_size"] == 4
    saved = json.loads((tmp_path / f"cpu-{result['date'][:10]}-imagenet1k-tiny.json").read_text())
    assert set(saved["methods"]) == expected
    _check_png(tmp_path / f"cpu-{result['date'][:10]}-imagenet1k-tiny-time-memory.png")


def test_time_cap_stops_a_run_and_keeps_its_timing(bench, tmp_path):
    result = bench.main(["--profile", "imagenet1k", "--tiny", "--in-process", "--quiet", "--no-ops", "--no-plots",
                         "--methods", "sfm", "--ipc", "1", "--steps", "5", "--max-run-seconds", "1e-6",
                         "--out", str(tmp_path)])
    e = result["methods"]["sfm"]
    assert e["status"] == "time-capped" and e["steps_done"] == 1  # stopped at the first step's callback
    assert e["step_time_s"] is None and e["first_step_s"] > 0 and e["total_time_s"] is None


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
    out = bench.run_distillation(settings, data, None, None, "lgm", 1, 10, torch.device("cpu"), None,
                                 progress=False, whole_process=False)
    assert out["status"] == "oom" and "out of memory" in out["error"]
    assert out["peak_memory_bytes"] is None and out["step_time_s"] is None


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


def test_bad_options_are_refused(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "lgm,foo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "1", "--out", str(tmp_path)])


def test_ops_bench_loop_covers_every_case_and_backend(bench, monkeypatch):
    """The GPU path's loop (ops_bench.run_case per case and backend), here on the CPU: GPU-only backends
    are reported as skipped, and the time budget skips what is left."""
    ops_bench = pytest.importorskip("ops_bench")
    monkeypatch.setattr(ops_bench, "BACKENDS", ("torch", "triton"))
    monkeypatch.setattr(ops_bench, "ALL_CASES", {"flow_matching_loss": ops_bench.ALL_CASES["flow_matching_loss"],
                                                 "ridge_probe": ops_bench.ALL_CASES["ridge_probe"]})
    out = bench._ops_bench_cases(ops_bench, torch.device("cpu"), True, None)
    rows = {(r["op"], r["backend"]): r for r in out["results"]}
    assert set(rows) == {(op, b) for op in ("flow_matching_loss", "ridge_probe") for b in ("torch", "triton")}
    assert rows[("ridge_probe", "torch")]["status"] == "ok" and rows[("ridge_probe", "torch")]["median_ms"] > 0
    assert out["ceilings"]["matmul"]["tflops"] > 0 and out["ceilings"]["copy"]["gbytes_per_s"] > 0
    assert 0 < rows[("ridge_probe", "torch")]["matmul_fraction"] and "copy_fraction" in rows[("ridge_probe", "torch")]
    assert rows[("ridge_probe", "triton")]["status"] == "skipped"
    out = bench._ops_bench_cases(ops_bench, torch.device("cpu"), True, 0.0)
    assert all(r["status"] == "skipped" for r in out["results"])
    assert "| ridge_probe | solve+grad | torch |" in bench.format_table(
        {"methods": {}, "settings": {"profile": "x", "tiny": True, "dataset": "d", "encoder": "e", "ipc": [1],
                                     "steps": 2, "warmup": 0}, "device": {"type": "cpu", "name": "cpu"},
         "versions": {"torch": "t"}, "git": {}, "date": "", "command": "", "setup": {},
         "ops": bench._ops_bench_cases(ops_bench, torch.device("cpu"), True, None)})


def test_ops_targets_are_judged_against_the_measured_ceilings():
    """Fractions of the measured ceilings and the issue's targets (>= 60% of the matmul rate for the
    streamed cross-entropy, >= 75% of the copy bandwidth for class_centers, faster than torch.compile)."""
    ops_bench = pytest.importorskip("ops_bench")
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


# ---- the per-op kernel benchmark on the CPU, through pytest-benchmark -------------------------------
# The cases are ops' (benchmarks/ops_bench.py, quick CPU shapes); benchmarks/run.py --ops runs this test
# in a child pytest with eager and torch.compile backends and folds its --benchmark-json into its result.
# In the plain test suite it times the eager reference only, a few rounds each.

def _ops_cases():
    import os
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import ops_bench
    except Exception:  # ops' file is optional for this suite
        return []
    backends = os.environ.get("FASTDD_OPS_BENCH_BACKENDS", "torch").split(",")
    return [pytest.param(case, backend, id=f"{case.op}-{case.variant}-{backend}")
            for make_cases in ops_bench.ALL_CASES.values() for case in make_cases(True)
            for backend in backends if backend in case.runners]


@pytest.mark.parametrize("case,backend", _ops_cases())
def test_ops_case(benchmark, case, backend):
    fn = case.runners[backend](case.build(torch.device("cpu")))
    first = fn()  # compilation and first-call costs stay out of the timing
    assert first is not None
    benchmark.extra_info.update(op=case.op, variant=case.variant, backend=backend,
                                shape={k: str(v) for k, v in case.shape.items()})
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
