"""benchmarks/gpu_check.sh, the one command a lent GPU runs: its dry run (every stage at a tiny size on
the CPU) must pass here, so that the script cannot first fail on the device."""
import csv
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = list(csv.DictReader(open(tmp_path / "stages.tsv"), delimiter="\t"))
    assert [s["stage"] for s in stages] == ["wheels", "device", "build", "tests", "ops", "methods"]
    assert all(s["exit"] == "0" for s in stages)
    summary = (tmp_path / "summary.txt").read_text()
    assert "all stages ok" in summary and "| dm |" in summary and "ceilings:" in summary
    assert list((tmp_path / "ops").glob("*.json")) and list((tmp_path / "run").glob("*.json"))


def test_gpu_check_reports_a_failed_stage(tmp_path):
    env = dict(os.environ, PYTHON="/bin/false")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode != 0
    stages = list(csv.DictReader(open(tmp_path / "stages.tsv"), delimiter="\t"))
    python_stages = [s for s in stages if s["stage"] != "wheels"]  # "wheels" runs echo without wheels
    assert python_stages and all(s["exit"] != "0" for s in python_stages)


def test_gpu_check_refuses_unknown_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
