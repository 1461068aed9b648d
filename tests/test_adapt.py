"""Test-time training and the baselines: what they may change, what they must not, scoring."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from rooms import room_scene

from tttkd.adapt import (AdaptConfig, TTTKD, check, configure, load_target_scene, rotated, rotation_angles,
                         scene_rng, ttt_kd_offline)
from tttkd.baselines import AdaContrast, Dua, Tent
from tttkd.checkpoint import load_checkpoint, model_from_checkpoint
from tttkd.data import DataConfig
from tttkd.model import build_model, model_config
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


# The CPU runs the small trained model on an embedded scene; the GPU lane (`pytest -m gpu`) runs
# MinkUNet34C with CUDA's algorithms, where spconv computes weight gradients only in training mode.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def model_and_scene(device):
    """A freshly initialised model (a trained one can have dead units, whose BN scale gets no
    gradient on any device) and an in-memory room."""
    torch.manual_seed(0)
    variant, points, voxel = ("small", 20_000, 0.05) if device == "cpu" else ("minkunet34c", 40_000, 0.04)
    model = build_model(model_config(variant, kd_dim=32, num_classes=20), device=device)
    return model, room_scene(points, kd_dim=32, device=device), DataConfig(voxel_size_m=voxel)


def names(model, *parts, kind=None):
    """Parameter names under the given top-level parts, only batch norm's if kind == "bn"."""
    bn = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, nn.BatchNorm1d)
          for p in ("weight", "bias")}
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in parts and (kind != "bn" or n in bn)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["ttt-kd", "tent", "dua", "adacontrast"])
def test_each_method_updates_exactly_the_parameters_it_claims(method, device):
    model, s, data = model_and_scene(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = bn_buffers(model)
    view = rotated(s, 0.0, data, device)
    if method == "ttt-kd":  # TTT-KD-O takes the same step
        adapter = TTTKD(model, small_config(lr=1.0))
        adapter.step(view, *adapter.sample_targets(s, view, np.random.default_rng(0)))
    elif method == "tent":
        Tent(model).adapt(s, view, data)
    elif method == "dua":
        Dua(model, copies=2).adapt(s, view, data)
    else:
        AdaContrast(model, anchors=512, lr=1e-2).adapt(s, view, data)
    # Judged by gradients: in a fresh network the deep layers' gradients are tiny (1e-10), and an
    # SGD step that small leaves a BN scale of 1.0 bit-identical in fp32.
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {"ttt-kd": names(model, "backbone"), "tent": names(model, "backbone", "seg_head", kind="bn"),
                "dua": set(), "adacontrast": names(model, "backbone", "seg_head")}[method]
    assert trained == expected, ("missing", sorted(expected - trained), "extra", sorted(trained - expected))
    assert changed <= expected and (changed or method == "dua")
    moved = {n for n, b in model.named_buffers() if n in buffers and "running" in n and not torch.equal(b, buffers[n])}
    if method == "dua":  # every BN the segmentation path runs through folds in the scene's statistics
        assert moved == {n for n in buffers if "running" in n and not n.startswith("kd_head")}
    elif method == "tent":  # normalises with the scene's statistics and keeps none
        assert all(bn.running_mean is None and bn.training for bn in model.modules() if isinstance(bn, nn.BatchNorm1d))
    else:
        assert moved == set()


def test_reset_restores_the_source_weights_exactly(joint_checkpoint, synth_cache):
    model = fresh_model(joint_checkpoint)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    adapter = TTTKD(model, small_config(lr=1.0))
    s = scene(synth_cache)
    view = rotated(s, 0.0, DATA, "cpu")
    for _ in range(2):
        adapter.step(view, *adapter.sample_targets(s, view, np.random.default_rng(0)))
    assert any(not torch.equal(p, before[n]) for n, p in model.state_dict().items())
    adapter.reset()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_check_refuses_what_would_not_train_as_the_paper_says(joint_checkpoint, synth_cache, tmp_path):
    model = configure(fresh_model(joint_checkpoint))
    check(model)
    model.eval()  # what configure() once did: on CUDA the convs would then compute no weight gradients
    with pytest.raises(ValueError, match="eval mode"):
        check(model)
    model = configure(fresh_model(joint_checkpoint))
    model.backbone.conv_input[1].train()
    with pytest.raises(ValueError, match="BatchNorm is in training mode"):
        check(model)
    model = configure(fresh_model(joint_checkpoint))
    model.backbone.enc[0].requires_grad_(False)
    with pytest.raises(ValueError, match="some are frozen"):
        check(model)
    model = configure(fresh_model(joint_checkpoint))
    model.kd_head.requires_grad_(True)
    with pytest.raises(ValueError, match="freezes both projectors"):
        check(model)
    source_only = load_checkpoint(joint_checkpoint)
    source_only["model_config"] = {**source_only["model_config"], "kd_dim": None}
    source_only["model"] = {k: v for k, v in source_only["model"].items() if not k.startswith("kd_head")}
    with pytest.raises(ValueError, match="no kd_head"):
        TTTKD(model_from_checkpoint(source_only, device="cpu"), small_config())


def test_kd_loss_falls_over_ttt_steps(joint_checkpoint, synth_cache):
    adapter = TTTKD(fresh_model(joint_checkpoint), small_config(lr=0.1))
    losses = []
    ttt_kd_offline(adapter, scene(synth_cache), DATA, record_steps=[0, 12], kd_losses=losses)
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01


def test_offline_results_do_not_depend_on_scene_order(joint_checkpoint, synth_cache):
    adapter = TTTKD(fresh_model(joint_checkpoint), small_config(lr=1.0, rotations=1))
    first, second = scene(synth_cache, IDS[0]), scene(synth_cache, IDS[1])
    alone = ttt_kd_offline(adapter, second, DATA, record_steps=[0, 2])
    ttt_kd_offline(adapter, first, DATA, record_steps=[0, 2])
    after_another = ttt_kd_offline(adapter, second, DATA, record_steps=[0, 2])
    assert not torch.allclose(alone[2], alone[0])  # the steps changed the predictions...
    torch.testing.assert_close(after_another[2], alone[2])  # ...and left nothing behind (up to threaded sums)
    result = run_method("TTT-KD", "ttt-kd", joint_checkpoint, synth_cache, IDS, config=small_config(steps=2),
                        device="cpu")
    assert set(result.miou_by_step) == {0, 1, 2}


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


def test_rotations_are_exact_about_the_up_axis(synth_cache):
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


def test_each_rotation_adapts_from_the_source_weights_and_the_ensemble_sums_its_logits(joint_checkpoint, synth_cache):
    s = scene(synth_cache)
    config = small_config(lr=1.0, rotations=2)
    totals = ttt_kd_offline(TTTKD(fresh_model(joint_checkpoint), config), s, DATA, record_steps=[0, 2])
    expected = {0: 0, 2: 0}
    for k, angle in enumerate(rotation_angles(2)):  # by hand: a fresh source model for every rotation
        adapter = TTTKD(fresh_model(joint_checkpoint), config)
        view, rng = rotated(s, angle, DATA, "cpu"), scene_rng(config, s.scene_id, k)
        expected[0] = expected[0] + adapter.predict(view)
        for _ in range(2):
            adapter.step(view, *adapter.sample_targets(s, view, rng))
        expected[2] = expected[2] + adapter.predict(view)
    torch.testing.assert_close(totals[0], expected[0])
    torch.testing.assert_close(totals[2], expected[2])
    assert not torch.allclose(totals[2], totals[0])


def test_tent_normalises_with_the_scene_statistics(joint_checkpoint, synth_cache):
    """Scaling every input feature by 10 scales the stem conv's output by 10; batch statistics
    normalise that away, running statistics do not."""
    s = scene(synth_cache)
    view = rotated(s, 0.0, DATA, "cpu")
    scaled = rotated(s, 0.0, DATA, "cpu")
    scaled.voxels = scaled.voxels.replace_feature(scaled.voxels.features * 10)
    relative = lambda a, b: float((a - b).norm() / b.norm())
    tent = Tent(fresh_model(joint_checkpoint))
    plain = TTTKD(fresh_model(joint_checkpoint), small_config())
    # what is left for TENT is BN's eps (1e-3), which weighs more at the smaller scale
    assert relative(tent.predict(scaled), tent.predict(view)) < 0.1 < relative(plain.predict(scaled), plain.predict(view))


def test_dua_decays_its_momentum_per_scene_over_a_batch_of_copies(joint_checkpoint, synth_cache):
    model = fresh_model(joint_checkpoint)
    seen = []  # (momentum, scenes in the batch) at every BN forward in training mode
    first_bn = model.backbone.conv_input[1]
    model.backbone.conv_input.register_forward_pre_hook(
        lambda module, args: seen.append((first_bn.momentum, args[0].batch_size)) if first_bn.training else None)
    dua = Dua(model, copies=3)
    s = scene(synth_cache)
    for _ in range(3):
        dua.adapt(s, rotated(s, 0.0, DATA, "cpu"), DATA)
    assert [b for _, b in seen] == [3, 3, 3] and dua.updates == 3
    assert np.allclose([m for m, _ in seen], [0.1, 0.094, 0.08836])
    dua.updates = 100
    assert dua.current_momentum() == 0.005  # 0.1 * 0.94^100 is below the floor


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


def test_bench_ttt_times_the_tf32_and_graph_paths_when_asked():
    """Each asked-for path gets its own timings; on CPU a graph is never captured (a CUDA feature)."""
    from tttkd.bench import bench_ttt

    plain, = bench_ttt((3000,), model="small", kd_dim=16, steps=1, kd_points=256, device="cpu", protocol_rotations=0)
    both, = bench_ttt((3000,), model="small", kd_dim=16, steps=1, kd_points=256, device="cpu", protocol_rotations=0,
                      tf32=True, graph=True)
    assert "ms_per_step_graph" not in plain and "graph_captured" not in plain
    assert both["ms_per_step_tf32"] > 0 and both["ms_per_step_graph"] > 0 and both["graph_captured"] is False


def test_bench_ttt_profiles_each_path_when_asked(tmp_path):
    """`--profile N`: per path the profiled kernel time (CUDA only) and CUDA runtime calls per step
    (none on CPU), in the JSON and a table."""
    from typer.testing import CliRunner

    from tttkd.cli.main import app

    out = tmp_path / "ttt.json"
    result = CliRunner().invoke(app, ["bench", "ttt", "--sizes", "3000", "--model", "small", "--steps", "1",
                                      "--protocol-rotations", "0", "--kd-points", "256", "--profile", "2",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    row, = json.loads(out.read_text())
    for path in ("reference", "fast"):
        assert row[f"kernel_ms_per_step_{path}"] is None and row[f"runtime_calls_per_step_{path}"] == {}
    assert "profiled steps" in result.output and "launches" in result.output
