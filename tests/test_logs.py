"""The ``fastdd`` logger, the phases' final lines, the JSON log lines, distill's per-phase times and the
loss-curve PNG (fastdd/logs.py)."""
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastdd
from fastdd import logs

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _unconfigured_logger():
    """The fastdd logger as a library user finds it (the command line's tests configure it)."""
    saved = logs.logger.handlers[:], logs.logger.level, logs.logger.propagate
    logs.logger.handlers[:] = [h for h in saved[0] if not getattr(h, "_fastdd", False)]
    logs.logger.setLevel(logging.NOTSET)
    logs.logger.propagate = True
    yield
    logs.logger.handlers[:], logs.logger.level, logs.logger.propagate = saved


def test_a_phase_keeps_a_final_line_with_its_figures(caplog, capsys):
    phase = logs.Phase("reading", total=3, progress=True)
    phase.update(3)
    seconds = phase.done("3 images", images=3)
    assert seconds >= 0 and "fastdd: reading: 3 images" in capsys.readouterr().out  # stays under the bar
    with caplog.at_level(logging.INFO, logger="fastdd"):
        logs.Phase("reading", progress=True).done("3 images", images=3)
    record = next(r for r in caplog.records if r.name == "fastdd")
    assert record.getMessage().startswith("reading: 3 images (") and record.images == 3
    assert "reading" not in capsys.readouterr().out  # the logger shows it: not written twice
    logs.Phase("quiet", progress=False).done("nothing")
    assert "quiet" not in capsys.readouterr().out


def test_phase_lines_can_be_dropped_from_a_handler():
    stream = io.StringIO()
    logs.configure(stream=stream, phases=False)
    logs.Phase("scan", progress=False).done("10 images")
    logs.logger.info("a result")
    assert stream.getvalue() == "fastdd: a result\n"


def test_json_lines_carry_the_message_and_the_extra_fields():
    stream = io.StringIO()
    logs.configure(json_lines=True, stream=stream)
    logs.Phase("scan", progress=False).done("10 images", images=10)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["message"].startswith("scan: 10 images") and line["images"] == 10
    assert line["phase"] == "scan" and line["level"] == "INFO" and line["logger"] == "fastdd"


def test_distill_records_its_phase_times():
    import distributed_worker as worker

    x, y = worker.data()
    out = fastdd.distill(x, worker.encoder(), labels=y, method="sfm", steps=2, progress=False)
    phases = out.settings["phase_seconds"]
    assert set(phases) == {"real_data", "initialisation", "steps"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= out.settings["seconds"]


@pytest.mark.parametrize("history", [[2.0, 1.0, 0.5, 0.01], [0.3, -0.1, 0.2], [1.0], []])
def test_loss_curve_is_a_png(tmp_path, history):
    logs.save_loss_curve(history, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.format == "PNG" and im.size == (640, 400)
        pixels = torch.tensor(list(im.convert("RGB").getdata()))
    drawn = ((pixels == torch.tensor([31, 119, 180])).all(1)).sum()
    assert (drawn > 0) == bool(history)
