"""fastdd.files and the output-path check: what a failed or interrupted write leaves and says.

Read-only folders and full disks are real here, not simulated: the tests run as root, where permission
bits stop no write, so each such check runs in a child process inside a private mount namespace
(``unshare --mount``) with a fresh tmpfs mounted read-only, or only a few KiB large. The mount is seen
by that child alone and goes with it. Without root (or without ``unshare``) the read-only folder is a
``chmod 555`` folder instead, which refuses a non-root writer for real; the full-disk test then skips.
"""
import ast
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdd import files
from fastdd.files import CorruptFileError, DiskFullError, load_checked, save_checked
from fastdd.validate import output_path

ROOT = Path(__file__).resolve().parents[1]


def _run_on_tmpfs(tmp_path, options: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python child that sees a fresh tmpfs (mounted with ``options``) at the folder
    ``sys.argv[1]``."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    child = [sys.executable, "-c", code, str(mnt)]
    if os.geteuid() != 0 and options.startswith("ro"):
        mnt.chmod(0o555)  # refuses a non-root writer for real
        return subprocess.run(child, capture_output=True, text=True, timeout=180)
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a private tmpfs needs root and unshare(1)")
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 77; shift 2; exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", options,
                           str(mnt), *child], capture_output=True, text=True, timeout=180)
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[-200:]}")
    return proc


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_READ_ONLY_CHILD = r"""
import contextlib, io, json, sys
import torch
from fastdd import cli, distill, encoders
from fastdd.validate import output_path
folder = sys.argv[1]
out = {}
for path in (f"{folder}/x.pt", f"{folder}/new/sub/x.pt"):
    try:
        output_path("--out", path)
        out[path] = "accepted"
    except ValueError as e:
        out[path] = str(e)
def no_work(*args, **kwargs):
    raise SystemExit("the command started its work")
cli._load_split = cli._encoder = no_work
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["cli_code"] = cli.main(["distill", "--data", "x", "--weights", "none", "--out", f"{folder}/set.pt"])
out["cli_err"] = err.getvalue()
class Net(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))
x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 3
try:
    distill(x, encoders.wrap(Net()), "sfm", labels=y, ipc=1, steps=1, checkpoint=f"{folder}/run.ckpt",
            progress=False)
    out["distill"] = "ran"
except Exception as e:
    out["distill"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    """--out (and checkpoint= of distill) in a read-only folder, or below one where folders would be
    created: refused up front, naming the argument and the folder, not the hidden temporary file."""
    res = _result(_run_on_tmpfs(tmp_path, "ro", _READ_ONLY_CHILD))
    folder = str(tmp_path / "mnt")
    for path in (f"{folder}/x.pt", f"{folder}/new/sub/x.pt"):
        assert res[path].startswith(f"--out={path!r} cannot be written: no file can be created in {folder!r}"), res
    assert res["cli_code"] == 2 and len(res["cli_err"].strip().splitlines()) == 1, res
    assert res["cli_err"].startswith("fastdd distill: error: --out=") and "cannot be written" in res["cli_err"]
    assert res["distill"].startswith("ValueError: checkpoint=") and "cannot be written" in res["distill"], res
    assert ".tmp" not in json.dumps(res)


def test_output_path_accepts_missing_folders_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new" / "sub" / "x.pt"
    assert output_path("--out", target) == target
    assert list(tmp_path.iterdir()) == []  # no folder created, the probe file removed


_DISK_FULL_CHILD = r"""
import contextlib, io, json, os, sys
import torch
from fastdd import cli, data, encoders, files
folder = sys.argv[1]
out = {}
try:
    files.save_checked({"x": torch.zeros(200_000)}, f"{folder}/big.pt", "test", 1)
    out["save"] = "saved"
except Exception as e:
    out["save"] = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "filename": getattr(e, "filename", None),
                   "message": str(e), "is_oserror": isinstance(e, OSError)}
out["left"] = os.listdir(folder)
class Net(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))
split = data.Split(torch.rand(6, 3, 64, 64), torch.arange(6) % 3, ["a", "b", "c"])
cli._load_split = lambda *args, **kwargs: split
cli._encoder = lambda args: encoders.wrap(Net())
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["cli_code"] = cli.main(["distill", "--data", "x", "--method", "sfm", "--steps", "1", "--no-progress",
                                "--out", f"{folder}/set.pt"])
out["cli_err"] = err.getvalue()
print(json.dumps(out))
"""


def test_a_full_disk_is_an_error_that_names_the_file_and_says_so(tmp_path):
    res = _result(_run_on_tmpfs(tmp_path, "size=64k", _DISK_FULL_CHILD))
    path = str(tmp_path / "mnt" / "big.pt")
    save = res["save"]
    assert save != "saved" and save["type"] == "DiskFullError" and save["is_oserror"], res
    assert save["errno"] == 28 and save["filename"] == path
    assert save["message"] == f"cannot write {path}: the disk is full (no space left on device)"
    assert res["left"] == []  # the temporary file is gone
    err = res["cli_err"]
    assert res["cli_code"] == 1 and len(err.strip().splitlines()) == 1, res  # a failed run, not a usage error
    assert "set.pt: the disk is full" in err and "inline_container" not in err and "Traceback" not in err


def test_disk_full_error_is_an_oserror_naming_the_target():
    e = DiskFullError(28, "No space left on device", "/data/x.pt")
    assert isinstance(e, OSError) and e.errno == 28 and "/data/x.pt: the disk is full" in str(e)


_KILLED_WRITER = r"""
import os, sys
from fastdd.files import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"x" * 100_000)
    f.flush()
    os.kill(os.getpid(), 9)
"""


def _temps(folder: Path, name: str):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "x.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)])
    assert proc.wait(timeout=120) == -signal.SIGKILL
    left = _temps(tmp_path, "x.pt")
    assert len(left) == 1 and left[0].startswith(f".x.pt.{files._HOST}-{proc.pid}.") and not path.exists()
    save_checked({"a": 1}, path, "test", 1)
    assert _temps(tmp_path, "x.pt") == [] and load_checked(path, "test", 1) == {"a": 1}


def test_only_stale_temporary_files_are_removed(tmp_path):
    """Removed: a dead process's of this host, anything untouched for a day. Kept: a live writer's
    (its pid is alive, or it is another host's or an older fastdd's and young), other files' ones."""
    host = files._HOST
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": f".x.pt.{host}-{dead.pid}.0123abcd.tmp",
            "live": f".x.pt.{host}-{live.pid}.0123abcd.tmp",
            "other_host_young": f".x.pt.elsewhere-{dead.pid}.0123abcd.tmp",
            "other_host_old": f".x.pt.elsewhere-{dead.pid}.4567abcd.tmp",
            "old_format_young": ".x.pt.k2j4_9xq.tmp",
            "old_format_old": ".x.pt.a8b_c7de.tmp",
            "another_file": f".y.pt.{host}-{dead.pid}.0123abcd.tmp",
        }
        for key, name in names.items():
            (tmp_path / name).write_bytes(b"partial")
            if key.endswith("_old"):
                old = time.time() - files.STALE_AGE_S - 60
                os.utime(tmp_path / name, (old, old))
        save_checked({"a": 1}, tmp_path / "x.pt", "test", 1)
        kept = {key for key, name in names.items() if (tmp_path / name).exists()}
        assert kept == {"live", "other_host_young", "old_format_young", "another_file"}
    finally:
        live.kill()
        live.wait()


def test_the_temporary_file_names_this_host_and_process(tmp_path, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", spy)
    files.write_json(tmp_path / "doc.json", {"a": 1})
    assert seen and seen[0].startswith(f".doc.json.{files._HOST}-{os.getpid()}.") and seen[0].endswith(".tmp")
    assert files._HOST.replace("-", "").isalnum()


def test_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        save_checked({"a": 1}, tmp_path / "new.pt", "test", 1)
        files.write_json(tmp_path / "new.json", {"a": 1})
        plain = tmp_path / "plain"
        plain.write_text("x")
        existing = tmp_path / "existing.pt"
        existing.write_text("x")
        existing.chmod(0o604)
        save_checked({"a": 1}, existing, "test", 1)  # an existing file keeps its mode
    finally:
        os.umask(old)
    mode = stat.S_IMODE(plain.stat().st_mode)
    assert mode == 0o640
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == mode
    assert stat.S_IMODE(existing.stat().st_mode) == 0o604


class Opaque:  # a class torch's weights-only loader refuses
    pass


def test_load_checked_says_what_is_wrong_without_torchs_weights_only_advice(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a test file") as info:
        load_checked(tmp_path, "test", 1)
    assert info.value.filename == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checked(tmp_path / "missing.pt", "test", 1)
    path = tmp_path / "pickled.pt"
    torch.save({"format": "test", "payload": Opaque()}, path)
    with pytest.raises(CorruptFileError) as info:
        load_checked(path, "test", 1)
    message = str(info.value)
    assert "pickled.pt" in message and "Python objects" in message and "Opaque" in message, message
    assert "weights_only" not in message and "\x1b" not in message and "\n" not in message


def _torch_loads(path: Path):
    """Every ``torch.load(...)`` call of a Python file: (line, the keywords it passes)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node.lineno, {k.arg: k.value for k in node.keywords}


def test_every_torch_load_of_the_project_runs_no_code():
    found = 0
    for folder in ("fastdd", "scripts", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, keywords in _torch_loads(path):
                found += 1
                value = keywords.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, \
                    f"{path.relative_to(ROOT)}:{line}: torch.load without weights_only=True"
    assert found >= 2  # fastdd.files and scripts/calibrate.py at least: the scan sees them
