"""The outdoor rows of Table 2: the 2D head (head2d.py), the xMUDA and MM-TTA baselines, the
outdoor presets and the table with the paper's numbers. Tiny in-memory caches, untrained models."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rooms import room_points, room_scene

from tttkd.adapt import rotated
from tttkd.baselines import MMTTA, XMuda, consistency, cross_modal_kl, refine_pseudo_labels
from tttkd.checkpoint import TeacherMismatchError
from tttkd.cli.main import app
from tttkd.data import DataConfig
from tttkd.experiment import plan_rows
from tttkd.head2d import Head2D, Head2DConfig, fit_head2d, head2d_path, load_head2d
from tttkd.model import build_model, model_config
from tttkd.pipeline.cache import FeatureCache, open_for_writing, write_scene
from tttkd.pipeline.manifests import load_classes
from tttkd.pipeline.scene import Scene

KD_DIM = 16
TEACHER = {"teacher": "test-teacher", "weights_sha256": "0" * 64, "feature_dim": KD_DIM, "image_scale": 0.25, "stride": 8}


def write_cache(path, dataset: str, scenes: dict[str, str], *, points: int = 3000):
    """A cache of `dataset` with room scenes {scene_id: split}; 'teacher' features a smooth function of
    position and class (rooms.py), 10 outdoor class names (labels 0..6)."""
    provenance = {**TEACHER, "dataset": dataset, "class_names": load_classes(dataset)["names"],
                  "feature_dtype": "float16", "feature_codec": "fp16"}
    for seed, (scene_id, split) in enumerate(scenes.items()):
        open_for_writing(path, provenance, split=split, scene_ids=[scene_id])
        target = room_scene(points, kd_dim=KD_DIM, seed=seed, scene_id=scene_id)
        p = target.points
        write_scene(path, Scene(scene_id, p.coord, p.color.astype(np.uint8), p.normal, p.label.astype(np.int16)),
                    seen_index=target.seen_index, feature=target.feature.numpy(),
                    view_count=np.ones(len(target.seen_index), np.uint16), attrs={"split": split})
    return path


def write_checkpoint(path, *, dataset: str = "a2d2"):
    """An untrained small 3D model on xyz input, as `tttkd train` writes its checkpoint."""
    torch.manual_seed(0)
    config = model_config("small", in_channels=3, num_classes=10, kd_dim=KD_DIM)
    torch.save({"model": build_model(config).state_dict(), "model_config": asdict(config),
                "train_config": {"data": {"voxel_size_m": 0.1, "input_features": "xyz"}},
                "class_names": load_classes(dataset)["names"], "teacher": TEACHER, "dataset": dataset}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: two intra-op threads only wait on each other, and on a loaded 2-core
    machine that made one 150-step head fit take 25 s instead of 0.4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outdoor(tmp_path_factory):
    """A source (a2d2) cache of two train scenes, a target (semantickitti) cache of one val scene, and
    a source model."""
    root = tmp_path_factory.mktemp("outdoor")
    source = write_cache(root / "a2d2.zarr", "a2d2", {"src_0": "train", "src_1": "train"})
    target = write_cache(root / "semantickitti.zarr", "semantickitti", {"08_000000": "val"})
    (root / "run").mkdir()
    return source, target, write_checkpoint(root / "run" / "last.pt")


SMALL_HEAD = Head2DConfig(hidden=64, steps=150, batch_points=512, points_per_scene=512)


def test_the_2d_head_fits_its_source_points_well_above_chance_and_is_refused_for_another_teacher(outdoor):
    source, target, checkpoint = outdoor
    path = fit_head2d(source, checkpoint, split="train", config=SMALL_HEAD)
    assert path == head2d_path(checkpoint) == checkpoint.with_name("head2d.pt")
    stored = torch.load(path, weights_only=True)  # tensors and plain data only
    label = np.concatenate([room_points(3000, seed=s)[2] for s in (0, 1)])
    majority = np.bincount(label).max() / len(label)  # what always predicting one class scores
    assert stored["points"] == 1024 and stored["train_accuracy"] > max(0.8, majority + 0.3), stored["train_accuracy"]
    names = load_classes("a2d2")["names"]
    head = load_head2d(path, class_names=names, target_provenance=FeatureCache(target).provenance, cache_path=target,
                       device="cpu")
    assert isinstance(head, Head2D) and not head.training
    other = {**FeatureCache(target).provenance, "teacher": "dinov2_vitl14", "feature_dim": 1024}
    with pytest.raises(TeacherMismatchError):
        load_head2d(path, class_names=names, target_provenance=other, cache_path=target, device="cpu")
    with pytest.raises(ValueError, match="not the model's"):
        load_head2d(path, class_names=names[::-1], target_provenance=FeatureCache(target).provenance,
                    cache_path=target, device="cpu")
    # a damaged file, or a model checkpoint in its place: one line naming the file, no traceback
    broken = path.with_name("broken.pt")
    broken.write_bytes(path.read_bytes()[:200])
    other_file = path.with_name("model.pt")
    torch.save({"model": {}, "class_names": names}, other_file)
    for bad, why in ((broken, "not a readable 2D head"), (other_file, "not a 2D head")):
        with pytest.raises(ValueError, match=why) as error:
            load_head2d(bad, class_names=names, target_provenance=FeatureCache(target).provenance,
                        cache_path=target, device="cpu")
        assert str(bad) in str(error.value) and "\n" not in str(error.value)


def bn_names(module: nn.Module, *parts: str) -> set[str]:
    names = {f"{m}.{p}" for m, sub in module.named_modules() if isinstance(sub, nn.BatchNorm1d) for p in ("weight", "bias")}
    return {n for n in names if not parts or n.split(".")[0] in parts}


@pytest.mark.parametrize("method", ["xmuda", "mm-tta"])
def test_each_multimodal_baseline_trains_exactly_the_bn_affine_parameters_of_both_branches(method):
    torch.manual_seed(0)
    model = build_model(model_config("small", kd_dim=32, num_classes=20))
    head = Head2D(32, 20, hidden=64)
    scene, data = room_scene(20_000, kd_dim=32), DataConfig(voxel_size_m=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = (XMuda if method == "xmuda" else MMTTA)(model, head)
    adapter.adapt(scene, rotated(scene, 0.0, data, "cpu"), data)
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == bn_names(model, "backbone", "seg_head"), sorted(trained ^ bn_names(model, "backbone", "seg_head"))
    assert {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == {"norm.weight", "norm.bias"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trained)
    if method == "mm-tta":  # the slow model follows by momentum, never by gradients, and it predicts
        slow = dict(adapter.slow_model.named_parameters())
        assert all(p.grad is None for p in slow.values())
        moved = {n for n, p in slow.items() if not torch.equal(p, before[n])}
        assert moved and moved <= bn_names(model, "backbone", "seg_head")
        for n in moved:  # slow = 0.99 slow + 0.01 fast
            assert torch.allclose(slow[n], 0.99 * before[n] + 0.01 * dict(model.named_parameters())[n], atol=1e-6)
        assert not any(b.training for b in adapter.slow_model.modules() if isinstance(b, nn.BatchNorm1d))


def logits(*rows) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_mm_tta_refinement_takes_each_point_s_label_from_its_more_consistent_modality():
    # point 0: the 2D models agree on class 0, the 3D ones disagree (1 vs 2) -> 2D's class 0
    # point 1: the 3D models agree on class 2, the 2D ones disagree -> 3D's class 2
    # point 2: both modalities' models disagree completely -> below the threshold: no label
    # point 3: both agree, 2D a little more; the 2D models' mean favours class 1 -> class 1
    slow_2d = logits([.9, .05, .05], [.8, .1, .1], [.98, .01, .01], [.2, .7, .1])
    fast_2d = logits([.9, .05, .05], [.1, .1, .8], [.01, .01, .98], [.2, .7, .1])
    slow_3d = logits([.1, .8, .1], [.05, .05, .9], [.01, .98, .01], [.6, .3, .1])
    fast_3d = logits([.1, .1, .8], [.05, .05, .9], [.01, .01, .98], [.62, .28, .1])
    label, use_2d = refine_pseudo_labels(slow_2d, fast_2d, slow_3d, fast_3d, threshold=0.3)
    assert use_2d.tolist()[:2] == [True, False] and use_2d[3]
    assert label.tolist() == [0, 2, -1, 1]
    # consistency: the inverse of the slow/fast KL, so identical predictions are the most consistent
    zeta = consistency(slow_3d, fast_3d)
    assert zeta[1] > 1e5 and zeta[2] < 0.3 and zeta[0] < zeta[3]


def test_xmuda_cross_modal_kl_is_zero_when_both_branches_agree_and_trains_each_towards_the_other():
    a = torch.randn(50, 10)
    assert cross_modal_kl(a, a.clone()).abs() < 1e-6
    logits_3d, logits_2d = torch.randn(50, 10, requires_grad=True), torch.randn(50, 10, requires_grad=True)
    loss = cross_modal_kl(logits_3d, logits_2d)
    p3, p2 = logits_3d.softmax(1), logits_2d.softmax(1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(1).mean()  # KL(p || q)
    assert torch.allclose(loss, kl(p2, p3) + kl(p3, p2), atol=1e-5)
    loss.backward()
    # the 3D branch's gradient is that of KL(P2D || P3D) alone: the 2D side is its detached target
    expected = torch.autograd.grad(kl(p2.detach(), logits_3d.softmax(1)), logits_3d)[0]
    assert torch.allclose(logits_3d.grad, expected, atol=1e-6)


def test_multimodal_rows_are_planned_only_with_a_2d_head_in_the_paper_s_order(tmp_path):
    joint = tmp_path / "last.pt"
    rows = lambda head2d: [r for r, _, _ in plan_rows(joint=joint, source_only=None, oracle=None,
                                                      methods=["none", "tent", "xmuda", "mm-tta", "ttt-kd"], head2d=head2d)]
    assert rows(False) == ["Joint-Train", "TENT", "TTT-KD"]
    assert rows(True) == ["Joint-Train", "TENT", "xMUDA", "MM-TTA", "TTT-KD"]


def adapt(outdoor, out, *extra, source_cache=None):
    source, target, checkpoint = outdoor
    return CliRunner().invoke(app, ["adapt", "--source", "a2d2", "--target", "semantickitti", "--checkpoint",
                                    str(checkpoint), "--cache", str(target), "--source-cache", str(source_cache or source),
                                    "--out", str(out), "--device", "cpu", *extra])


def test_cli_adapt_prints_table_2_rows_beside_the_paper_s_numbers_with_the_outdoor_preset(outdoor, tmp_path,
                                                                                          monkeypatch):
    import tttkd.head2d

    fits = []

    def small_fit(*args, **kwargs):  # the CLI's fit with a smaller head and fewer steps (CPU test time)
        fits.append(args)
        return fit_head2d(*args, **{**kwargs, "config": SMALL_HEAD})

    monkeypatch.setattr(tttkd.head2d, "fit_head2d", small_fit)
    head = head2d_path(outdoor[2])
    head.unlink(missing_ok=True)
    result = adapt(outdoor, tmp_path / "x", "--method", "xmuda", source_cache=tmp_path / "none.zarr")
    assert result.exit_code == 1 and "none.zarr: no feature cache here" in result.output  # no source: one line
    fits.clear()
    result = adapt(outdoor, tmp_path / "x", "--method", "xmuda", "--preset", "outdoor")  # fits the missing head
    assert result.exit_code == 0, result.output
    assert head.is_file() and "fitting" in result.output and fits == [(outdoor[0], outdoor[2])]
    row = next(line for line in result.output.splitlines() if line.startswith("| xMUDA |"))
    assert row.split("|")[3].strip() == "38.0"  # the paper's Table 2 number beside ours
    config = json.loads((tmp_path / "x" / "results.json").read_text())["config"]
    assert (config["steps"], config["lr"], config["rotations"]) == (25, 0.1, 4)  # paper §4.2
    result = adapt(outdoor, tmp_path / "m", "--method", "mm-tta", "--preset", "outdoor", "--rotations", "1")
    assert result.exit_code == 0, result.output
    assert "fitting" not in result.output  # the head beside the checkpoint is reused
    row = next(line for line in result.output.splitlines() if line.startswith("| MM-TTA |"))
    assert row.split("|")[3].strip() == "42.5"
    config = json.loads((tmp_path / "m" / "results.json").read_text())["config"]
    assert (config["steps"], config["lr"], config["rotations"]) == (25, 0.1, 1)  # an explicit option wins
    result = adapt(outdoor, tmp_path / "bad", "--method", "xmuda", "--preset", "highway")
    assert result.exit_code == 1 and "unknown preset 'highway'" in result.output


def test_cli_train_outdoor_preset_sets_xmuda_s_model_input_and_voxels(monkeypatch, tmp_path):
    import tttkd.train

    seen = {}

    def fake_train(cache, out, config, **kwargs):
        seen["config"] = config
        return {"steps": 0, "best_val_miou": None}

    monkeypatch.setattr(tttkd.train, "train", fake_train)
    result = CliRunner().invoke(app, ["train", "--cache", str(tmp_path), "--out", str(tmp_path / "run"), "--preset",
                                      "outdoor", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.model, config.data.input_features, config.data.voxel_size_m) == ("scn_unet", "xyz", 0.05)
    # xMUDA's LiDAR augmentation: rotation, flips, scale and translation, none of the indoor-only ones
    augment = config.data.augment
    assert augment.rotate and augment.mirror and augment.scale and augment.translate_m
    assert (augment.elastic, augment.crop, augment.brightness, augment.mix3d_p) == (None, None, None, 0.0)
    CliRunner().invoke(app, ["train", "--cache", str(tmp_path), "--preset", "outdoor", "--voxel", "0.1",
                             "--device", "cpu"])
    assert seen["config"].data.voxel_size_m == 0.1 and seen["config"].model == "scn_unet"
    CliRunner().invoke(app, ["train", "--cache", str(tmp_path), "--device", "cpu"])
    assert seen["config"].data.augment.elastic and seen["config"].data.augment.mix3d_p == 0.5  # indoors: Pointcept's
