"""benchmarks/study.py: epoch timing from logs, the third-seed rule, and a report table that
is computed from results.json (synthetic runs here; no training)."""
import argparse
import json
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import study  # noqa: E402


def test_epoch_seconds_last_line_per_epoch_wins(tmp_path):
    log = tmp_path / "pretrain.log"
    log.write_text("[10:00:00] Epoch: [0] total time: 0:00:52\n"      # stopped run's partial epoch 0
                   "[10:05:00] Epoch: [0] total time: 0:03:40\n"      # relaunch repeats epoch 0
                   "[10:09:00] Epoch: [1] [ 50/390] eta: 0:03:11  loss: 5.0\n"
                   "[10:12:00] Epoch: [1] total time: 1:00:05\n")
    assert study.epoch_seconds(str(log)) == {0: 220, 1: 3605}
    assert study.median_epoch_s(str(log)) == (220 + 3605) / 2
    assert study.epoch_seconds(str(tmp_path / "missing.log")) == {}
    assert study.median_epoch_s(str(tmp_path / "missing.log")) is None


def _row(setting, seed, linear_cls, **extra):
    row = {"name": f"{setting}_s{seed}", "setting": setting, "seed": seed, "commit": "abc1234567",
           "flags": study.SETTINGS[setting][1] or "(untrained)", "linear_cls": linear_cls}
    row.update({key: extra.get(key, 1.0) for key, _, _ in study.METRICS if key != "linear_cls"})
    return row


def test_third_seed_goes_to_the_best_regulariser_once_every_setting_has_seeds_0_and_1():
    results = {}
    for seed in (0, 1):
        for s in study.SETTINGS:
            results[f"{s}_s{seed}"] = _row(s, seed, 20.0)
    results["mmae_mu3_l0.01_s0"]["linear_cls"] = 30.0
    assert study.best_regulariser(results) == "mmae_mu3_l0.01"
    assert study.planned_runs(results)[-1] == ("mmae_mu3_l0.01", 2)
    del results["umae_l0.1_s1"]  # one setting still lacks seed 1: no choice yet
    assert study.best_regulariser(results) is None
    assert ("mmae_mu3_l0.01", 2) not in study.planned_runs(results)


def test_report_table_is_computed_from_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("init", 0, 17.0, epoch_s=None), _row("init", 1, 18.0, epoch_s=None),
            _row("mae", 0, 22.0, epoch_s=200.0), _row("mae", 1, 23.0, epoch_s=220.0),
            _row("umae_l0.01", 0, 19.0), _row("umae_l0.01", 1, 19.5)]
    for r in rows:
        r["singular_values_cls"] = [3.0, 2.0, 1.0]
    out = tmp_path / "study"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(rows))
    md = tmp_path / "RESULTS.md"
    md.write_text("before\n<!-- study-table:start -->\nold table\n<!-- study-table:end -->\nafter\n")
    study.report(argparse.Namespace(out_dir=str(out), results_md=str(md)))

    doc = md.read_text()
    assert doc.startswith("before\n") and doc.endswith("after\n") and "old table" not in doc
    mae = next(line for line in doc.splitlines() if line.startswith("| mae |"))
    cells = [c.strip() for c in mae.strip("|").split("|")]
    assert cells[2] == "2"                                           # seeds
    assert cells[3] == f"22.50 ± {statistics.stdev([22.0, 23.0]):.2f}"  # linear cls
    assert cells[-1] == "210 ± 14"                                   # s/epoch
    init = next(line for line in doc.splitlines() if line.startswith("| init |"))
    assert init.rstrip(" |").endswith("-")                           # untrained: no epoch time
    assert "- umae_l0.01: linear cls -3.25" in doc                   # ranges 19-19.5 vs 22-23
    assert "- init: linear cls -5.00" in doc
    assert (out / "study.png").stat().st_size > 0
