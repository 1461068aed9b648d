"""Joint training: losses, schedule, overfitting, resume, Source-Only, teacher checks, evaluation."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tttkd.augment import NO_AUGMENTATION
from tttkd.checkpoint import TeacherMismatchError, load_checkpoint
from tttkd.cli.main import app
from tttkd.data import CacheDataset, DataConfig, collate
from tttkd.evaluate import evaluate
from tttkd.loss import kd_loss, segmentation_loss
from tttkd.metrics import confusion_matrix, iou_per_class, mean_iou
from tttkd.model import build_model, model_config
from tttkd.pipeline import cache as cache_module
from tttkd.pipeline.cache import FeatureCache
from tttkd.train import TrainConfig, batch_losses, make_optimizer, split_scene_ids, train

FAST = DataConfig(voxel_size_m=0.1, kd_points=256, augment=NO_AUGMENTATION)


def test_kd_loss_is_the_mean_negative_cosine_against_the_unnormalised_target():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator) * 0.3
    expected = -np.mean([float(p @ t / p.norm()) for p, t in zip(prediction, target)])
    # abs: a mean of five cosines can land near 0, where float32 cancellation defeats a relative bound
    assert kd_loss(prediction, target).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # for unit targets it is exactly the mean negative cosine similarity
    unit = F.normalize(target, dim=1)
    assert kd_loss(prediction, unit).item() == pytest.approx(-F.cosine_similarity(prediction, unit).mean().item(), rel=1e-5)


def test_segmentation_loss_smooths_labels_by_0_2_and_ignores_minus_one():
    logits = torch.randn(6, 4)
    label = torch.tensor([0, 1, -1, 3, 2, -1])
    valid = label >= 0
    log_p = logits[valid].log_softmax(1)
    target = torch.full((4, 4), 0.2 / 4) + 0.8 * F.one_hot(label[valid], 4)
    expected = -(target * log_p).sum(1).mean()
    assert TrainConfig().label_smoothing == 0.2
    assert segmentation_loss(logits, label).item() == pytest.approx(expected.item(), rel=1e-6)


def test_one_cycle_schedule_has_the_papers_values():
    model = torch.nn.Linear(2, 2)
    config = TrainConfig()
    optimizer, scheduler = make_optimizer(model, config, total_steps=100)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 1e-4
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.005 / 10)
    assert max(lrs) == pytest.approx(0.005, rel=1e-3) and 25 <= int(np.argmax(lrs)) <= 32
    assert lrs[-1] == pytest.approx(0.005 / 10 / 1000, rel=0.05)


def test_miou_on_a_hand_made_prediction():
    label = np.array([0, 0, 1, 1, 2, -1, -1])
    prediction = np.array([0, 1, 1, 1, 0, 2, 2])
    confusion = confusion_matrix(prediction, label, 4)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0 -> 0; class 3: absent
    np.testing.assert_allclose(iou_per_class(confusion)[:3], [1 / 3, 2 / 3, 0])
    assert math.isnan(iou_per_class(confusion)[3])
    assert mean_iou(confusion) == pytest.approx(1 / 3)
    assert mean_iou(confusion, classes=[0, 1]) == pytest.approx(0.5)


def one_scene_batch(synth_cache, config=FAST):
    return collate([CacheDataset(synth_cache, ["scene0000_00"], config, train=True)[0]])


def test_overfitting_one_scene_reaches_0_9_miou(synth_cache):
    torch.manual_seed(0)
    data = replace(FAST, voxel_size_m=0.05)
    batch = one_scene_batch(synth_cache, data)
    model = build_model(model_config("small", kd_dim=472, num_classes=20, bn_momentum=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.005)
    config = TrainConfig(data=data)
    for _ in range(120):
        model.train()
        loss, _, _ = batch_losses(model, batch, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    names = FeatureCache(synth_cache).provenance["class_names"]
    result = evaluate(model, synth_cache, ["scene0000_00"], data_config=data, class_names=names, device="cpu")
    assert result.miou >= 0.9, result.iou


def test_kd_loss_falls_on_its_own(synth_cache):
    torch.manual_seed(0)
    batch = one_scene_batch(synth_cache)
    model = build_model(model_config("small", kd_dim=472, num_classes=20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)
    config = TrainConfig(data=FAST)
    losses = []
    for _ in range(25):
        _, _, loss_kd = batch_losses(model, batch, config)
        optimizer.zero_grad()
        loss_kd.backward()  # the KD term alone
        optimizer.step()
        losses.append(loss_kd.item())
    assert losses[-1] < losses[0] - 0.2 and losses[-1] < -0.5


def tiny_config(**fields):
    """synth_cache has no splits: train on every scene, without validation, unless told otherwise."""
    return TrainConfig(**{**dict(epochs=2, batch_size=2, model="small", workers=0, log_every=1, data=FAST,
                                 split=None, validate=False), **fields})


def test_persistent_workers_give_the_same_batches_as_the_main_process(synth_cache):
    from tttkd.data import make_loader

    dataset = CacheDataset(synth_cache, ["scene0000_00", "scene0001_00", "scene0002_00"], replace(FAST, kd_points=64),
                           train=True)
    batches = {}
    for workers in (0, 2):
        loader, sampler = make_loader(dataset, batch_size=2, shuffle=True, workers=workers, seed=3)
        batches[workers] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches[workers] += [b.kd_target.sum().item() for b in loader]
    assert batches[0] == batches[2] and batches[0][:2] != batches[0][2:]


def test_one_loader_over_all_epochs_gives_the_per_epoch_batches_and_prefetches_across_epochs(synth_cache):
    """EpochBatches / make_epoch_loader (what `train` uses) against make_loader epoch by epoch: the same
    batches, also with workers and with each of 2 processes' shards; the workers run ahead into the
    next epoch instead of starting it from nothing."""
    from tttkd.data import EpochBatches, make_epoch_loader, make_loader

    dataset = CacheDataset(synth_cache, ["scene0000_00", "scene0001_00", "scene0002_00"], replace(FAST, kd_points=64),
                           train=True)
    loader, sampler = make_loader(dataset, batch_size=2, shuffle=True, workers=0, seed=3)
    expected = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        expected += [b.kd_target.sum().item() for b in loader]
    for workers in (0, 2):
        spanning, per_epoch = make_epoch_loader(dataset, batch_size=2, shuffle=True, workers=workers, seed=3,
                                                epochs=range(1, 4))
        assert per_epoch == 2 and len(spanning) == 6  # 3 scenes at batch 2: the last batch of an epoch is short
        assert [b.kd_target.sum().item() for b in spanning] == expected
    for world in (1, 2):
        for rank in range(world):
            ours = list(EpochBatches(5, 3, shuffle=True, seed=1, epochs=range(2, 4), rank=rank, world_size=world))
            theirs = []
            for epoch in (2, 3):
                loader, sampler = make_loader(dataset, batch_size=3, shuffle=True, workers=0, seed=1, rank=rank,
                                              world_size=world)
                sampler.size = 5  # the indices only (no sample is built)
                sampler.set_epoch(epoch)
                batch_sampler = loader.batch_sampler
                theirs += [list(b) for b in batch_sampler]
            assert ours == theirs, (world, rank)
    # the batch sampler runs ahead: with 2 workers prefetching 2 batches each, the first batch of epoch 2
    # is asked for while epoch 1 is still being consumed
    asked = []
    batches = EpochBatches(3, 1, shuffle=False, seed=0, epochs=range(1, 3))
    original = batches.sampler.set_epoch
    batches.sampler.set_epoch = lambda epoch: asked.append(epoch) or original(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=2, prefetch_factor=2,
                                         collate_fn=lambda samples: len(samples))
    iterator = iter(loader)
    next(iterator)
    assert asked == [1, 2]  # one batch of epoch 1 taken, epoch 2's already requested
    del iterator


def test_resume_reproduces_the_next_steps_exactly(synth_cache, tmp_path, monkeypatch):
    train(synth_cache, tmp_path / "straight", tiny_config(), progress=False)
    # the same run, killed when its second epoch starts
    from tttkd.data import EpochSampler

    real_set_epoch = EpochSampler.set_epoch

    def interrupted(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        real_set_epoch(self, epoch)

    monkeypatch.setattr(EpochSampler, "set_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):  # last.pt after every epoch
        train(synth_cache, tmp_path / "resumed", tiny_config(checkpoint_minutes=0), progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(EpochSampler, "set_epoch", real_set_epoch)
    train(synth_cache, tmp_path / "resumed", tiny_config(checkpoint_minutes=0), progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 4
    # the log holds each step once: the checkpoint's history, then the resumed run's
    steps = lambda run: [json.loads(line)["step"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert steps("resumed") == steps("straight") == [1, 2, 3, 4]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_source_only_training_has_no_kd_head_and_no_kd_loss(synth_cache, tmp_path):
    train(synth_cache, tmp_path / "src", tiny_config(epochs=1, use_kd=False), progress=False)
    checkpoint = load_checkpoint(tmp_path / "src" / "last.pt")
    assert not any(k.startswith("kd_head") for k in checkpoint["model"])
    assert checkpoint["model_config"]["kd_dim"] is None
    records = [json.loads(l) for l in (tmp_path / "src" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss_kd") is None for r in records)


def test_xyz_input_builds_a_three_channel_network(synth_cache, tmp_path):
    train(synth_cache, tmp_path / "xyz", tiny_config(epochs=1, data=replace(FAST, input_features="xyz")), progress=False)
    checkpoint = load_checkpoint(tmp_path / "xyz" / "last.pt")
    assert checkpoint["model_config"]["in_channels"] == 3
    assert checkpoint["model"]["backbone.conv_input.0.weight"].shape[-1] == 3


def test_checkpoint_holds_what_rebuilds_the_run(synth_cache, tmp_path):
    train(synth_cache, tmp_path / "run", tiny_config(epochs=1, validate=True, val_split=None), val_cache=synth_cache,
          progress=False)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["teacher"]["teacher"] == "efficientnet_lite0" and checkpoint["teacher"]["feature_dim"] == 472
    assert len(checkpoint["class_names"]) == 20 and checkpoint["train_config"]["max_lr"] == 0.005
    assert {"optimizer", "scheduler", "scaler"} <= set(checkpoint)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "best.pt").exists()


def test_trainer_refuses_a_cache_of_another_teacher_dimension(synth_cache, tmp_path):
    train(synth_cache, tmp_path / "run", tiny_config(epochs=1), progress=False)
    other = tmp_path / "other.zarr"
    provenance = {**FeatureCache(synth_cache).provenance, "feature_dim": 384, "teacher": "dinov2_vits14"}
    cache_module.open_for_writing(other, provenance)
    scene = FeatureCache(synth_cache).read("scene0000_00")
    from tttkd.pipeline.scene import Scene

    cache_module.write_scene(other, Scene("scene0000_00", scene.coord, scene.color, scene.normal.astype(np.float32),
                                          scene.label), seen_index=scene.seen_index,
                             feature=np.zeros((len(scene.seen_index), 384)), view_count=scene.view_count, attrs={})
    with pytest.raises(TeacherMismatchError, match="feature_dim=384|teacher='dinov2_vits14'"):
        train(other, tmp_path / "run", tiny_config(epochs=2), progress=False, resume=True)


def test_cli_train_then_eval_with_ply_export(synth_cache, tmp_path):
    runner = CliRunner()
    run = tmp_path / "cli"
    result = runner.invoke(app, ["train", "--cache", str(synth_cache), "--out", str(run), "--epochs", "1",
                                 "--batch-size", "3", "--model", "small", "--voxel", "0.1", "--workers", "0",
                                 "--device", "cpu", "--split", "all", "--val-split", "none"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "--checkpoint", str(run / "last.pt"), "--cache", str(synth_cache),
                                 "--export-ply", str(tmp_path / "ply"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and len(list((tmp_path / "ply").glob("*.ply"))) == 3
    record = json.loads((run / "eval-synth_a.zarr.json").read_text())
    assert 0 <= record["miou"] <= 1 and len(record["confusion"]) == 20
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--cache", str(synth_cache)])
    assert result.exit_code == 1 and "missing.pt: no checkpoint here" in result.output


def test_a_split_the_cache_lacks_is_an_error_not_every_scene(synth_cache, tmp_path):
    """The old fallback trained on every scene, val scenes included, when the split was missing."""
    cache = FeatureCache(synth_cache)
    with pytest.raises(ValueError, match=r"synth_a.zarr: no complete scenes of split 'train' \(it has 3 scenes of "
                                         r"no split\); pass --split .*--split all"):
        split_scene_ids(cache, "train")
    assert split_scene_ids(cache, None) == ["scene0000_00", "scene0001_00", "scene0002_00"]
    with pytest.raises(ValueError, match="no complete scenes of split 'train'"):
        train(synth_cache, tmp_path / "run", tiny_config(split="train"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_missing_val_split_is_an_error_not_every_scene(synth_cache, tmp_path):
    """best.pt must never be chosen on scenes nobody asked to validate on."""
    with pytest.raises(ValueError, match="split 'val'.*--val-split all .*--val-split none to skip validation"):
        train(synth_cache, tmp_path / "run", tiny_config(validate=True), progress=False)
    with pytest.raises(ValueError, match="split 'val'"):  # a val cache falls back to all its scenes no more
        train(synth_cache, tmp_path / "run", tiny_config(validate=True), val_cache=synth_cache, progress=False)
    with pytest.raises(ValueError, match="never read without validation"):
        train(synth_cache, tmp_path / "run", tiny_config(), val_cache=synth_cache, progress=False)


def test_cli_train_without_split_on_a_cache_of_no_split_is_one_line_error(synth_cache, tmp_path):
    result = CliRunner().invoke(app, ["train", "--cache", str(synth_cache), "--out", str(tmp_path / "run"), "--epochs",
                                      "1", "--model", "small", "--voxel", "0.1", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().count("\n") == 0 and "split 'train'" in result.output and "--split all" in result.output


class ConstantModel(torch.nn.Module):
    """Predicts class `predicted` of `num_classes` at every voxel: IoUs follow from the labels alone."""

    def __init__(self, num_classes: int, predicted: int):
        super().__init__()
        self.num_classes, self.predicted = num_classes, predicted

    def forward_features(self, voxels):
        return voxels.features

    def seg_head(self, features):
        logits = torch.zeros(len(features), self.num_classes)
        logits[:, self.predicted] = 1.0
        return logits


@pytest.mark.parametrize("source", ["s3dis", "matterport"])
def test_evaluate_scores_a_model_of_another_dataset_on_the_shared_classes(synth_cache, source):
    """An s3dis model (13 classes) on a scannet cache crashed (label ids past 13); a matterport one
    (21) was scored on matterport's class list. Both must be scored on the shared classes."""
    from tttkd.pipeline.manifests import load_classes, shared_classes

    source_names = load_classes(source)["names"]
    shared = shared_classes(source, "scannet")
    ids = ["scene0000_00", "scene0001_00", "scene0002_00"]
    result = evaluate(ConstantModel(len(source_names), source_names.index("chair")), synth_cache, ids,
                      data_config=FAST, class_names=source_names, source_dataset=source, device="cpu")
    target_names = FeatureCache(synth_cache).provenance["class_names"]
    assert list(result.iou) == [t for _, t in shared] and result.confusion.shape == (len(shared), len(shared) + 1)
    # by hand: every point with a shared class is predicted chair
    label = np.concatenate([FeatureCache(synth_cache).read(s).label for s in ids])
    counts = {t: int((label == target_names.index(t)).sum()) for _, t in shared}
    assert counts["chair"] > 0 and counts["wall"] > 0
    assert result.iou["chair"] == pytest.approx(counts["chair"] / sum(counts.values()))
    for name, count in counts.items():
        if name != "chair":
            assert result.iou[name] == 0.0 if count else np.isnan(result.iou[name]), name
    expected = [result.iou["chair"]] + [0.0] * sum(1 for n, c in counts.items() if c and n != "chair")
    assert result.miou == pytest.approx(np.mean(expected))


def test_evaluate_refuses_a_class_list_it_cannot_map(synth_cache):
    from tttkd.pipeline.manifests import load_classes

    names = load_classes("s3dis")["names"]
    with pytest.raises(ValueError, match="synth_a.zarr: the cache's 20 scannet classes differ from the model's 13"):
        evaluate(ConstantModel(len(names), 0), synth_cache, ["scene0000_00"], data_config=FAST, class_names=names,
                 device="cpu")


def test_cli_eval_of_an_s3dis_checkpoint_on_a_scannet_cache_scores_the_shared_classes(synth_cache, tmp_path):
    from dataclasses import asdict

    from tttkd.pipeline.manifests import load_classes, shared_classes

    names = load_classes("s3dis")["names"]
    config = model_config("small", num_classes=len(names), kd_dim=None)
    checkpoint = {"model": build_model(config).state_dict(), "model_config": asdict(config),
                  "train_config": asdict(tiny_config()), "class_names": names, "dataset": "s3dis"}
    torch.save(checkpoint, tmp_path / "s3dis.pt")
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "s3dis.pt"), "--cache", str(synth_cache),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "the 8 classes s3dis and scannet share" in result.output
    record = json.loads((tmp_path / "eval-synth_a.zarr.json").read_text())
    assert list(record["iou"]) == [t for _, t in shared_classes("s3dis", "scannet")]
    assert "bookshelf" in record["iou"] and "ceiling" not in record["iou"] and len(record["confusion"][0]) == 9


class Payload:
    """Unpickling this would run code: it writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from tttkd.checkpoint import load_checkpoint
    from tttkd.cli.main import app

    marker, evil = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload(marker)}, evil)
    with pytest.raises(ValueError, match="evil.pt: refused to load: it holds the Python object io.open"):
        load_checkpoint(evil)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(evil), "--cache", str(tmp_path)])
    assert result.exit_code == 1 and "refused to load" in result.output
    assert not marker.exists()  # nothing ran


def test_a_checkpoint_of_another_trainer_or_backbone_is_one_clear_error(tmp_path):
    from tttkd.checkpoint import model_from_checkpoint

    with pytest.raises(ValueError, match="not a tttkd checkpoint: no model_config or model entry"):
        model_from_checkpoint({"state_dict": {}, "epoch": 3}, device="cpu")  # Pointcept's layout
    small = build_model(model_config("small", kd_dim=8, num_classes=5))
    from dataclasses import asdict

    wider = asdict(model_config("small", kd_dim=8, num_classes=5, stem_channels=32))
    with pytest.raises(ValueError, match="weights do not fit the network"):
        model_from_checkpoint({"model_config": wider, "model": small.state_dict()}, device="cpu")
    with pytest.raises(ValueError, match="not a tttkd ModelConfig"):
        model_from_checkpoint({"model_config": {**wider, "heads": 3}, "model": small.state_dict()}, device="cpu")


@pytest.mark.parametrize("minutes, written", [(0, [0, 1, 2]), (60, [2])])
def test_last_checkpoint_is_written_when_due_and_after_the_last_epoch(synth_cache, tmp_path, monkeypatch, minutes,
                                                                       written):
    """A checkpoint with its optimiser is ~300 MB for MinkUNet34C: written after an epoch only once
    `checkpoint_minutes` have passed (0: every epoch), and always after the last one."""
    import tttkd.train as train_module

    saved = []
    real_save = torch.save
    monkeypatch.setattr(train_module.torch, "save", lambda obj, path: (
        saved.append((Path(path).name.removesuffix(".tmp"), obj["epoch"])), real_save(obj, path)))
    train(synth_cache, tmp_path / "run", tiny_config(epochs=3, checkpoint_minutes=minutes), progress=False)
    assert saved == [("last.pt", e) for e in written]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["curves.png", "last.pt", "metrics.jsonl"]
