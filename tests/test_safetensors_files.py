"""fastdd's files without pickle: ``DistilledSet`` and ``RealStats`` saved as safetensors files that any
safetensors client reads, the torch zip files of earlier versions still loaded, and a tampered file refused."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastdd import export, files
from fastdd.distilled import DISTILLED_FORMAT, DISTILLED_VERSION, DistilledSet
from fastdd.files import CorruptFileError
from fastdd.stats import STATS_FORMAT, STATS_FORMAT_VERSION, RealStats


def _set():
    g = torch.Generator().manual_seed(0)
    settings = {"ipc": 2, "lr": 0.01, "size": (8, 10), "bank_dtype": torch.float16, "clip": float("inf"),
                "encoder": None, "steps": [1, 2]}
    return DistilledSet(torch.rand(6, 3, 8, 10, generator=g), torch.arange(3).repeat_interleave(2), "clp",
                        settings, [1.0, 0.5, float("nan")], classes=["cat", "dog", "émeu"])


def _stats():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 6, generator=g)
    s = RealStats.from_features(z.to(torch.bfloat16), torch.arange(40) % 4, bank=True, second_moment=True)
    return RealStats(s.counts, s.sums, s.sq_sums, s.bank_features, s.bank_labels, "tiny", "abc123")


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _same_set(a, b):
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.method == b.method
    assert a.classes == b.classes and files.checksum(a.settings) == files.checksum(b.settings)
    assert files.checksum(a.history) == files.checksum(b.history)


def _mapped(t, path):
    """Whether ``t``'s memory lies in a mapping of ``path`` (Linux's /proc/self/maps)."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == str(path):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_a_distilled_set_round_trips_through_safetensors_that_any_client_reads(tmp_path):
    out = _set()
    path = tmp_path / "set.safetensors"
    out.save(path)
    raw = path.read_bytes()
    assert raw[8:9] == b"{" and struct.unpack("<Q", raw[:8])[0] % 8 == 0  # safetensors, not a torch zip
    tensors = load_file(path)
    assert set(tensors) == {"images", "labels"}
    assert torch.equal(tensors["images"], out.images) and torch.equal(tensors["labels"], out.labels)
    md = _metadata(path)
    assert md["format"] == DISTILLED_FORMAT and md["format_version"] == str(DISTILLED_VERSION)
    payload = json.loads(md["payload"])  # plain JSON: NaN and Inf are tagged, never bare
    assert payload["method"] == "clp" and payload["classes"] == ["cat", "dog", "émeu"]
    assert payload["images"] == {"__tensor__": "images"} and payload["settings"]["size"] == {"__tuple__": [8, 10]}
    back = DistilledSet.load(path)
    _same_set(back, out)
    assert back.settings["size"] == (8, 10) and back.settings["bank_dtype"] is torch.float16
    assert md["checksum"] == files.checksum({"images": out.images, "labels": out.labels, "method": "clp",
                                             "settings": out.settings, "history": out.history,
                                             "classes": out.classes})
    _same_set(export.load(path), out)  # fastdd.export (and evaluate) read it too
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # written atomically


def test_real_stats_round_trip_through_safetensors_with_a_memory_mapped_bank(tmp_path):
    s = _stats()
    path = tmp_path / "stats.safetensors"
    s.save(path)
    tensors = load_file(path)
    assert set(tensors) == {"counts", "sums", "sq_sums", "bank_features", "bank_labels"}
    assert tensors["bank_features"].dtype == torch.bfloat16 and torch.equal(tensors["bank_features"], s.bank_features)
    assert torch.equal(tensors["sums"], s.sums) and tensors["sums"].dtype == torch.float64
    md = _metadata(path)
    assert md["format"] == STATS_FORMAT and md["format_version"] == str(STATS_FORMAT_VERSION) and md["checksum"]
    assert json.loads(md["payload"])["encoder_fingerprint"] == "abc123"
    t = RealStats.load(path)
    assert _mapped(t.bank_features, path)  # mmap=True (the default): the bank maps the file
    assert torch.equal(t.bank_features, s.bank_features) and torch.equal(t.sq_sums, s.sq_sums)
    assert torch.equal(t.counts, s.counts) and torch.equal(t.bank_labels, s.bank_labels)
    assert (t.encoder_name, t.encoder_fingerprint) == ("tiny", "abc123")
    u = RealStats.load(path, mmap=False)
    assert not _mapped(u.bank_features, path) and torch.equal(u.bank_features, s.bank_features)
    t.save(tmp_path / "again.safetensors")  # a memory-mapped bank saves again
    assert torch.equal(RealStats.load(tmp_path / "again.safetensors").bank_features, s.bank_features)
    s.save(path, include_bank=False)
    assert not RealStats.load(path).has_bank and set(load_file(path)) == {"counts", "sums", "sq_sums"}


def test_torch_format_files_of_earlier_versions_still_load(tmp_path):
    out, s = _set(), _stats()
    old_set, old_stats = tmp_path / "set.pt", tmp_path / "stats.pt"
    files.save_checked({"images": out.images, "labels": out.labels, "method": out.method, "settings": out.settings,
                        "history": out.history, "classes": out.classes}, old_set, DISTILLED_FORMAT, DISTILLED_VERSION)
    files.save_checked({"counts": s.counts, "sums": s.sums, "sq_sums": s.sq_sums, "bank_features": s.bank_features,
                        "bank_labels": s.bank_labels, "encoder_name": "tiny", "encoder_fingerprint": "abc123"},
                       old_stats, STATS_FORMAT, STATS_FORMAT_VERSION)
    assert old_set.read_bytes()[:2] == b"PK" and old_stats.read_bytes()[:2] == b"PK"
    _same_set(DistilledSet.load(old_set), out)
    t = RealStats.load(old_stats)
    assert torch.equal(t.bank_features, s.bank_features) and t.encoder_fingerprint == "abc123"
    # loaded from the old format, saved again in the new one by default; the old one on request
    DistilledSet.load(old_set).save(tmp_path / "new.safetensors")
    t.save(tmp_path / "new_stats.safetensors")
    assert set(load_file(tmp_path / "new.safetensors")) == {"images", "labels"}
    assert torch.equal(load_file(tmp_path / "new_stats.safetensors")["bank_features"], s.bank_features)
    out.save(tmp_path / "again.pt", container="torch")
    assert (tmp_path / "again.pt").read_bytes()[:2] == b"PK"
    _same_set(DistilledSet.load(tmp_path / "again.pt"), out)
    with pytest.raises(ValueError, match="container"):
        out.save(tmp_path / "x", container="pickle")


def _rewrite(src, dst, **metadata):
    """``src`` written again by safetensors itself with some metadata changed."""
    md = {**_metadata(src), **metadata}
    save_file(load_file(src), str(dst), metadata=md)


def test_a_tampered_safetensors_file_is_refused(tmp_path):
    out = _set()
    path = tmp_path / "set.safetensors"
    out.save(path)
    raw = path.read_bytes()
    assert load_file(path)  # a safetensors file

    pos = raw.find(out.images.numpy().tobytes()[:16])
    assert pos > 0
    altered = bytearray(raw)
    altered[pos + 5] ^= 0x10
    (tmp_path / "pixels.safetensors").write_bytes(bytes(altered))
    with pytest.raises(CorruptFileError, match=r"pixels\.safetensors is corrupt: its checksum"):
        DistilledSet.load(tmp_path / "pixels.safetensors")

    payload = json.loads(_metadata(path)["payload"])
    payload["method"] = "dm"
    _rewrite(path, tmp_path / "method.safetensors", payload=json.dumps(payload))
    with pytest.raises(CorruptFileError, match="checksum"):
        DistilledSet.load(tmp_path / "method.safetensors")
    _rewrite(path, tmp_path / "kind.safetensors", format=STATS_FORMAT)
    with pytest.raises(CorruptFileError, match="expected a 'fastdd.DistilledSet'"):
        DistilledSet.load(tmp_path / "kind.safetensors")
    _rewrite(path, tmp_path / "newer.safetensors", format_version=str(DISTILLED_VERSION + 1))
    with pytest.raises(CorruptFileError, match="format version"):
        DistilledSet.load(tmp_path / "newer.safetensors")
    payload["settings"]["bank_dtype"] = {"__dtype__": "load"}  # names a function, not a dtype: refused
    _rewrite(path, tmp_path / "code.safetensors", payload=json.dumps(payload))
    with pytest.raises(CorruptFileError, match="malformed __dtype__"):
        DistilledSet.load(tmp_path / "code.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(CorruptFileError, match=r"cut\.safetensors"):
        DistilledSet.load(tmp_path / "cut.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match="not a fastdd file"):
        DistilledSet.load(tmp_path / "model.safetensors")
    assert DistilledSet.load(tmp_path / "set.safetensors", ) is not None
    files.load_checked(tmp_path / "pixels.safetensors", DISTILLED_FORMAT, DISTILLED_VERSION, verify=False)


def test_export_reads_safetensors_files_of_fastdd_and_of_other_tools(tmp_path):
    out = _set()
    out.save(tmp_path / "set.safetensors")
    record = files.load_tensors(tmp_path / "set.safetensors")
    assert record["format"] == DISTILLED_FORMAT and torch.equal(record["payload"]["images"], out.images)
    save_file({"weight": torch.ones(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert set(files.load_tensors(tmp_path / "model.safetensors")) == {"weight"}  # a foreign file: its tensors
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "set.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut\.safetensors cannot be read as a tensor file \(\S+cut\.safetensors is"):
        files.load_tensors(tmp_path / "cut.safetensors")
