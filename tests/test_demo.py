"""The demo chain on the bundled data, from scratch with the tiny model (a few tens of
seconds; not a measurement: the real demo numbers are in README.md)."""

from __future__ import annotations

import json
from pathlib import Path

from ffengine.cli import main
from ffengine.methods import DEFAULT_METHOD, METHODS


def test_demo_from_scratch_tiny_json_last_line(tmp_path, capsys):
    args = ["demo", "--workdir", str(tmp_path / "d"), "--from-scratch", "--epochs", "1",
            "--poison-rate", "0.02", "--model", "tiny", "--json", "--quiet"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert {"dacc", "fpr", "fnr", "auc", "n", "n_poisoned", "n_flagged", "asr",
            "asr_untriggered"} <= set(res)
    assert res["n"] == 5100 and res["n_poisoned"] == 100 and not res["bundled_run"]
    assert 0 <= res["asr"] <= 1 and 0 <= res["auc"] <= 1
    assert res["method"] == DEFAULT_METHOD
    assert res["n_instances"] == METHODS[DEFAULT_METHOD].instances
    trace_dir = Path(res["trace"])
    assert trace_dir.parent == tmp_path / "d" / "pe2-r02"
    assert trace_dir.name.startswith(f"trace-{DEFAULT_METHOD}-")
    assert (trace_dir / "scores.png").stat().st_size > 0
    assert any(line.startswith("DACC") for line in lines[:-1])
