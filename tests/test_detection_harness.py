"""The detection harness's bookkeeping (bench/detection.py): which cached trace each method
is sliced from, which methods apply to CLIP runs, and the summary rule that picks the
default method. The runs themselves are benchmarks, not tests."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ffengine.detect import OTSU_MIN_ETA, flag, refine_by_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
detection = pytest.importorskip("detection")
report = pytest.importorskip("detection_report")


def test_every_method_has_a_trace_that_holds_it():
    for name, m in detection.METHODS.items():
        ckpts, draws, _ = detection.TRACES[detection.trace_name(name)]
        assert ckpts == m.checkpoints and draws >= m.draws


def test_clip_methods_are_sliced_from_one_draw_traces_only():
    clip = detection.GRIDS["clip"][0]
    assert clip.is_clip and not detection.GridConfig().is_clip
    applicable = [n for n in detection.METHODS if detection.applies(n, clip)]
    assert "paper" in applicable and "last-max16x5" not in applicable
    for name in applicable:
        assert detection.TRACES[detection.trace_name(name, clip=True)][1] == 1
    # every method applies to a SimCLR configuration
    assert all(detection.applies(n, detection.GridConfig()) for n in detection.METHODS)


def test_config_names_are_unique_across_the_grids():
    configs = {c for g in detection.GRIDS.values() for c in g}
    assert len({c.name for c in configs}) == len(configs)


def test_config_names_keep_their_rate_tags():
    # cached runs are found by name: whole percents keep the two-digit tag they had
    from dataclasses import replace

    base = detection.GridConfig()
    assert [replace(base, poison_rate=r).rate_tag for r in (0.01, 0.05, 0.10, 0.15)] == [
        "01", "05", "10", "15"]
    assert replace(base, poison_rate=0.005).rate_tag == "0p5"
    assert replace(base, poison_rate=0.075).name.startswith("pe2-r7p5-")


def _row(config, method, dacc, took=True, attack="pe2", n_instances=5):
    return {"config": config, "method": method, "attack": attack, "took": took,
            "dacc": dacc, "fpr": 1 - dacc, "fnr": 1 - dacc, "auc": dacc,
            "tp": round(500 * dacc), "fp": round(4500 * (1 - dacc)), "n_instances": n_instances}


def test_summary_picks_the_best_worst_case_only_with_enough_configurations():
    rows = [_row("a", "paper", 0.90), _row("a", "last-max16x5", 0.95)]
    assert detection.summary(rows)["best_by_rule"] is None  # one configuration is not a grid
    rows += [_row("b", "paper", 0.93), _row("b", "last-max16x5", 0.91),
             _row("c", "paper", 0.50, took=False), _row("c", "last-max16x5", 0.10, took=False)]
    s = detection.summary(rows)
    # worst case over a and b: paper 0.90 vs last-max16x5 0.91; c did not take
    assert s["best_by_rule"] == "last-max16x5" and s["n_configs"] == 2
    assert s["n_configs_tried"] == 3 and s["paper"]["dacc_min"] == 0.90
    # the default method's worst case is reported even where it was not measured everywhere
    s = detection._summary(rows, "last-max16x5")
    assert s["n_configs"] == 2 and s["default_n_configs"] == 2 and s["dacc_min"] == 0.91
    s = detection._summary(rows, "last-x5")
    assert s["n_configs"] == 2 and s["default_n_configs"] == 0 and s["dacc_min"] is None
    # a method missing on one configuration where the attack took is not eligible
    rows += [_row("a", "last-x5", 0.99)]
    assert detection.summary(rows)["best_by_rule"] == "last-max16x5"


def test_summary_never_picks_a_method_that_flags_nothing():
    # with few poisons, flagging nothing scores a high DACC; such a method is not a detector
    nothing = [{**_row(c, "paper-k6", 0.95), "fnr": 1.0, "fpr": 0.0} for c in ("a", "b")]
    rows = nothing + [_row("a", "paper", 0.90), _row("b", "paper", 0.92)]
    assert detection.summary(rows)["best_by_rule"] == "paper"
    rows += [{**_row("ct", "paper-k6", 0.95, attack="ct"), "fnr": 0.95},
             {**_row("ce", "paper-k6", 0.87, attack="corruptencoder"), "fnr": 1.0},
             {**_row("ct", "last-x5", 0.87, attack="ct"), "fnr": 0.6},
             {**_row("ce", "last-x5", 0.81, attack="corruptencoder"), "fnr": 0.8}]
    assert detection.summary(rows)["clip"]["best_by_rule"] == "last-x5"


def test_summary_keeps_clip_configurations_apart():
    rows = [_row("a", "paper", 0.9), _row("b", "paper", 0.8),
            _row("ct", "paper", 0.2, attack="ct")]
    s = detection.summary(rows)
    assert s["n_configs"] == 2 and s["paper"]["dacc_min"] == 0.8
    assert s["clip"]["n_configs"] == 1 and s["clip"]["paper"]["dacc_min"] == 0.2


def test_rise_methods_weight_the_instances_they_use_by_the_traces_cosines():
    """method_metrics slices the trace's cos (T, K) to the instances a method averages, and
    a rise method without the cosines is an error, not Eq. 5 in disguise."""
    rng = np.random.default_rng(0)
    T, D, n, K = 3, 1, 200, 5
    truth = {"poisoned_ids": list(range(10)), "n": n}
    labels = rng.integers(0, 10, n)
    terms = rng.normal(size=(T, D, n, K)).astype(np.float32)
    # only checkpoint 2 of instance 0 rises, and only there do the poisons stand out
    cos = np.array([[0.5] * K, [0.4] * K, [0.9] + [0.1] * (K - 1)])
    terms[2, :, :10, 0] += 20
    terms[1, :, 10:20, 0] += 20  # a fall: weighted 0 by rise, counted by Eq. 5
    rise = detection.METHODS["paper-rise"]
    m = detection.method_metrics(terms, rise, truth, labels, 9, cos=cos)
    assert m["auc"] == 1.0 and m["fnr"] == 0.0 and m["n_instances"] == 1
    eq5 = detection.method_metrics(terms, detection.METHODS["paper"], truth, labels, 9)
    assert eq5["auc"] < 1.0
    with pytest.raises(ValueError, match="cos"):
        detection.method_metrics(terms, rise, truth, labels, 9)


def test_recorded_times_survive_a_rescoring_call(tmp_path, monkeypatch):
    """Rows re-scored from the cache report the pre-training and trace times of when they ran
    (seeded from the results file for caches older than times.json), not ~0 s."""
    old = [{"config": "c", "method": "paper", "attack": "pe2", "data_s": 2.0,
            "pretrain_s": 600.0, "trace_s": 80.0},
           {"config": "c", "method": "paper-rise", "attack": "pe2", "data_s": 0.0,
            "pretrain_s": 0.0, "trace_s": 0.0},
           {"config": "other", "method": "paper", "attack": "pe2", "data_s": 9.0,
            "pretrain_s": 9.0, "trace_s": 9.0}]
    monkeypatch.setattr(detection, "load_results", lambda: {"rows": old})
    t = detection._recorded_times(tmp_path, "c", None, None)
    assert t == {"data_s": 2.0, "pretrain_s": 600.0, "trace_s": {"all-d1": 80.0}}
    # work done in this call replaces what was recorded; times.json wins over the rows
    t = detection._recorded_times(tmp_path, "c", 1.26, 700.04)
    assert (t["data_s"], t["pretrain_s"]) == (1.3, 700.0)
    (tmp_path / "times.json").write_text('{"data_s": 5, "pretrain_s": 50, "trace_s": {}}')
    assert detection._recorded_times(tmp_path, "c", None, None)["pretrain_s"] == 50
    assert detection._recorded_times(tmp_path / "none", "new", None, None) == {
        "data_s": None, "pretrain_s": None, "trace_s": {}}


def test_saving_rows_never_drops_rows_of_methods_this_process_does_not_know(tmp_path,
                                                                           monkeypatch):
    """A harness process started before a method was added must not delete that method's
    rows when it saves its own; the reports leave out methods no longer defined."""
    monkeypatch.setattr(detection, "RESULTS", tmp_path / "detection.json")
    detection.atomic_write_json(detection.RESULTS, {"rows": [
        {"config": "a", "method": "newer-method", "dacc": 0.5},
        {"config": "a", "method": "paper", "dacc": 0.1}]})
    detection.save_rows([{"config": "a", "method": "paper", "dacc": 0.2}], "cmd")
    rows = detection.load_results()["rows"]
    assert {(r["method"], r["dacc"]) for r in rows} == {("newer-method", 0.5), ("paper", 0.2)}


def test_saving_rows_replaces_re_measured_rows_in_place_and_appends_new_ones(tmp_path,
                                                                            monkeypatch):
    """A re-run changes its rows where they stand, so the results file's diff shows only
    what changed; rows of a configuration or method not in the file go at the end."""
    monkeypatch.setattr(detection, "RESULTS", tmp_path / "detection.json")
    detection.atomic_write_json(detection.RESULTS, {"rows": [
        {"config": "a", "method": "paper", "dacc": 0.1},
        {"config": "b", "method": "paper", "dacc": 0.3},
        {"config": "c", "method": "paper", "dacc": 0.4}]})
    detection.save_rows([{"config": "d", "method": "paper", "dacc": 0.6},
                         {"config": "a", "method": "paper", "dacc": 0.2},
                         {"config": "a", "method": "paper-k6", "dacc": 0.5}], "cmd")
    rows = detection.load_results()["rows"]
    assert [(r["config"], r["method"], r["dacc"]) for r in rows] == [
        ("a", "paper", 0.2), ("b", "paper", 0.3), ("c", "paper", 0.4),
        ("d", "paper", 0.6), ("a", "paper-k6", 0.5)]
    assert rows[0]["command"] == "cmd" and "command" not in rows[1]


def test_saved_scores_give_back_every_method_and_the_metrics_they_were_measured_with(
        tmp_path, monkeypatch):
    """The per-sample scores file holds each method's scores (methods that differ only in k
    stored once), merges a later call's methods into an earlier call's, and re-measuring
    from it gives the row's metrics."""
    monkeypatch.setattr(detection, "SCORES_DIR", tmp_path / "scores")  # made when needed
    rng = np.random.default_rng(1)
    T, D, n, K = 2, 16, 300, 5
    terms = rng.standard_normal((T, D, n, K)).astype(np.float32)
    terms[..., :20, :] += 1.5
    truth = {"poisoned_ids": list(range(20)), "n": n}
    index = type("Index", (), {"labels": rng.integers(0, 10, n), "domains": np.zeros(n, int),
                               "domain_names": ["clean"]})()
    names = ["paper", "paper-k6", "last-max16x5"]
    det = {m: detection.method_scores(terms, detection.METHODS[m]) for m in names}
    detection.save_scores("c", {m: det[m] for m in names[:2]}, truth, index)
    detection.save_scores("c", {"last-max16x5": det["last-max16x5"]}, truth, index)
    with np.load(tmp_path / "scores" / "c.npz") as f:
        assert sorted(f.files) == sorted(["aliases", "domain_names", "domains", "labels",
                                          "poisoned", "score/last-max16x5", "score/paper"])
    saved = detection.load_scores("c")
    assert sorted(saved["scores"]) == sorted(names)
    assert np.flatnonzero(saved["poisoned"]).tolist() == truth["poisoned_ids"]
    for m in names:
        np.testing.assert_array_equal(saved["scores"][m], det[m].astype(np.float32))
        method = detection.METHODS[m]
        want = detection.method_metrics(terms, method, truth, index.labels, 9)
        got = detection.score_metrics(saved["scores"][m], method, truth, index.labels, 9,
                                      n_instances=want["n_instances"])
        assert got == want
    # a method with the mad-split threshold counts the flags trace would write: here the
    # poisons sit far above a clean tail that MAD with k = 6 flags too, and the split applies
    split = replace(detection.METHODS["last-max16x5-k6"], threshold="mad-split")
    x = rng.standard_normal(n)
    x[:20] = rng.normal(40.0, 1.0, 20)
    x[20:35] = rng.uniform(5.0, 8.0, 15)
    mad = detection.score_metrics(x, detection.METHODS["last-max16x5-k6"], truth,
                                  index.labels, 9, n_instances=5)
    flagged, s = refine_by_split(x, flag(x, 6.0), OTSU_MIN_ETA)
    got = detection.score_metrics(x, split, truth, index.labels, 9, n_instances=5)
    assert s.applied and got["n_flagged"] == len(flagged) < mad["n_flagged"]
    assert got["tp"] == int(np.isin(flagged, truth["poisoned_ids"]).sum()) == 20


def test_coverage_lists_every_grid_configuration_with_its_status():
    took, failed = detection.GRIDS["seeds"][1], detection.GRIDS["rates"][0]
    rows = [dict(_row(took.name, "paper", 0.9), asr=0.7, asr_untriggered=0.05),
            dict(_row(failed.name, "paper", 0.9, took=False), asr=0.1, asr_untriggered=0.04)]
    table = [line for line in report.coverage_lines(rows) if line.startswith("| ")][1:]
    assert len(table) == sum(len(g) for g in detection.GRIDS.values())
    status = {line.split(" | ")[1]: line.split(" | ")[2] for line in table}
    assert status[took.name] == "attack took"
    assert status[failed.name] == "attack did not take"
    others = {c.name for g in detection.GRIDS.values() for c in g} - {took.name, failed.name}
    assert others and all(status[c] == "not run yet" for c in others)
    assert f"| seeds | {took.name} | attack took | 0.700 / 0.050 |" in table
    # a measured configuration outside every grid is listed too
    extra = dict(_row("pe2-custom", "paper", 0.9), asr=0.6, asr_untriggered=0.05)
    assert ("| (no grid) | pe2-custom | attack took | 0.600 / 0.050 |"
            in report.coverage_lines([*rows, extra]))


def test_min_method_takes_the_instances_minimum_of_the_draws_maximum():
    rng = np.random.default_rng(1)
    terms = rng.normal(size=(1, 16, 50, 5)).astype(np.float32)
    m = detection.METHODS["last-max16min5-k6"]
    want = terms[0].max(0).min(1)
    np.testing.assert_allclose(detection.method_scores(terms, m), want, rtol=1e-6)
    mean = detection.method_scores(terms, detection.METHODS["last-max16x5-k6"])
    np.testing.assert_allclose(mean, terms[0].max(0).mean(1), rtol=1e-5)


def test_matched_fpr_moves_the_baseline_threshold_to_the_candidates_fpr():
    rng = np.random.default_rng(7)
    n = 2000
    poisoned = np.zeros(n, bool)
    poisoned[rng.choice(n, 150, replace=False)] = True
    cand = rng.standard_t(3, n) + 4.0 * poisoned
    base = rng.standard_t(3, n) + 3.0 * poisoned
    got = report.matched_fpr(cand, base, poisoned, k=6.0)
    # the candidate's own MAD rule, written out
    med = np.median(cand)
    flagged = cand > med + 6.0 * np.median(np.abs(cand - med))
    assert got["fpr"] == pytest.approx(flagged[~poisoned].mean())
    assert got["fnr"] == pytest.approx(1 - flagged[poisoned].mean())
    # the baseline at the threshold its k gives: the same clean fraction above it
    bmed = np.median(base)
    thr = bmed + got["k_baseline"] * np.median(np.abs(base - bmed))
    assert abs((base[~poisoned] > thr).mean() - got["fpr"]) <= 1.5 / (~poisoned).sum()
    assert got["fnr_baseline"] == pytest.approx((base[poisoned] <= thr).mean())


def _preregistered_verdicts(cand, rows):
    lines = report.preregistered_lines(rows)
    verdict = {line.split(" | ")[1]: line.split(" | ")[-1].rstrip(" |")
               for line in lines if line.startswith(f"| `{cand}`")}
    tally = next(line for line in lines if line.startswith(f"`{cand}` out of sample"))
    return verdict, tally


def test_preregistered_table_tests_only_runs_out_of_sample_where_the_attack_took():
    cand = "last-max16min5-k6"
    picked = report.PREREGISTERED[cand].picked_on[0]
    default = report.REGISTERED_AGAINST  # what the entries were registered against
    rows = [_row(picked, cand, 0.96), _row(picked, default, 0.93),
            _row("held", cand, 0.95), _row("held", default, 0.94),
            _row("failed", cand, 0.90), _row("failed", default, 0.94),
            _row("tied", cand, 0.94), dict(_row("tied", default, 0.94), tp=1),
            _row("untaken", cand, 0.99, took=False), _row("untaken", default, 0.90, took=False),
            _row("no-default", cand, 0.99),
            # one instance (PE-I): the candidate's scores are the default's, no test
            _row("single", cand, 0.97, n_instances=1), _row("single", default, 0.97, n_instances=1)]
    verdict, tally = _preregistered_verdicts(cand, rows)
    # its prediction is a strictly higher DACC: a tie fails it
    assert verdict == {picked: "in sample", "held": "holds", "failed": "fails", "tied": "fails",
                       "untaken": "no test (attack did not take)",
                       "single": "no test (flags what the default flags: 1 instance(s))"}
    assert tally.endswith("the prediction held on 1 of 3 runs; its AUC beat the "
                          "default's on 1 of 3.")


def test_a_threshold_candidate_predicts_a_dacc_at_least_the_defaults_on_the_same_scores():
    cand = "last-max16x5-k9"
    assert detection.METHODS[cand].k == 9.0 and report.PREREGISTERED[cand].at_least
    picked = report.PREREGISTERED[cand].picked_on
    assert len(picked) == 8 and len(set(picked)) == 8
    default = report.REGISTERED_AGAINST

    def same_scores(config, method, dacc):  # the same ranking, another threshold
        return dict(_row(config, method, dacc), auc=0.98)

    rows = [same_scores("higher", cand, 0.96), same_scores("higher", default, 0.94),
            dict(same_scores("tied", cand, 0.94), tp=1), same_scores("tied", default, 0.94),
            same_scores("lower", cand, 0.92), same_scores("lower", default, 0.94)]
    verdict, tally = _preregistered_verdicts(cand, rows)
    assert verdict == {"higher": "holds", "tied": "holds", "lower": "fails"}
    assert tally.endswith("the prediction held on 2 of 3 runs; its scores are the default's "
                          "(only k differs).")


def test_strength_lines_rank_the_registered_default_over_simclr_configurations_that_took():
    default = report.REGISTERED_AGAINST
    rows = []
    for i, asr in enumerate([0.55, 0.7, 0.8, 0.95]):
        r = _row(f"c{i}", default, 0.90 + 0.02 * i)
        r.update(asr=asr, auc=0.99 - 0.01 * i, fnr_at_fpr_1pct=0.1 * i, fpr=0.05)
        rows.append(r)
    # neither a run that did not take, nor CLIP, nor another method counts
    rows += [dict(_row("weak", default, 0.5, took=False), asr=0.1, fnr_at_fpr_1pct=0.0),
             dict(_row("clip", default, 0.1, attack="ct"), asr=0.99, fnr_at_fpr_1pct=1.0),
             dict(_row("c0", "paper", 0.1), asr=0.55, fnr_at_fpr_1pct=1.0)]
    (line,) = report.strength_lines(rows)
    assert "Over the 4 SimCLR configurations" in line
    assert "AUC -1.00, DACC 1.00, FNR at 1% FPR 1.00, but FPR n/a" in line
    assert "The weakest (c0, ASR 0.550)" in line and "the strongest (c3, ASR 0.950)" in line
    assert report.strength_lines(rows[:2]) == []  # too few points for a rank correlation


def test_paper_checkpoints_are_five_evenly_spaced_whatever_the_run_length():
    from dataclasses import replace
    from types import SimpleNamespace

    def run(every, last):
        return SimpleNamespace(checkpoints=[SimpleNamespace(epoch=e)
                                            for e in range(every, last + 1, every)])

    base = detection.GridConfig()
    assert detection._checkpoint_epochs(run(5, 75), "all", "", base) == [15, 30, 45, 60, 75]
    longer = replace(base, epochs=150)
    assert detection._checkpoint_epochs(run(5, 150), "all", "", longer) == [30, 60, 90, 120, 150]
    assert detection._checkpoint_epochs(run(5, 150), "last", "", longer) == "last"


def _shorter_source(trace_setup, cache, cfg, **pretrain_settings):
    """A finished 2-epoch harness run of ``cfg`` in ``cache`` (tiny model, the trace fixture's
    images), to be continued to ``cfg.epochs``; returns its work directory."""
    import shutil
    from dataclasses import replace

    from ffengine.data.index import SampleIndex
    from ffengine.pretrain.simclr import pretrain

    src = cache / replace(cfg, epochs=2).name
    shutil.copytree(trace_setup["root"] / "index", src / "data" / "index")
    (src / "data" / "truth.json").write_text("{}")
    pretrain(SampleIndex(src / "data" / "index"), src / "run",
             replace(_tiny(), **pretrain_settings), progress=False)
    return src


def _tiny():
    from ffengine.pretrain.simclr import PretrainConfig

    return PretrainConfig(model="tiny", epochs=2, batch_size=32, ckpt_every=1, seed=5)


def test_a_longer_run_continues_a_shorter_one_and_equals_a_fresh_start(trace_setup, tmp_path):
    """The "longer" grid continues finished shorter runs: with a constant learning rate the
    continued run must be the one a fresh start trains, and the source stays untouched."""
    import json
    import os
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from ffengine.data.index import SampleIndex
    from ffengine.pretrain.simclr import pretrain

    cfg = replace(detection.GridConfig(), epochs=3)
    cache = tmp_path / "cache"
    src = _shorter_source(trace_setup, cache, cfg)
    tiny = _tiny()
    src_manifest = (src / "run" / "manifest.json").read_text()

    assert detection.extend_shorter_run(replace(cfg, epochs=2), cache) is None  # exists
    assert detection.extend_shorter_run(cfg, cache) == src
    work = cache / cfg.name
    continued = pretrain(SampleIndex(work / "data" / "index"), work / "run",
                         replace(tiny, epochs=3), progress=False)
    assert [c.epoch for c in continued.checkpoints] == [1, 2, 3]
    assert continued.manifest["extended_from"] == str(src.resolve() / "run")
    # the shorter run's checkpoints are shared, not copied, and its manifest is unchanged
    assert os.path.samefile(src / "run" / "ckpt-0002.safetensors",
                            work / "run" / "ckpt-0002.safetensors")
    assert (src / "run" / "manifest.json").read_text() == src_manifest
    assert json.loads(src_manifest)["training"]["epochs"] == 2
    assert detection.extend_shorter_run(cfg, cache) is None  # started: never seeded twice

    fresh = pretrain(SampleIndex(work / "data" / "index"), tmp_path / "fresh",
                     replace(tiny, epochs=3), progress=False)
    a = load_file(str(continued.checkpoints[-1].weights))
    b = load_file(str(fresh.checkpoints[-1].weights))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_decaying_schedule_is_never_continued(trace_setup, tmp_path):
    from dataclasses import replace

    cfg = replace(detection.GridConfig(), epochs=3)
    _shorter_source(trace_setup, tmp_path, cfg, schedule="cosine")
    assert detection.extend_shorter_run(cfg, tmp_path) is None
    assert not (tmp_path / cfg.name).exists()


def test_longer_lines_pair_each_longer_run_with_its_shorter_one_and_judge_the_predictions():
    def row(config, method, asr, auc, fnr1, fpr, fpr_target):
        return {"config": config, "method": method, "asr": asr, "auc": auc,
                "fnr_at_fpr_1pct": fnr1, "dacc": 0.9, "fpr": fpr, "fnr": 0.1,
                "fpr_target": fpr_target}

    d = report.REGISTERED_AGAINST  # tests 2 and 3 name it, whatever the default is now
    rows = [row("x-e75", d, 0.6, 0.98, 0.3, 0.06, 0.4),
            row("x-e150", d, 0.8, 0.99, 0.2, 0.05, 0.3),
            row("x-e30", d, 0.1, 0.5, 0.9, 0.2, 0.5),  # each run pairs with the next shorter
            row("y-e75", d, 0.7, 0.98, 0.3, 0.06, 0.4),
            row("y-e150", d, 0.6, 0.99, 0.4, 0.005, 0.4),
            row("z-e75", d, 0.7, 0.98, 0.3, 0.06, 0.4)]  # no longer run: no line
    lines = report.longer_lines(rows)
    body = [ln for ln in lines if ln.startswith("| x |") or ln.startswith("| y |")]
    assert len(body) == 3 and not any(ln.startswith("| z") for ln in lines)
    x30, x, y = body
    assert "30 → 75" in x30 and "0.100 → 0.600" in x30
    assert "75 → 150" in x and "0.600 → 0.800" in x and x.endswith("| holds | holds | holds |")
    # y: weaker backdoor, FNR at 1% FPR up, FPR under the paper's bound: all three fail
    assert y.endswith("| fails | fails | fails |")
    assert report.longer_lines([r for r in rows if r["config"].endswith("-e75")]) == []
    # the product's present default is not what the tests were registered against
    assert detection.DEFAULT_METHOD != d
    assert report.longer_lines([dict(r, method=detection.DEFAULT_METHOD) for r in rows]) == []


def test_a_continued_run_counts_the_training_seconds_of_an_older_source(trace_setup, tmp_path):
    """Runs made before checkpoints recorded their training seconds have them only in the
    harness's times.json: the continued run starts its count from there."""
    import json
    from dataclasses import replace

    cfg = replace(detection.GridConfig(), epochs=3)
    src = _shorter_source(trace_setup, tmp_path, cfg)
    manifest = json.loads((src / "run" / "manifest.json").read_text())
    for c in manifest["checkpoints"]:
        del c["train_s"]
    (src / "run" / "manifest.json").write_text(json.dumps(manifest))
    (src / "times.json").write_text(json.dumps({"pretrain_s": 1234.5}))
    assert detection.extend_shorter_run(cfg, tmp_path) == src
    seeded = json.loads((tmp_path / cfg.name / "run" / "manifest.json").read_text())
    assert seeded["checkpoints"][-1]["train_s"] == 1234.5
    assert "train_s" not in seeded["checkpoints"][0]


def test_the_demo_configuration_is_seeded_with_the_bundled_run_and_no_other(tmp_path):
    """The demo's configuration starts from the run the package bundles (what the grid's rows
    for it were measured on), once, with its manifest pointing at the harness's index; any
    other configuration, or one already started, is left alone."""
    from dataclasses import replace

    demo = detection.GRIDS["demo"][0]
    assert detection.seed_from_bundled_run(replace(demo, seed=1), tmp_path) is None
    assert not (tmp_path / replace(demo, seed=1).name).exists()
    src = detection.seed_from_bundled_run(demo, tmp_path)
    assert src is not None
    run = detection.Run(tmp_path / demo.name / "run")
    assert [c.epoch for c in run.checkpoints] == [15, 30, 45, 60, 75]
    assert detection._finished(tmp_path / demo.name / "run", demo.epochs)
    assert run.manifest["index"]["path"] == str(tmp_path / demo.name / "data" / "index")
    assert run.manifest["seeded_from"] == str(src)
    for c in run.checkpoints:  # the weights themselves, byte for byte
        assert (tmp_path / demo.name / "run" / c.weights).read_bytes() == (
            src / c.weights).read_bytes()
    assert detection.seed_from_bundled_run(demo, tmp_path) is None  # never seeded twice


def test_split_rule_table_judges_both_predictions_out_of_sample_where_the_gate_split(
        tmp_path, monkeypatch):
    """Entry 4's table, from committed-format score files: a clear split that keeps the
    poisons holds, one that drops a poison cluster fails, a run the gate does not split (or
    where the attack did not take, or that was looked at) is no test."""
    rule = report.SPLIT_RULE
    monkeypatch.setattr(detection, "SCORES_DIR", tmp_path)
    monkeypatch.setattr(report, "SCORES_DIR", tmp_path)
    rng = np.random.default_rng(3)
    u = 0.6745  # one MAD of a standard normal

    def save(config, clean_tail, poisons):
        clean = np.concatenate([rng.standard_normal(5000), clean_tail])
        x = np.concatenate([clean, poisons]).astype(np.float32)
        poisoned = np.arange(len(x)) >= len(clean)
        np.savez(tmp_path / f"{config}.npz", poisoned=poisoned, labels=np.zeros(len(x), int),
                 domains=np.zeros(len(x), int), domain_names=np.array(["clean"]),
                 aliases=np.array([], str), **{f"score/{rule['method']}": x})

    tail = rng.uniform(6.5, 9.0, 100) * u
    save("clear", tail, rng.normal(30.0, 1.0, 300) * u)
    # a poison cluster inside the clean tail and a smaller one far above: the split drops
    # the first, and DACC falls below k = 6's
    save("drops-poisons", tail[:20], np.concatenate([rng.uniform(6.5, 9.0, 200),
                                                     rng.normal(30.0, 1.0, 100)]) * u)
    save("thin-tail", (6.5 + rng.exponential(1.0, 200)) * u, rng.normal(8.0, 1.0, 50) * u)
    save("untaken", tail, rng.normal(30.0, 1.0, 300) * u)
    save(rule["picked_on"][0], tail, rng.normal(30.0, 1.0, 300) * u)
    rows = [{"config": c, "took": c != "untaken"} for c in
            ("clear", "drops-poisons", "thin-tail", "untaken", rule["picked_on"][0])]
    lines = report.split_rule_lines(rows)
    verdict = {ln.split(" | ")[0].lstrip("| "): ln.rstrip(" |").rsplit(" | ", 1)[1]
               for ln in lines if ln.startswith("| ") and not ln.startswith("| config")}
    assert verdict == {"clear": "holds", "drops-poisons": "fails",
                       "thin-tail": "no test (no clear split: flags what k = 6 flags)",
                       "untaken": "no test (attack did not take)",
                       rule["picked_on"][0]: "in sample"}
    assert lines[-1].endswith("the predictions held on 1 of 2 runs.")


def test_clip_threshold_lines_measure_the_best_threshold_against_flagging_nothing():
    def row(config, dacc_best, n_poisoned=500, n=10500, **kw):
        return {"config": config, "method": detection.DEFAULT_CLIP_METHOD, "took": True,
                "attack": "ct", "dacc_best": dacc_best, "n_poisoned": n_poisoned, "n": n, **kw}

    nothing = 1 - 500 / 10500
    rows = [row("a", nothing), row("b", nothing + 0.004), row("c", 0.99, took=False),
            row("d", None), row("e", 0.99, attack="pe2"),
            dict(row("f", 0.99), method="paper")]
    text = report.clip_threshold_lines(rows)[1]
    assert text.startswith("On the 2 CLIP runs that took")
    assert "by at most 0.0040, and on 1 of them not at all" in text
    assert report.clip_threshold_lines([row("c", 0.99, took=False)]) == []


def test_new_traces_run_with_the_backend_and_backbone_mode_asked_for(tmp_path, monkeypatch):
    """``--backend torch --compile off`` reaches the Engine of every new trace (what
    reproduces the rows traced before the defaults changed); unset, the Engine's auto."""
    cfg = detection.GRIDS["longer"][0]
    (tmp_path / cfg.name / "instances").mkdir(parents=True)
    monkeypatch.setattr(detection, "load_results", lambda: {"rows": []})
    monkeypatch.setattr(detection, "extend_shorter_run", lambda c, cache: None)
    monkeypatch.setattr(detection, "seed_from_bundled_run", lambda c, cache: None)
    monkeypatch.setattr(detection, "_prepare_simclr", lambda c, work, progress: (
        None, None, {"asr": 0.9, "asr_untriggered": 0.05}, None, None))
    monkeypatch.setattr(detection, "_checkpoint_epochs", lambda *a: [5])

    class Stop(Exception):
        pass

    seen = []

    def engine(run, **kwargs):
        seen.append(kwargs)
        raise Stop  # the options are all this test needs

    monkeypatch.setattr(detection, "Engine", engine)
    for argv, want in ((["--backend", "torch", "--compile", "off"], ("torch", "off")),
                       ([], ("auto", "auto"))):
        with pytest.raises(Stop):
            detection.main(["--config", cfg.name, "--methods", "paper", "--cache",
                            str(tmp_path), "--quiet", *argv])
        assert (seen[-1]["backend"], seen[-1]["compile_backbone"]) == want
    with pytest.raises(SystemExit):  # argparse: an unknown backend is refused up front
        detection.main(["--config", cfg.name, "--backend", "gpu"])


def test_switch_lines_judge_entry_5_by_epochs_out_of_sample_only():
    new, former = report.SWITCH["method"], report.SWITCH["former"]
    picked = report.SWITCH["picked_on"]
    assert len(picked) == 18 and len(set(picked)) == 18 and new != former

    def row(config, method, dacc, fnr, fpr=0.04, fpr_target=0.3, **kw):
        return {**_row(config, method, dacc, **kw), "fnr": fnr, "fpr": fpr,
                "fpr_target": fpr_target}

    rows = [row(picked[0], new, 0.91, 0.3), row(picked[1], new, 0.95, 0.1),  # worst: 0.91
            row(picked[0], former, 0.93, 0.1),
            # 75 epochs: all four hold
            row("x-e75", new, 0.92, 0.25), row("x-e75", former, 0.96, 0.18),
            # 75 epochs: under the worst, FNR lower, DACC higher, FPR at the paper's bound
            row("y-e75", new, 0.90, 0.1, fpr=0.005), row("y-e75", former, 0.89, 0.2),
            # 150 epochs: higher DACC holds, the worst case holds
            row("z-e150", new, 0.96, 0.03), row("z-e150", former, 0.94, 0.0),
            # neither a run that did not take, nor CLIP, nor one without the former default
            row("u-e75", new, 0.5, 0.9, took=False), row("u-e75", former, 0.9, 0.1, took=False),
            row("c-e30", new, 0.5, 0.9, attack="ct"), row("c-e30", former, 0.9, 0.1,
                                                             attack="ct"),
            row("lone-e75", new, 0.99, 0.0),
            # another length: only the worst case was registered for it
            row("w-e100", new, 0.92, 0.3), row("w-e100", former, 0.99, 0.0)]
    lines = report.switch_lines(rows)
    assert "(worst DACC there 0.9100)" in lines[0]
    body = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ") and "-e" in ln}
    assert set(body) == {"x-e75", "y-e75", "z-e150", "w-e100"}
    assert body["w-e100"].endswith("| DACC ≥ in-sample worst: holds |")
    assert body["x-e75"].count("holds") == 4
    assert body["y-e75"].count("fails") == 4
    assert body["z-e150"].endswith("DACC above the former's: holds; "
                                   "DACC ≥ in-sample worst: holds |")
    assert lines[-1] == f"`{new}` out of sample: 7 of 11 predictions held."
    assert report.switch_lines([r for r in rows if r["config"] not in picked]) == []
