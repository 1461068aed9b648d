"""The experiment driver: rows, scoring on one class list, the results table, `tttkd adapt`."""

import json
import math
import shutil

import numpy as np
import torch
import zarr
from typer.testing import CliRunner

from tttkd.adapt import AdaptConfig
from tttkd.checkpoint import load_checkpoint
from tttkd.cli.main import app
from tttkd.experiment import MethodResult, markdown_table, run_method, scored_classes
from tttkd.pipeline.manifests import load_classes, shared_classes

IDS = ["scene0000_00", "scene0001_00", "scene0002_00"]


def result(row: str, iou: dict[str, float]) -> MethodResult:
    return MethodResult(row=row, method="none", checkpoint="-", miou=float(np.nanmean(list(iou.values()))), iou=iou,
                        per_scene_miou={}, updates=0, seconds=0.0)


def test_markdown_table_puts_each_iou_under_its_class_name_whatever_the_rows_order_or_classes():
    # bug: the header came from the first row's classes and cells followed each row's own dict order
    rows = [result("Oracle", {"wall": 0.5, "floor": 0.25, "bed": 0.9}),
            result("TTT-KD", {"floor": 0.75, "chair": 0.125}),
            result("TENT", {"chair": float("nan"), "wall": 0.0})]
    table = markdown_table(rows, title="t", classes=["floor", "wall", "chair"])
    lines = table.splitlines()
    assert lines[2] == "| method | mIoU | floor | wall | chair |"
    assert lines[4] == "| Oracle | 55.0 | 25.0 | 50.0 | - |"  # bed is not a scored class: no column
    assert lines[5] == "| TTT-KD | 43.8 | 75.0 | - | 12.5 |"
    assert lines[6] == "| TENT | 0.0 | - | 0.0 | - |"


def test_the_paper_s_table_1_numbers_sit_beside_ours_for_its_transfers():
    from tttkd.pipeline.manifests import paper_results

    paper = paper_results("s3dis", "scannet")
    assert paper["TTT-KD"] == 68.4 and paper["Oracle"] == 84.2 and paper["Source-Only"] == 54.9
    assert paper_results("scannet", "matterport")["TTT-KD"] == 55.3
    assert "Oracle" not in paper_results("scannet", "scannet") and paper_results("scannet", "synth") == {}
    for source in ("scannet", "s3dis", "matterport"):
        for target in ("scannet", "s3dis", "matterport"):
            assert len(paper_results(source, target)) == (7 if source == target else 8)
    table = markdown_table([result("TTT-KD", {"floor": 0.5}), result("control: shuffled", {"floor": 0.25})],
                           title="t", classes=["floor"], paper=paper).splitlines()
    assert table[2] == "| method | mIoU | paper (Mink) | floor |"
    assert table[4] == "| TTT-KD | 50.0 | 68.4 | 50.0 |" and table[5] == "| control: shuffled | 25.0 | - | 25.0 |"


def as_other_dataset(checkpoint_path, out, *, dataset: str):
    """The same network relabelled as trained on `dataset`: each output keeps its meaning, under that
    dataset's name for the class where the two datasets share it (e.g. s3dis `bookcase` for scannet
    `bookshelf`), and a dummy name elsewhere (so num_classes still matches the weights)."""
    checkpoint = load_checkpoint(checkpoint_path)
    own = dict(shared_classes(checkpoint["dataset"], dataset))
    checkpoint["dataset"] = dataset
    checkpoint["class_names"] = [own.get(name, f"unused_{i}") for i, name in enumerate(checkpoint["class_names"])]
    torch.save(checkpoint, out)
    return out


def test_oracle_row_is_scored_on_the_same_classes_as_a_cross_dataset_row(joint_checkpoint, synth_cache, tmp_path):
    # bug: the Oracle (trained on the target) was scored on all 20 target classes, the source rows on the 8
    # shared with s3dis, and the table put both under one header
    assert load_checkpoint(joint_checkpoint)["dataset"] == "scannet"
    classes = scored_classes("s3dis", "scannet")
    assert classes == [t for _, t in shared_classes("s3dis", "scannet")] and "bookshelf" in classes
    assert len(classes) < len(load_classes("scannet")["names"])
    config = AdaptConfig(rotations=1)
    source = as_other_dataset(joint_checkpoint, tmp_path / "s3dis.pt", dataset="s3dis")
    oracle = run_method("Oracle", "none", joint_checkpoint, synth_cache, IDS, config=config, device="cpu",
                        classes=classes)
    cross = run_method("Joint-Train", "none", source, synth_cache, IDS, config=config, device="cpu", classes=classes)
    assert list(oracle.iou) == list(cross.iou) == classes
    # the same network under two label spaces predicts the same target classes: identical scores
    assert np.array_equal(list(oracle.iou.values()), list(cross.iou.values()), equal_nan=True)
    assert oracle.miou == cross.miou and math.isfinite(oracle.miou)
    # scoring on all of the target's classes (the old Oracle row) gives another set and another mIoU
    everything = run_method("Oracle", "none", joint_checkpoint, synth_cache, IDS, config=config, device="cpu")
    assert list(everything.iou) == load_classes("scannet")["names"] and everything.miou != oracle.miou


def adapt_args(checkpoint, cache, out, *extra):
    return ["adapt", "--source", "synth_a", "--target", "synth_a", "--checkpoint", str(checkpoint), "--cache",
            str(cache), "--out", str(out), "--device", "cpu", *extra]


def test_cli_adapt_writes_the_results_table(joint_checkpoint, synth_cache, tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(app, adapt_args(joint_checkpoint, synth_cache, out, "--split", "all", "--steps", "2",
                                                "--rotations", "1", "--kd-points", "512", "--lr", "0.1"))
    assert result.exit_code == 0, result.output
    table = (out / "results.md").read_text()
    for row in ("Joint-Train", "TENT", "DUA", "AdaContrast", "TTT-KD-O", "TTT-KD"):
        assert f"| {row} |" in table
    record = json.loads((out / "results.json").read_text())
    assert record["classes"] == scored_classes("scannet", "scannet")
    assert all(list(r["iou"]) == record["classes"] for r in record["results"])
    ttt = next(r for r in record["results"] if r["method"] == "ttt-kd")
    assert set(ttt["miou_by_step"]) == {"0", "1", "2"} and (out / "miou_vs_steps.png").exists()
    assert set(ttt["per_scene_miou"]) == set(IDS)
    result = CliRunner().invoke(app, ["adapt", "--source", "nowhere", "--target", "synth_a", "--cache",
                                      str(synth_cache), "--device", "cpu"])
    assert result.exit_code == 1 and "runs/nowhere/last.pt: no checkpoint here" in result.output


def test_cli_adapt_defaults_to_the_val_split_and_names_the_splits_present(joint_checkpoint, synth_cache, tmp_path):
    # bug: without --split every scene was adapted, train scenes included
    cache = tmp_path / "cache.zarr"
    shutil.copytree(synth_cache, cache)
    scenes = zarr.open_group(cache, mode="r+", zarr_format=3)["scenes"]
    for scene_id, split in zip(IDS, ("train", "test", "train")):
        scenes[scene_id].attrs["split"] = split
    fast = ("--method", "none", "--rotations", "1")
    result = CliRunner().invoke(app, adapt_args(joint_checkpoint, cache, tmp_path / "r0", *fast))
    assert result.exit_code == 1
    assert f"error: {cache}: no complete scene of split 'val' (splits present: test, train)" in result.output
    scenes["scene0001_00"].attrs["split"] = "val"
    result = CliRunner().invoke(app, adapt_args(joint_checkpoint, cache, tmp_path / "r1", *fast))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert [list(r["per_scene_miou"]) for r in record["results"]] == [["scene0001_00"]]
    result = CliRunner().invoke(app, adapt_args(joint_checkpoint, cache, tmp_path / "r2", *fast, "--split", "all"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert [sorted(r["per_scene_miou"]) for r in record["results"]] == [IDS]
