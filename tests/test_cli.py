"""The command-line apps, through typer's CliRunner: exit codes and what the user reads."""

import json

import pytest
import typer
from typer.testing import CliRunner

from tttkd.cli.main import app as tttkd_app
from tttkd.cli.options import repeated_option
from tttkd.cli.prep import app as prep_app
from tttkd.pipeline.cache import FeatureCache

runner = CliRunner()


def test_synth_extract_info(tmp_path):
    """--scenes may repeat; the scenes it names get no split unless --split is given (they were
    tagged "train" by --split's old default); a later --split run tags them without redoing them."""
    root, store = tmp_path / "data", tmp_path / "cache.zarr"
    result = runner.invoke(prep_app, ["synth", "--out", str(root), "--scenes", "2", "--views", "2", "--domain", "b"])
    assert result.exit_code == 0, result.output
    extract = ["extract", "--root", str(root), "--model", "efficientnet_lite0", "--out", str(store), "--device", "cpu"]
    result = runner.invoke(prep_app, extract + ["--scenes", "scene0000_00", "--scenes", "scene0001_00"])
    assert result.exit_code == 0, result.output
    assert "2 scenes extracted" in result.output and "bytes_per_point" in result.output
    assert FeatureCache(store).split_counts() == {None: 2} and FeatureCache(store).provenance["splits"] == []
    result = runner.invoke(prep_app, ["info", str(store), "--json"])
    summary = json.loads(result.output)
    assert summary["scenes"] == 2 and summary["teacher"] == "efficientnet_lite0" and summary["bytes_per_point"] > 0
    # the split list selects both scenes: complete, they are skipped, and now belong to train
    result = runner.invoke(prep_app, extract + ["--split", "train"])
    assert result.exit_code == 0, result.output
    assert "0 scenes extracted, 2 already complete" in result.output
    assert FeatureCache(store).split_counts() == {"train": 2} and FeatureCache(store).provenance["splits"] == ["train"]
    # a scene is never moved to another split
    result = runner.invoke(prep_app, extract + ["--scenes", "scene0001_00", "--split", "val"])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "scene0001_00 (train) already complete in another split than 'val'" in result.output
    assert FeatureCache(store).split_counts() == {"train": 2} and FeatureCache(store).provenance["splits"] == ["train"]


def test_extract_needs_split_or_scenes(tmp_path):
    result = runner.invoke(prep_app, ["extract", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "c.zarr")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "give --split NAME" in result.output and "--scenes ID,ID" in result.output


def test_a_repeated_single_valued_option_is_refused_in_both_apps(tmp_path):
    """click keeps the last of `--split train --split val` silently; every command of both apps
    (those of cli/adapt.py and of the bench sub-app too) must refuse it before running."""
    cases = [
        (prep_app, ["extract", "--root", str(tmp_path), "--split", "train", "--split", "val"], "extract: --split"),
        (tttkd_app, ["adapt", "--source", "a", "--target", "b", "--steps", "1", "--steps", "2"], "adapt: --steps"),
        (tttkd_app, ["train", "--cache", str(tmp_path), "--split=train", "--split", "all"], "train: --split"),
        (tttkd_app, ["bench", "train", "--cache", str(tmp_path), "--steps", "1", "--steps", "2"], "train: --steps"),
        (tttkd_app, ["train", "--cache", str(tmp_path), "--resume", "--no-resume"], "train: --no-resume"),
    ]
    for app, args, name in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.output.strip().count("\n") == 0, (args, result.output)
        assert f"error: {name} given more than once; give it once" in result.output, (args, result.output)


def test_an_option_value_that_looks_like_an_option_is_not_a_repeat():
    command = typer.main.get_command(prep_app).commands["extract"]
    context = typer.Context(command)
    assert repeated_option(command, context, ["--out", "--split", "--split", "train", "--scenes", "a", "--scenes", "b"]) is None
    assert repeated_option(command, context, ["--scenes", "a", "--", "--split", "x", "--split", "y"]) is None
    assert repeated_option(command, context, ["--split", "x", "--scenes", "a", "--split=y"]) == "--split"


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
    assert record["profile"] is None  # only when asked
    # the extracting thread's wall time, split by what it waited on, adds up to the timed run
    waits = record["main_thread_s"]
    assert set(waits) == {"load", "decode", "batches", "finish", "drain", "other"} and waits["batches"] > 0
    assert sum(waits.values()) == pytest.approx(record["end_to_end_seconds"], rel=0.05)
    assert "teacher batches" in result.output and "the rest" in result.output


def test_bench_extract_refuses_a_codec_it_does_not_know_before_any_work(tmp_path):
    for options, message in ((["--feature-codec", "int4"], "--feature-codec int4: choose one of fp16, int8, pca-int8"),
                             (["--pca-dims", "16"], "--pca-dims applies to --feature-codec pca-int8 only")):
        result = runner.invoke(tttkd_app, ["bench", "extract", "--device", "cpu", *options,
                                           "--data", str(tmp_path / "data"), "--out", str(tmp_path / "b.json")])
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "b.json").exists()


def test_bench_extract_times_pca_int8_in_a_basis_fitted_on_the_first_scene(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(tttkd_app, ["bench", "extract", "--scenes", "1", "--device", "cpu", "--repeats", "1",
                                       "--batch-size", "2", "--feature-codec", "pca-int8", "--pca-dims", "16",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["feature_codec"] == "pca-int8" and record["end_to_end_images_per_s"] > 0
    # 16 one-byte coefficients a point, zstd-compressed, beside the points' own arrays
    assert record["store_bytes"] < record["end_to_end_points"] * 40
    assert record["host"]["write_s_per_scene"] > 0 and "(pca-int8)" in result.output


def test_bench_extract_profiles_scenes_again_when_asked(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(tttkd_app, ["bench", "extract", "--scenes", "1", "--device", "cpu", "--repeats", "1",
                                       "--batch-size", "2", "--profile", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = json.loads(out.read_text())["profile"]
    # on CPU: no GPU kernels and no CUDA calls, but the extraction ran under the profiler
    assert profile["scenes"] == 1 and profile["wall_s"] > 0 and profile["kernel_ms"] is None
    assert profile["runtime_calls"] == {} and "profiled (1 scene)" in result.output


def test_extract_dry_run_lists_scenes_and_names_what_is_wrong(tmp_path):
    import shutil

    root = tmp_path / "data"
    assert runner.invoke(prep_app, ["synth", "--out", str(root), "--scenes", "2", "--views", "3"]).exit_code == 0
    result = runner.invoke(prep_app, ["extract", "--root", str(root), "--scenes", "scene0000_00,scene0001_00",
                                      "--dry-run", "--out", str(tmp_path / "never.zarr")])
    assert result.exit_code == 0, result.output
    assert "scene0000_00" in result.output and "2 scenes ready, 0 with problems" in result.output
    assert not (tmp_path / "never.zarr").exists()  # a dry run writes nothing
    shutil.rmtree(root / "scannet_frames_25k" / "scene0001_00" / "color")
    result = runner.invoke(prep_app, ["extract", "--root", str(root), "--scenes", "scene0000_00,scene0001_00",
                                      "--dry-run"])
    assert result.exit_code == 1 and "1 scenes ready, 1 with problems" in result.output
    assert "no colour frames for scene scene0001_00" in result.output.replace("\n", "")
    result = runner.invoke(prep_app, ["extract", "--root", str(tmp_path / "nowhere"), "--split", "val", "--dry-run"])
    assert result.exit_code == 1 and "nowhere: no such folder" in result.output
