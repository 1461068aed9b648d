"""Test-time training and the baselines: what they may change, what they must not, scoring."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from tttkd.adapt import AdaptConfig, TTTKD, check, configure, load_target_scene, rotated, rotation_angles, ttt_kd_offline
from tttkd.baselines import AdaContrast, Dua, Tent
from tttkd.checkpoint import load_checkpoint, model_from_checkpoint
from tttkd.data import DataConfig
from tttkd.experiment import run_method
from tttkd.metrics import SharedLabels, mean_iou
from tttkd.pipeline.cache import FeatureCache
from tttkd.pipeline.manifests import shared_classes

DATA = DataConfig(voxel_size_m=0.1, kd_points=256)
IDS = ["scene0000_00", "scene0001_00", "scene0002_00"]


def fresh_model(path):
    return model_from_checkpoint(load_checkpoint(path), device="cpu")


def scene(synth_cache, scene_id="scene0000_00"):
    return load_target_scene(FeatureCache(synth_cache), scene_id, "cpu")


def small_config(**fields):
    return AdaptConfig(**{**dict(steps=3, lr=0.1, kd_points=2048, rotations=2), **fields})


def bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


def test_ttt_changes_only_the_backbone_and_never_the_bn_statistics(joint_checkpoint, synth_cache):
    model = fresh_model(joint_checkpoint)
    before = {n: p.clone() for n, p in model.named_parameters()}
    buffers = bn_buffers(model)
    adapter = TTTKD(model, small_config())
    s = scene(synth_cache)
    view = rotated(s, 0.0, DATA, "cpu")
    rng = np.random.default_rng(0)
    for _ in range(3):
        adapter.step(view, *adapter.sample_targets(s, view, rng))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    backbone = {n for n in before if n.startswith("backbone.")}
    assert changed <= backbone  # both projectors frozen
    assert len(changed) > 0.8 * len(backbone)  # (a parameter behind a dead ReLU may get no gradient)
    for name, buffer in model.named_buffers():
        if name in buffers:
            assert torch.equal(buffer, buffers[name]), name
    adapter.reset()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_check_refuses_a_model_in_train_mode_or_without_kd_head(joint_checkpoint):
    model = configure(fresh_model(joint_checkpoint))
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        check(model)


def test_kd_loss_falls_over_ttt_steps(joint_checkpoint, synth_cache):
    adapter = TTTKD(fresh_model(joint_checkpoint), small_config(lr=0.1))
    losses = []
    ttt_kd_offline(adapter, scene(synth_cache), DATA, record_steps=[0, 12], kd_losses=losses)
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01


def test_offline_results_do_not_depend_on_scene_order(joint_checkpoint, synth_cache):
    config = small_config(steps=2)
    a = run_method("TTT-KD", "ttt-kd", joint_checkpoint, synth_cache, IDS, config=config, device="cpu")
    b = run_method("TTT-KD", "ttt-kd", joint_checkpoint, synth_cache, IDS[::-1], config=config, device="cpu")
    assert a.per_scene_miou == b.per_scene_miou and a.miou == b.miou
    assert set(a.miou_by_step) == {0, 1, 2}


def test_online_results_depend_on_scene_order_and_stride_sets_the_updates(joint_checkpoint, synth_cache):
    config = small_config(lr=1.0)
    a = run_method("TTT-KD-O", "ttt-kd-o", joint_checkpoint, synth_cache, IDS, config=config, device="cpu")
    b = run_method("TTT-KD-O", "ttt-kd-o", joint_checkpoint, synth_cache, IDS[::-1], config=config, device="cpu")
    assert a.per_scene_miou != b.per_scene_miou  # updates carried from earlier scenes change later ones
    assert a.updates == 3
    for stride in (2, 3):
        r = run_method("TTT-KD-O", "ttt-kd-o", joint_checkpoint, synth_cache, IDS,
                       config=replace(config, stride=stride), device="cpu")
        assert r.updates == math.ceil(len(IDS) / stride)


def test_rotations_are_exact_about_the_up_axis_and_the_ensemble_sums_logits(joint_checkpoint, synth_cache):
    angles = rotation_angles(4)
    assert angles == [0.0, math.pi / 2, math.pi, 3 * math.pi / 2]
    s = scene(synth_cache)
    quarter = rotated(s, math.pi / 2, DataConfig(voxel_size_m=0.1), "cpu")
    grid = quarter.voxels.indices[:, 1:].float()
    base = rotated(s, 0.0, DataConfig(voxel_size_m=0.1), "cpu").voxels.indices[:, 1:].float()
    assert torch.allclose(grid[:, 2].sort().values, base[:, 2].sort().values)  # heights unchanged
    # a quarter turn swaps the x and y extents
    extent = lambda g: (g.max(0).values - g.min(0).values)[:2]
    assert torch.allclose(extent(grid).flip(0), extent(base), atol=1)
    adapter = TTTKD(fresh_model(joint_checkpoint), small_config(rotations=2))
    totals = ttt_kd_offline(adapter, s, DATA, record_steps=[0])
    expected = sum(adapter.predict(rotated(s, a, DATA, "cpu")) for a in rotation_angles(2))
    torch.testing.assert_close(totals[0], expected)


def test_tent_changes_only_batch_norm_affine_parameters(joint_checkpoint, synth_cache):
    model = fresh_model(joint_checkpoint)
    before = {n: p.clone() for n, p in model.named_parameters()}
    tent = Tent(model)
    s = scene(synth_cache)
    tent.adapt(s, rotated(s, 0.0, DATA, "cpu"), DATA)
    bn_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d) for p in ("weight", "bias")}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= bn_params


def test_dua_adapts_running_statistics_without_gradients(joint_checkpoint, synth_cache):
    model = fresh_model(joint_checkpoint)
    params = {n: p.clone() for n, p in model.named_parameters()}
    buffers = bn_buffers(model)
    dua = Dua(model, copies=2)
    s = scene(synth_cache)
    dua.adapt(s, rotated(s, 0.0, DATA, "cpu"), DATA)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(b, buffers[n]) for n, b in model.named_buffers() if n in buffers)
    assert dua.updates == 2


def test_adacontrast_updates_the_student_and_its_momentum_teacher(joint_checkpoint, synth_cache):
    model = fresh_model(joint_checkpoint)
    ada = AdaContrast(model, anchors=512, lr=1e-2)
    teacher_before = {n: p.clone() for n, p in ada.teacher.named_parameters()}
    s = scene(synth_cache)
    for _ in range(2):  # the second step has a memory bank: pseudo labels by nearest neighbours
        ada.adapt(s, rotated(s, 0.0, DATA, "cpu"), DATA)
    assert len(ada.bank_features) == 1024
    moved = [n for n, p in ada.teacher.named_parameters() if not torch.equal(p, teacher_before[n])]
    assert moved and all((p - teacher_before[n]).abs().max() < 0.01 for n, p in ada.teacher.named_parameters())


def test_scoring_uses_only_shared_classes():
    scannet = [c for c in __import__("tttkd.pipeline.manifests", fromlist=["x"]).load_classes("scannet")["names"]]
    s3dis = __import__("tttkd.pipeline.manifests", fromlist=["x"]).load_classes("s3dis")["names"]
    labels = SharedLabels(s3dis, scannet, shared_classes("s3dis", "scannet"))
    assert len(labels.names) == 8 and "bookshelf" in labels.names
    # target points: a wall, a bed (not shared: ignored), a bookshelf; the source model predicts
    # wall, bookcase, and 'clutter' (a class ScanNet lacks) for the bookshelf
    label = np.array([scannet.index("wall"), scannet.index("bed"), scannet.index("bookshelf")])
    prediction = np.array([s3dis.index("wall"), s3dis.index("bookcase"), s3dis.index("clutter")])
    confusion = labels.confusion(prediction, label)
    assert confusion.sum() == 2  # the bed point does not count
    iou = dict(zip(labels.names, __import__("tttkd.metrics", fromlist=["x"]).iou_per_class(confusion)))
    assert iou["wall"] == 1.0 and iou["bookshelf"] == 0.0 and math.isnan(iou["floor"])
    assert mean_iou(confusion) == 0.5
    assert len(shared_classes("s3dis", "matterport")) == 9 and len(shared_classes("matterport", "scannet")) == 20


def test_shuffled_control_pairs_points_with_other_points_features(joint_checkpoint, synth_cache):
    s = scene(synth_cache)
    view = rotated(s, 0.0, DATA, "cpu")
    honest = TTTKD(fresh_model(joint_checkpoint), small_config(kd_points=500))
    control = TTTKD(fresh_model(joint_checkpoint), small_config(kd_points=500, shuffle_targets=True))
    v1, t1 = honest.sample_targets(s, view, np.random.default_rng(0))
    v2, t2 = control.sample_targets(s, view, np.random.default_rng(0))
    assert torch.equal(v1, v2) and torch.equal(t1.sort(0).values, t2.sort(0).values) and not torch.equal(t1, t2)


def test_bench_ttt_reports_each_size(tmp_path):
    from tttkd.bench import bench_ttt

    rows = bench_ttt((3000, 12000), model="small", kd_dim=16, steps=1, kd_points=256, device="cpu")
    assert [r["voxels"] > 0 for r in rows] == [True, True] and rows[1]["voxels"] > 3 * rows[0]["voxels"]
    assert all(r["ms_per_step"] > 0 for r in rows)
