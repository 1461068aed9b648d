"""Ablations across suite runs (tttkd/ablation.py): the one varied setting, its values in order,
each row's mean ± std per value, refusals of runs that are not an ablation."""

import json

import pytest
from typer.testing import CliRunner

from tttkd.ablation import ablation_table, write_ablation
from tttkd.cli.main import app


def results(path, *, max_views=None, teacher="efficientnet_lite0", ttt=20.0, lr=1.0, by_step=None):
    """A suite results.json as write_summary writes it (only what the ablation reads)."""
    protocol = {"scenes": 32, "views": 8, "max_views": max_views, "teacher": teacher, "adapt": {"lr": lr},
                "setting": "indoor"}
    entry = lambda mean, curve=None: {"mean": mean, "std": 1.5, "n": 3, "seeds": [0, 1, 2], "by_step": curve or {}}
    table = {"Joint-Train": {"sensor": entry(10.0), "all": entry(12.0)}, "TTT-KD": {"sensor": entry(ttt, by_step)}}
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"protocol": protocol, "table": table}))
    return path


def test_views_ablation_orders_the_values_and_keeps_each_runs_numbers(tmp_path):
    runs = [results(tmp_path / "all", ttt=25.0), results(tmp_path / "v10", max_views=10, ttt=22.0),
            results(tmp_path / "v2", max_views=2, ttt=15.0)]
    table = write_ablation(runs, tmp_path / "out")
    assert table["setting"] == "max_views" and table["values"] == [2, 10, None]
    assert [e["mean"] for e in table["cells"]["TTT-KD"]["sensor"]] == [15.0, 22.0, 25.0]
    assert table["cells"]["TTT-KD"]["all"] == [None, None, None] and table["families"] == ["sensor", "all"]
    text = (tmp_path / "out" / "ablation.md").read_text()
    assert "| row | 2 | 10 | all (8) |" in text and "| TTT-KD | 15.0 ± 1.5 (n=3) | 22.0 ± 1.5 (n=3) | 25.0 ± 1.5 (n=3) |" in text
    assert table["plots"] == ["ablation_sensor.png", "ablation_all.png"]
    assert (tmp_path / "out" / "ablation_sensor.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["runs"][0].endswith("v2")


def test_steps_add_each_row_after_that_many_steps_from_its_curve(tmp_path):
    curve = lambda at10: {"0": [10.0, 0.0], "10": [at10, 2.0], "100": [at10 - 5, 3.0]}  # string keys, as read back
    runs = [results(tmp_path / "all", ttt=25.0, by_step=curve(30.0)),
            results(tmp_path / "v2", max_views=2, ttt=15.0, by_step=curve(18.0)),
            results(tmp_path / "v4", max_views=4, ttt=17.0)]  # a run scored at the last step only
    table = write_ablation(runs, tmp_path / "out", steps=(10, 7))
    after = table["cells"]["TTT-KD after 10 steps"]["sensor"]
    assert [e and (e["mean"], e["std"], e["n"]) for e in after] == [(18.0, 2.0, 3), None, (30.0, 2.0, 3)]
    # no row has a curve scored at step 7, and Joint-Train has none at all: no rows for them
    assert set(table["cells"]) == {"Joint-Train", "TTT-KD", "TTT-KD after 10 steps"}
    assert "| TTT-KD after 10 steps | 18.0 ± 2.0 (n=3) | - | 30.0 ± 2.0 (n=3) |" in (tmp_path / "out" / "ablation.md").read_text()
    result = CliRunner().invoke(app, ["bench", "ablation", "--runs", ",".join(str(r) for r in runs), "--steps", "ten",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--steps 'ten': expected whole numbers" in result.output


def test_runs_that_differ_in_more_or_other_than_one_setting_are_refused(tmp_path):
    a = json.loads(results(tmp_path / "a").joinpath("results.json").read_text())
    other_lr = json.loads(results(tmp_path / "b", max_views=4, lr=0.1).joinpath("results.json").read_text())
    with pytest.raises(ValueError, match="differ in adapt, max_views; an ablation varies exactly one"):
        ablation_table([a, other_lr], ["a", "b"], rows=("TTT-KD",))
    with pytest.raises(ValueError, match="differ in nothing"):
        ablation_table([a, a], ["a", "a"], rows=("TTT-KD",))
    teachers = ablation_table([a, json.loads(results(tmp_path / "c", teacher="efficientnet_lite2")
                                             .joinpath("results.json").read_text())], ["a", "c"], rows=("TTT-KD",))
    assert teachers["setting"] == "teacher" and teachers["values"] == ["efficientnet_lite0", "efficientnet_lite2"]


def test_cli_names_a_missing_run(tmp_path):
    results(tmp_path / "a")
    result = CliRunner().invoke(app, ["bench", "ablation", "--runs", f"{tmp_path / 'a'},{tmp_path / 'nope'}",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "nope/results.json: no results.json here" in result.output
