"""Studies: grid, resume after interruption, failures, tables and statistics (checked against scipy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from reconad import cli, engine
from reconad import study as st
from reconad.config import config_to_dict

from .conftest import write_tiny_mvtec


# -- statistics against scipy -------------------------------------------------------------------------------
def test_bootstrap_ci_equals_scipy_percentile_bootstrap():
    d = np.array([0.012, -0.004, 0.021, 0.008, 0.015, -0.001, 0.009, 0.030, 0.002])
    ref = scipy.stats.bootstrap((d,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                                rng=np.random.default_rng(7))
    low, high = st.bootstrap_ci(d, 10_000, 0.95, seed=7)
    assert (low, high) == (ref.confidence_interval.low, ref.confidence_interval.high)
    assert low < d.mean() < high
    assert st.bootstrap_ci(d, 10_000, 0.95, seed=7) == (low, high)  # seeded: reproducible tables
    assert st.bootstrap_ci([0.01, 0.01, 0.01]) == (0.01, 0.01)  # degenerate: no spread, no resampling


def test_wilcoxon_equals_scipy_and_notes_small_or_zero_samples():
    d = np.array([0.012, -0.004, 0.021, 0.008, 0.015, -0.001, 0.009, 0.030, 0.002])
    p, note = st.wilcoxon_p(d)
    assert p == scipy.stats.wilcoxon(d).pvalue and note == ""
    p, note = st.wilcoxon_p([0.01, 0.02, 0.03, 0.0])  # one zero dropped, n=3: min p = 0.25
    assert p == scipy.stats.wilcoxon([0.01, 0.02, 0.03]).pvalue == 0.25
    assert "1 zero difference(s) dropped" in note and "unattainable" in note
    p, note = st.wilcoxon_p([0.0, 0.0, 0.0])
    assert math.isnan(p) and "all differences are zero" in note


def _rows(values: dict[tuple[str, str, int], float], metric: str = "image_auroc") -> list[dict]:
    return [{"run": r, "preset": r, "category": c, "seed": s, "status": "done", "error": "", "run_dir": "",
             metric: v} for (r, c, s), v in values.items()]


def test_summary_is_mean_and_sample_std_over_seeds_with_group_means():
    from reconad.metrics import MVTEC_AD_GROUPS

    cats = MVTEC_AD_GROUPS["textures"] + MVTEC_AD_GROUPS["objects"]
    rng = np.random.default_rng(0)
    values = {("a", c, s): float(rng.uniform(0.8, 1.0)) for c in cats for s in (1, 11, 111)}
    summary = {(r["run"], r["category"]): r for r in st.summarize(_rows(values), cats)}
    carpet = [values[("a", "carpet", s)] for s in (1, 11, 111)]
    assert summary[("a", "carpet")]["image_auroc_mean"] == pytest.approx(np.mean(carpet))
    assert summary[("a", "carpet")]["image_auroc_std"] == pytest.approx(np.std(carpet, ddof=1))
    for scope, members in (("mean", cats), ("mean (textures)", MVTEC_AD_GROUPS["textures"])):
        per_seed = [np.mean([values[("a", c, s)] for c in members]) for s in (1, 11, 111)]
        assert summary[("a", scope)]["image_auroc_mean"] == pytest.approx(np.mean(per_seed))
        assert summary[("a", scope)]["image_auroc_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert ("a", "mean (objects)") in summary


def test_paired_comparison_uses_matched_cells_only():
    values = {("a", c, s): 0.80 + 0.01 * i for i, (c, s) in enumerate((c, s) for c in "xyz" for s in (1, 2, 3))}
    values.update({("b", c, s): v + 0.02 + 0.001 * (i % 5) for i, ((_, c, s), v) in enumerate(values.items())})
    rows = _rows(values)
    rows.append({"run": "b", "category": "w", "seed": 1, "status": "done", "image_auroc": 0.0})  # unmatched
    next(r for r in rows if (r["run"], r["category"], r["seed"]) == ("a", "x", 1))["status"] = "failed"
    res = st.paired_comparison(rows, "a", "b", "image_auroc", n_resamples=2000, seed=3)
    keys = [(c, s) for c in "xyz" for s in (1, 2, 3) if (c, s) != ("x", 1)]
    d = np.array([values[("b", *k)] - values[("a", *k)] for k in keys])
    assert res.n == 8 and res.diff == pytest.approx(d.mean())
    assert res.p_value == scipy.stats.wilcoxon(d).pvalue
    assert (res.ci_low, res.ci_high) == st.bootstrap_ci(d, 2000, 0.95, 3)
    assert res.verdict == "b better" and res.ci_low > 0
    assert st.comparison_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert st.comparison_pairs(["a", "b", "c"], baseline="b") == [("b", "a"), ("b", "c")]


# -- the study file and the command line ---------------------------------------------------------------------
def test_study_options_and_errors(tmp_path):
    root = write_tiny_mvtec(write_tiny_mvtec(tmp_path / "data", "one"), "two")
    study = st.study_from_options(None, ["rd4ad", "demo"], ["x", "y"], str(root), ["all"], ["2"],
                                  ["train.iterations=200", "model.loss=regional"], "x")
    assert study.labels() == ["x", "y"] and study.seed_list() == [1, 11] and study.category_list() == ["one", "two"]
    assert study.overrides == {"train": {"iterations": 200}, "model": {"loss": "regional"}}
    assert st.parse_seeds(["1,11,111"]) == [1, 11, 111] and st.parse_seeds(["5", "7"]) == [5, 7]
    cells = st.make_cells(study, tmp_path / "s")
    assert len(cells) == 2 * 2 * 2 and cells[0].run_dir == tmp_path / "s" / "x" / "one" / "seed1"
    assert cells[0].config.train.checkpoint_every == 20  # a killed cell can resume
    with pytest.raises(st.StudyError, match="unique"):
        st.study_from_dict({"runs": ["rd4ad", "rd4ad"]})
    with pytest.raises(st.StudyError, match="unknown study key"):
        st.study_from_dict({"runs": ["rd4ad"], "categorie": "all"})
    with pytest.raises(st.StudyError, match="no config file or preset"):
        st.make_cells(st.study_from_dict({"runs": ["nope"], "root": str(root)}), tmp_path / "s")
    assert cli.main(["study", "--presets", "nope", "--data.root", str(root), "--output", str(tmp_path / "s")]) == 2


def _fake_fit(calls: list):
    """Writes what a finished run leaves (config.yaml, metrics.json) without training."""

    def fit(cfg, run_dir, resume=False, stop_after=None):
        calls.append((Path(run_dir), resume))
        from reconad.fileio import write_json, write_yaml

        write_yaml(Path(run_dir) / engine.CONFIG_FILE, config_to_dict(cfg))
        write_json(Path(run_dir) / engine.METRICS_FILE, {"metrics": {"image_auroc": 0.5 + cfg.train.seed / 1000}})

    return fit


def test_shards_split_cells_and_stale_cells_are_refused_with_the_difference(tmp_path):
    root = write_tiny_mvtec(write_tiny_mvtec(tmp_path / "data", "one"), "two")
    study = st.study_from_dict({"runs": ["rd4ad", {"preset": "rd4ad", "name": "r2"}], "root": str(root),
                                "seeds": [1, 2]})
    calls: list = []
    st.run_study(study, tmp_path / "s", shard="0/2", fit=_fake_fit(calls))
    first = {c for c, _ in calls}
    st.run_study(study, tmp_path / "s", shard="1/2", fit=_fake_fit(calls))
    assert len(first) == 4 and len(calls) == 8 and len({c for c, _ in calls}) == 8
    rows = st.collect(tmp_path / "s")
    assert [r["status"] for r in rows] == ["done"] * 8

    # the Ray launcher runs against a real local cluster in tests/test_study_workers.py
    changed = st.study_from_dict({**study.to_dict(), "overrides": {"train": {"iterations": 3}},
                                  "runs": [{"preset": "rd4ad"}]})
    with pytest.raises(st.StudyError, match=r"another configuration .*train.iterations: None → 3"):
        st.run_study(changed, tmp_path / "s", fit=_fake_fit(calls))


# -- end to end ---------------------------------------------------------------------------------------------
def test_study_end_to_end_resume_failure_tables_and_report(tmp_path, monkeypatch):
    root = write_tiny_mvtec(write_tiny_mvtec(tmp_path / "data", "stripes", seed=0), "waves", seed=1)
    study = st.study_from_dict({
        "runs": [{"preset": "rd4ad", "name": "global", "overrides": {"model": {"loss": "global"}}},
                 {"preset": "rd4ad", "name": "regional", "overrides": {"model": {"loss": "regional"}}}],
        "root": str(root), "categories": "all", "seeds": [1, 11], "n_resamples": 1000,
        "overrides": {"data": {"image_size": 32, "batch_size": 4, "eval_batch_size": 4},
                      "backbone": {"name": "resnet18", "weights": None},
                      "train": {"iterations": 2, "accelerator": "cpu", "log_every": 1, "checkpoint_every": 1},
                      "eval": {"overlays": 4, "plots": False, "examples": 0}}})
    out = tmp_path / "study"
    calls: list = []

    def interrupted(cfg, run_dir, resume=False, stop_after=None):  # killed in the 3rd cell after a checkpoint
        calls.append((Path(run_dir), resume))
        if len(calls) == 3:
            engine.fit(cfg, run_dir, resume=resume, stop_after=1)
            raise KeyboardInterrupt
        return engine.fit(cfg, run_dir, resume=resume)

    with pytest.raises(KeyboardInterrupt):
        st.run_study(study, out, fit=interrupted)
    cells = st.make_cells(st.resolved(study), out)
    assert [st.cell_status(c.run_dir) for c in cells[:4]] == ["done", "done", "partial", "pending"]
    mtimes = {c.run_dir: (c.run_dir / "metrics.json").stat().st_mtime_ns for c in cells[:2]}

    def failing(cfg, run_dir, resume=False, stop_after=None):  # one cell fails, the others go on
        calls.append((Path(run_dir), resume))
        if Path(run_dir) == cells[5].run_dir:
            raise RuntimeError("simulated failure")
        return engine.fit(cfg, run_dir, resume=resume)

    calls.clear()
    rows = st.run_study(study, out, fit=failing)
    assert calls == [(cells[2].run_dir, True)] + [(c.run_dir, False) for c in cells[3:]]
    assert {c.run_dir: (c.run_dir / "metrics.json").stat().st_mtime_ns for c in cells[:2]} == mtimes
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "simulated failure" in failed[0]["error"]
    assert json.loads((cells[5].run_dir / "failed.json").read_text())["status"] == "failed"
    resumed_log = [json.loads(x) for x in (cells[2].run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["batch"] for e in resumed_log if e["kind"] == "train"] == [1, 2]  # no duplicated entries

    calls.clear()
    rows = st.run_study(study, out)  # the failed cell is retried, nothing else runs
    assert all(r["status"] == "done" for r in rows) and not (cells[5].run_dir / "failed.json").exists()
    for name in ("results.csv", "results.json", "summary.csv", "paired.csv", "study.yaml"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 8 and all(0 <= r["image_auroc"] <= 1 and r["aupro"] >= 0 for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["run"], r["category"]) for r in summary} == {(r, c) for r in ("global", "regional")
                                                             for c in ("stripes", "waves", "mean")}
    paired = json.loads((out / "paired.json").read_text())
    assert [(p["a"], p["b"], p["n"]) for p in paired][0] == ("global", "regional", 4)

    def no_training(*args, **kwargs):
        raise AssertionError("report must not train")

    monkeypatch.setattr(engine, "fit", no_training)
    assert cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "https://" not in page and "http://" not in page and "src='report_files" not in page
    assert page.count("<table") >= 1 + 4 + 2 + 1 and page.count("data:image/png;base64,") >= 6 + 2 + 2 * 2 * 2
    md = (out / "report.md").read_text()
    assert "## Paired comparisons" in md and "| global | regional | image_auroc | 4 |" in md
