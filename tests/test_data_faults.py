"""Bad data loses nothing: an interrupted index rebuild never leaves an old hash over new
records, unreadable metadata in shards and indexes gives clear errors, a shard that cannot
be read stops a trace (and is retried on resume) instead of being recorded as skipped
samples, a sample without a caption is skipped by CLIP scoring, and results of unknown
inputs in an output directory are never taken for a finished trace."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ffengine.data.index as index_mod
from ffengine.cli import main
from ffengine.data.index import (
    PackedSample,
    SampleIndex,
    ShardReadError,
    build_index,
    write_pack,
)
from ffengine.data.loader import decode_ids
from ffengine.engine.store import open_result_dir
from ffengine.errors import DataError

from .trace_fixture import BAD_ID, assert_same_results, shared_reference, shared_setup, trace_args


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(values, captions=None):
    return [PackedSample(key=f"s{i}", image=_png(v), label=i % 3,
                         caption=None if captions is None else captions[i])
            for i, v in enumerate(values)]


def test_an_interrupted_rebuild_leaves_no_index_rather_than_an_old_hash(tmp_path, monkeypatch):
    out = tmp_path / "index"
    old = write_pack(_samples([0, 10, 20]), out)
    assert old.image(1)[0, 0, 0] == 10

    real = index_mod.atomic_write_json

    def killed_before_metadata(path, obj):
        if Path(path).name == "metadata.json":
            raise KeyboardInterrupt  # the process dies after records and strings were written
        return real(path, obj)

    monkeypatch.setattr(index_mod, "atomic_write_json", killed_before_metadata)
    with pytest.raises(KeyboardInterrupt):
        write_pack(_samples([200, 210, 220, 230]), out)
    monkeypatch.undo()
    with pytest.raises(DataError, match="not a sample index"):
        SampleIndex(out)
    new = write_pack(_samples([200, 210, 220, 230]), out)
    assert new.hash != old.hash and new.image(1)[0, 0, 0] == 210


def _shard(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unreadable_sample_metadata_counts_as_absent(tmp_path):
    """JSON that is null, a list, not UTF-8, or holds a non-string or malformed url, and a
    label beyond 32 bits: the sample is indexed with label -1 / domain "unknown"."""
    bad_json = [b"null", b"[1, 2]", b"\xff\xfe{", b'{"url": 5}', b'{"url": "http://[abc"}',
                b'{"cls": 99999999999}', b'{"cls": true}']
    members = {}
    for i, j in enumerate(bad_json):
        members[f"k{i}.png"] = _png(i)
        members[f"k{i}.json"] = j
    members["big.png"] = _png(9)
    members["big.cls"] = b"4294967296"
    members["ok.png"] = _png(10)
    members["ok.json"] = b'{"url": "https://www.Example.org/a.png", "cls": 2}'
    index = build_index([_shard(tmp_path / "s.tar", members)], tmp_path / "index")
    assert len(index) == len(bad_json) + 2
    assert index.labels.tolist() == [-1] * (len(bad_json) + 1) + [2]
    names = [index.domain_names[d] for d in index.domains]
    assert names == ["unknown"] * (len(bad_json) + 1) + ["example.org"]


@pytest.mark.parametrize("damage", ["metadata", "no-n", "records", "strings", "dtype"])
def test_a_damaged_index_is_a_data_error_that_says_rebuild(tmp_path, damage):
    out = tmp_path / "index"
    write_pack(_samples([1, 2]), out)
    if damage == "metadata":
        (out / "metadata.json").write_text("{not json")
    elif damage == "no-n":
        meta = json.loads((out / "metadata.json").read_text())
        del meta["n"]
        (out / "metadata.json").write_text(json.dumps(meta))
    elif damage in ("records", "strings"):
        (out / f"{damage}.npy" if damage == "records" else out / "strings.json").unlink()
    else:
        np.save(out / "records.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match="rebuild"):
        SampleIndex(out)


def test_reads_never_move_a_shared_file_offset(tmp_path):
    """Shard reads use pread: DataLoader workers forked with the index's descriptors open
    share their file offsets with the parent, so a seek-then-read could return another
    process's bytes."""
    index = write_pack(_samples([5, 6, 7]), tmp_path / "index")
    assert index.image(2)[0, 0, 0] == 7
    (fd,) = index._files.values()
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    index.close()


def test_a_missing_or_shortened_shard_raises_instead_of_skipping(tmp_path):
    index = write_pack(_samples([5, 6, 7]), tmp_path / "index")
    pack = tmp_path / "index" / "pack.bin"
    data = pack.read_bytes()
    pack.rename(tmp_path / "moved.bin")
    with pytest.raises(ShardReadError, match="was it moved"):
        decode_ids(SampleIndex(tmp_path / "index"), [0, 1])
    pack.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardReadError, match="shorter than when it was indexed"):
        decode_ids(SampleIndex(tmp_path / "index"), [0, 1, 2])
    pack.write_bytes(data)
    index = SampleIndex(tmp_path / "index")
    assert decode_ids(index, [0, 1, 2]).ids.tolist() == [0, 1, 2]
    # a record naming a shard the index does not have: that sample is skipped, not the rest
    records = np.load(tmp_path / "index" / "records.npy")
    records["shard"][1] = 7
    np.save(tmp_path / "index" / "records.npy", records)
    batch = decode_ids(SampleIndex(tmp_path / "index"), [0, 1, 2])
    assert batch.ids.tolist() == [0, 2] and batch.skipped[0][0] == 1
    assert "rebuild" in batch.skipped[0][1]


def test_samples_without_a_readable_caption_are_skipped_when_captions_are_needed(tmp_path):
    index = write_pack(_samples([1, 2, 3], captions=["a dog", None, "a cat"]), tmp_path / "i")
    # the third caption's bytes become invalid UTF-8
    records = np.load(tmp_path / "i" / "records.npy")
    pack = bytearray((tmp_path / "i" / "pack.bin").read_bytes())
    pack[int(records["txt_offset"][2])] = 0xFF
    (tmp_path / "i" / "pack.bin").write_bytes(bytes(pack))
    index = SampleIndex(tmp_path / "i")
    assert decode_ids(index, [0, 1, 2]).ids.tolist() == [0, 1, 2]  # images alone are fine
    batch = decode_ids(index, [0, 1, 2], captions=True)
    assert batch.ids.tolist() == [0]
    reasons = dict(batch.skipped)
    assert "no caption" in reasons[1] and "not UTF-8" in reasons[2]


def test_results_without_metadata_are_never_taken_for_this_trace(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(DataError, match="cannot be checked"):
        open_result_dir(tmp_path, {"a": 1})
    assert not (tmp_path / "metadata.json").exists()


def test_a_trace_whose_shard_went_missing_resumes_once_it_is_back(tmp_path_factory, tmp_path,
                                                                  capsys):
    """The trace stops with a one-line error and records no sample as skipped; with the shard
    restored it finishes with the results of an uninterrupted trace."""
    setup = shared_setup(tmp_path_factory)
    ref = shared_reference(tmp_path_factory, setup)
    root = tmp_path / "setup"
    shutil.copytree(setup["root"] / "index", root / "index")
    for name in ("run", "instance"):
        (root / name).symlink_to(setup["root"] / name)
    moved = root / "pack.bin"
    (root / "index" / "pack.bin").rename(moved)
    out = tmp_path / "out"
    args = trace_args({"root": root}, out)
    assert main(args) == 1
    assert "was it moved" in capsys.readouterr().err
    log = out / "partial" / "done-rank0.jsonl"
    assert not log.exists() or log.read_text().strip() == ""
    # a shard lost for good: told so, the trace finishes with every sample skipped and said
    lost = tmp_path / "lost"
    assert main(trace_args({"root": root}, lost, "--skip-unreadable-shards")) == 1
    err = capsys.readouterr().err  # no sample left to score: a clear error, naming why
    assert "every one of the 121 samples was skipped" in err and "pack.bin" in err
    moved.rename(root / "index" / "pack.bin")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["id"] for s in summary["skipped"]] == [BAD_ID]
    assert_same_results(out, ref)


@pytest.mark.parametrize("line", ['{"t": 0, "chunk": 1}', '{"t": 0, "chunk": 1, "skipped": [3]}'])
def test_a_done_record_without_its_skipped_list_is_damage_not_a_crash_later(tmp_path, line):
    from ffengine.engine.store import DoneLog

    log = tmp_path / "done-rank0.jsonl"
    log.write_text('{"t": 0, "chunk": 0, "skipped": [[5, "bad"]], "pid": 1}\n' + line + "\n")
    with pytest.raises(DataError, match="not a done-record"):
        DoneLog(log, writable=False)
    log.write_text('{"t": 0, "chunk": 0, "skipped": [[5, "bad"]], "pid": 1}\n')
    assert DoneLog(log, writable=False).skipped() == {5: "bad"}
