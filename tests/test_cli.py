"""The command-line apps, through typer's CliRunner: exit codes and what the user reads."""

import json

from typer.testing import CliRunner

from tttkd.cli.main import app as tttkd_app
from tttkd.cli.prep import app as prep_app

runner = CliRunner()


def test_synth_extract_info(tmp_path):
    root, store = tmp_path / "data", tmp_path / "cache.zarr"
    result = runner.invoke(prep_app, ["synth", "--out", str(root), "--scenes", "2", "--views", "2", "--domain", "b"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(prep_app, ["extract", "--root", str(root), "--model", "efficientnet_lite0", "--out", str(store),
                                      "--split", "train", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 scenes extracted" in result.output and "bytes_per_point" in result.output
    result = runner.invoke(prep_app, ["info", str(store), "--json"])
    summary = json.loads(result.output)
    assert summary["scenes"] == 2 and summary["teacher"] == "efficientnet_lite0" and summary["bytes_per_point"] > 0


def test_missing_store_is_one_line_and_exit_code_1(tmp_path):
    result = runner.invoke(prep_app, ["info", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "nope.zarr: no feature cache" in result.output


def test_missing_dinov2_weights_say_where_to_put_them(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    runner.invoke(prep_app, ["synth", "--out", str(tmp_path / "d"), "--scenes", "1", "--views", "1"])
    result = runner.invoke(prep_app, ["extract", "--root", str(tmp_path / "d"), "--model", "dinov2_vitl14",
                                      "--out", str(tmp_path / "c.zarr"), "--split", "train"])
    assert result.exit_code == 1
    assert "dinov2_vitl14_pretrain.pth" in result.output and "--weights" in result.output


def test_bench_extract_prints_both_throughputs(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(tttkd_app, ["bench", "extract", "--scenes", "1", "--device", "cpu", "--repeats", "1",
                                       "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["model_images_per_s"] > 0 and record["end_to_end_images_per_s"] > 0
    assert "model only: images / s" in result.output
