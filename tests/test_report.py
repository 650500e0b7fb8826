"""Report outputs (score figure, domain table) and the atomic-write helpers they use."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ffengine.errors import DataError
from ffengine.io_utils import atomic_path, atomic_save_npy, atomic_write_bytes, atomic_write_json
from ffengine.report import (
    domain_table,
    format_domain_table,
    format_reference_class_share,
    plot_score_distribution,
    reference_class_share,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def np_rng() -> np.random.Generator:
    """Seeded numpy generator (conftest's ``rng`` is a torch generator)."""
    return np.random.default_rng(20240613)


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_plot_with_truth_writes_png(tmp_path, np_rng):
    scores = np_rng.standard_normal(5000).astype(np.float32)
    truth = np_rng.choice(5000, 40, replace=False)
    scores[truth] += 6
    out = plot_score_distribution(scores, 3.5, tmp_path / "fig.png", truth_ids=truth,
                                  title="ghost scores")
    assert out == tmp_path / "fig.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    _only(tmp_path, "fig.png")


def test_plot_without_truth_with_nan_inf_and_constant_scores(tmp_path):
    scores = np.array([1.0, 1.0, np.nan, np.inf, 1.0])
    plot_score_distribution(scores, 2.0, tmp_path / "a.png")
    plot_score_distribution(np.full(3, np.nan), float("nan"), tmp_path / "b.svg")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)
    assert b"<svg" in (tmp_path / "b.svg").read_bytes()[:500]


def test_plot_draws_the_split_cut_only_when_given(tmp_path, np_rng):
    scores = np_rng.standard_normal(500)
    # the SVG backend writes each text element's string as a comment beside its glyphs
    with_cut = plot_score_distribution(scores, 1.5, tmp_path / "c.svg", cut=2.25).read_text()
    assert "threshold 1.5" in with_cut and "split cut 2.25" in with_cut
    without = plot_score_distribution(scores, 1.5, tmp_path / "n.svg").read_text()
    assert "threshold 1.5" in without and "split cut" not in without


def test_plot_from_memmap(tmp_path, np_rng):
    np.save(tmp_path / "s.npy", np_rng.standard_normal(1000))
    scores = np.load(tmp_path / "s.npy", mmap_mode="r")
    plot_score_distribution(scores, 3.0, tmp_path / "m.png", truth_ids=[1, 2, 3])
    assert (tmp_path / "m.png").stat().st_size > 0


def test_plot_rejects_bad_input(tmp_path):
    with pytest.raises(DataError):
        plot_score_distribution(np.zeros(0), 1.0, tmp_path / "x.png")
    with pytest.raises(DataError, match="truth_ids"):
        plot_score_distribution(np.zeros(4), 1.0, tmp_path / "x.png", truth_ids=[4])
    _only(tmp_path)


def test_domain_table_sorted_most_suspicious_first():
    names = ["a.com", "b.org", "c.net", "d.io", "empty.xyz"]
    domain_ids = np.array([0] * 10 + [1] * 4 + [2] * 100 + [3] * 4)
    # a: 2/10, b: 2/4 (same count, higher rate), c: 5/100 (most flagged), d: 0/4; ordered by
    # the binomial test's p-value against the other domains, not by count
    flagged = [0, 1, 10, 11] + list(range(14, 19))
    rows = domain_table(flagged, domain_ids, names)
    assert [r["domain"] for r in rows] == ["b.org", "a.com", "c.net", "d.io"]
    assert [r["p_value"] for r in rows] == sorted(r["p_value"] for r in rows)
    c = rows[2]
    assert {k: c[k] for k in ("domain", "flagged", "total", "rate")} == {
        "domain": "c.net", "flagged": 5, "total": 100, "rate": 0.05}
    assert c["ratio"] == pytest.approx(0.05 / (4 / 18)) and not c["suspicious"]
    assert rows[0]["rate"] == 0.5 and rows[3]["flagged"] == 0
    text = format_domain_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["domain", "flagged", "total", "rate", "×others", "p", "verdict"]
    assert lines[4].split()[:4] == ["c.net", "5", "100", "5.00%"]
    assert len({len(line) for line in lines[2:]}) == 1  # fixed width
    assert text.endswith("\n")


def test_domain_table_mapping_names_and_errors():
    rows = domain_table([0], [7, 7, 3], {3: "x", 7: "y"})
    assert [(r["domain"], r["flagged"], r["total"]) for r in rows] == [("y", 1, 2), ("x", 0, 1)]
    with pytest.raises(DataError, match="without a name"):
        domain_table([], [0, 5], ["a"])
    with pytest.raises(DataError, match="flagged_ids"):
        domain_table([3], [0, 0], ["a"])
    with pytest.raises(DataError, match="duplicated"):
        domain_table([0, 0], [0, 0], ["a"])
    assert format_domain_table([]).splitlines()[0].split()[:4] == ["domain", "flagged", "total",
                                                                    "rate"]


def test_domain_table_leaves_skipped_samples_out_of_the_totals():
    # a.com: 10 samples, 4 of them undecodable; b.org: all 3 undecodable
    domain_ids = np.array([0] * 10 + [1] * 3 + [2] * 20)
    skipped = [0, 1, 2, 3, 10, 11, 12]
    rows = {r["domain"]: r for r in domain_table([4, 5, 6, 20], domain_ids,
                                                   ["a.com", "b.org", "c"], skipped_ids=skipped)}
    assert (rows["a.com"]["total"], rows["a.com"]["skipped"], rows["a.com"]["rate"]) == (6, 4, 0.5)
    assert (rows["b.org"]["total"], rows["b.org"]["skipped"], rows["b.org"]["rate"]) == (0, 3, 0.0)
    assert rows["c"]["skipped"] == 0 and rows["c"]["total"] == 20
    # the test's denominator is the scored total: 3 of 6 against 1 of 20 (not 3 of 10)
    want = domain_table([0, 1, 2, 13], np.array([0] * 6 + [2] * 20), ["a.com", "b.org", "c"])
    assert rows["a.com"]["p_value"] == pytest.approx(want[0]["p_value"], rel=1e-12)
    assert rows["a.com"]["p_value"] < 0.5 * domain_table(
        [4, 5, 6, 20], domain_ids, ["a.com", "b.org", "c"])[0]["p_value"]
    with pytest.raises(DataError, match="cannot be flagged"):
        domain_table([0], domain_ids, ["a.com", "b.org", "c"], skipped_ids=skipped)
    with pytest.raises(DataError, match="skipped_ids"):
        domain_table([], domain_ids, ["a.com", "b.org", "c"], skipped_ids=[99])



def test_reference_class_share_counts_like_a_loop(np_rng):
    labels = np_rng.integers(-1, 10, size=400)
    skipped = np_rng.choice(400, 30, replace=False)
    flagged = np_rng.choice(np.setdiff1d(np.arange(400), skipped), 60, replace=False)
    got = reference_class_share(flagged, labels, [9, 3, -1, 9], skipped)
    scored = [i for i in range(400) if i not in set(skipped.tolist())]
    ref = [i for i in scored if labels[i] in (3, 9)]
    other = [i for i in scored if labels[i] >= 0 and labels[i] not in (3, 9)]
    hit = set(flagged.tolist())
    assert got["labels"] == [3, 9]
    assert (got["flagged"], got["total"]) == (sum(i in hit for i in ref), len(ref))
    assert (got["flagged_other"], got["total_other"]) == (sum(i in hit for i in other),
                                                          len(other))
    assert got["rate"] == pytest.approx(got["flagged"] / len(ref))
    assert got["rate_other"] == pytest.approx(got["flagged_other"] / len(other))
    assert got["share"] == pytest.approx(got["flagged"] / 60)
    json.dumps(got)  # goes into summary.json
    text = format_reference_class_share(got)
    assert f"{got['flagged']} of the flagged inputs" in text and "label 3, 9" in text


def test_reference_class_share_is_none_without_a_known_class():
    labels = np.array([9, 9, 1, -1])
    assert reference_class_share([0], labels, [-1]) is None  # optimized x_r: no class
    assert reference_class_share([0], np.full(4, -1), [9]) is None  # unlabelled index
    assert reference_class_share([0], labels, [9], skipped_ids=[0, 1]) is None
    only = reference_class_share([], np.array([9, 9]), [9])
    assert (only["share"], only["rate_other"]) == (0.0, None)
    assert "other labelled" not in format_reference_class_share(only)

def test_atomic_helpers(tmp_path):
    p = atomic_write_bytes(tmp_path / "b.bin", b"abc")
    assert p.read_bytes() == b"abc"
    atomic_write_bytes(p, b"xyz")  # replaces
    assert p.read_bytes() == b"xyz"
    atomic_write_json(tmp_path / "m.json", {"auc": np.float32(0.5), "ids": np.arange(3),
                                             "fpr": float("nan")})
    obj = json.loads((tmp_path / "m.json").read_text())
    assert obj["auc"] == 0.5 and obj["ids"] == [0, 1, 2] and math.isnan(obj["fpr"])
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "strict.json", {"x": float("nan")}, allow_nan=False)
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    atomic_save_npy(tmp_path / "a.npy", arr)
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "never.txt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("writer failed")
    _only(tmp_path, "a.npy", "b.bin", "m.json")
