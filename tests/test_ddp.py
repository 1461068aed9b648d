"""Data-parallel training and scene-parallel adaptation on CPU processes (gloo): N processes must
compute what one process computes on the same global batch / the same scenes."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tttkd import distributed
from tttkd.augment import AugmentConfig
from tttkd.checkpoint import load_checkpoint
from tttkd.data import DataConfig, EpochSampler, ShardedBatchSampler
from tttkd.train import TrainConfig, train

SCENES = ["scene0000_00", "scene0001_00", "scene0002_00"]


@pytest.mark.parametrize("size,batch,world", [(10, 4, 2), (10, 4, 3), (7, 3, 2), (3, 3, 2)])
def test_sharded_batches_split_each_global_batch_of_one_process(size, batch, world):
    sampler = EpochSampler(size, shuffle=True, seed=4)
    sampler.set_epoch(2)
    items = list(sampler)
    single = [items[i:i + batch] for i in range(0, size, batch)]
    shards = [list(ShardedBatchSampler(sampler, batch, rank=r, world_size=world)) for r in range(world)]
    kept = [b for b in single if len(b) >= world]  # a last batch smaller than the world is dropped
    assert all(len(s) == len(kept) == len(ShardedBatchSampler(sampler, batch, rank=0, world_size=world)) for s in shards)
    for step, global_batch in enumerate(kept):
        parts = [shards[r][step] for r in range(world)]
        assert sum(parts, []) == global_batch  # contiguous, in order, nothing lost or repeated
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="cannot be split over 3 processes; pass --batch-size 3 or more"):
        ShardedBatchSampler(sampler, 2, rank=0, world_size=3)


def _config(**fields):
    # Mix3D, crops and elastic on: the samples differ in size, so the processes' shares are unequal
    data = DataConfig(voxel_size_m=0.1, kd_points=128, augment=replace(AugmentConfig(), mix3d_p=0.5))
    return TrainConfig(**{**dict(epochs=1, batch_size=3, model="small", workers=0, log_every=1, data=data,
                                 split=None, validate=False, bn_momentum=0.1, memory_mb=64), **fields})


def _first_step_gradients(cache, dtype=torch.float32):
    """{parameter: gradient} of the first global batch (3 scenes) as `train` computes it, in this
    process (one process) or averaged over the group by DDP (several)."""
    from tttkd.data import CacheDataset, in_channels, make_loader
    from tttkd.model import build_model, model_config
    from tttkd.train import batch_losses, seed_everything

    rank, world = distributed.rank_and_size()
    config = _config()
    seed_everything(0)
    model = build_model(model_config("small", in_channels=in_channels("color_normal"), num_classes=20, kd_dim=472,
                                     bn_momentum=0.1)).to(dtype)
    share = None
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(distributed.convert_batch_norm(model), broadcast_buffers=False)
    loader, sampler = make_loader(CacheDataset(cache, SCENES, config.data, train=True, memory_mb=64), batch_size=3,
                                  shuffle=True, workers=0, seed=0, rank=rank, world_size=world)
    sampler.set_epoch(0)
    batch = next(iter(loader))
    batch.features, batch.kd_target = batch.features.to(dtype), batch.kd_target.to(dtype)
    if world > 1:
        share = distributed.global_share(torch.stack([(batch.label >= 0).sum(), torch.tensor(len(batch.kd_voxel))]))
    loss, _, _ = batch_losses(model, batch, config, None, share)
    loss.backward()
    return {name.removeprefix("module."): p.grad.clone() for name, p in model.named_parameters()}, len(batch.grid_coord)


def _two_process_run(cache, out, device):
    train(cache, out / "two", _config(), device=device, progress=False)
    gradients, voxels = _first_step_gradients(cache)
    torch.save({"gradients": gradients, "voxels": voxels},
               out / f"gradients{distributed.rank_and_size()[0]}.pt")


def test_two_processes_train_like_one_on_the_same_global_batch(synth_cache, tmp_path):
    """Global batch 3 over 2 processes (2 + 1 scenes of different sizes): global batch norm and
    count-weighted losses make DDP's averaged gradients those of one process on the whole batch,
    and `train` in 2 processes writes what it writes in one."""
    distributed.launch(2, _two_process_run, synth_cache, tmp_path, device="cpu")
    train(synth_cache, tmp_path / "one", _config(), device="cpu", progress=False)
    # float64 is the reference: through 30 batch norms the float32 gradient of one process is itself
    # ~1e-3 (relative to the largest entry) from it, and the processes' must be no further
    single, voxels = _first_step_gradients(synth_cache)
    expected, _ = _first_step_gradients(synth_cache, torch.float64)
    parts = [torch.load(tmp_path / f"gradients{r}.pt", weights_only=True) for r in range(2)]
    assert parts[0]["voxels"] + parts[1]["voxels"] == voxels and min(p["voxels"] for p in parts) > 0
    for name, g in expected.items():
        scale = g.abs().max().item()
        error_one = (single[name].double() - g).abs().max().item() / scale
        for part in parts:  # DDP leaves the same averaged gradient in every process
            error_two = (part["gradients"][name].double() - g).abs().max().item() / scale
            assert error_two <= 1.5 * error_one + 1e-5, (name, error_two, error_one)
    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["step"] == two["step"] == 1 and set(one["model"]) == set(two["model"])
    for key, a in one["model"].items():
        b = two["model"][key]
        if "running" in key:  # forward statistics of the global batch
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=key)
        elif a.is_floating_point():
            # AdamW's first step moves each weight by about lr * sign(gradient): equal signs, equal weights
            close = torch.isclose(b, a, rtol=0, atol=1e-6).float().mean().item()
            assert close > 0.99, (key, close)
    assert (tmp_path / "two" / "metrics.jsonl").exists() and not (tmp_path / "two" / "best.pt").exists()


def _share_and_norm(out, device, mode="global"):
    """Process-side check of the DDP batch norm and global_share: writes this rank's tensors."""
    rank, world = distributed.rank_and_size()
    torch.manual_seed(0)
    x = torch.randn(7 + 5, 4, dtype=torch.float64).float() * 3 + 1  # the global batch: 7 rows on rank 0, 5 on 1
    mine = (x[:7] if rank == 0 else x[7:]).clone().to(device).requires_grad_(True)
    bn = distributed.convert_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm1d(4, momentum=0.5)), mode).to(device)
    y = bn(mine)
    share = distributed.global_share(torch.tensor([len(mine)], device=device))
    # each process's loss: its share of a mean over the global batch
    (y.pow(3).mean() * share[0]).backward()
    torch.save({"grad": mine.grad.cpu(), "y": y.detach().cpu(), "weight_grad": bn[0].weight.grad.cpu() / world,
                "running_var": bn[0].running_var.cpu(), "kind": type(bn[0]).__name__}, out / f"rank{rank}.pt")


def check_batch_norm_over_the_concatenated_batch(tmp_path, *, device="cpu", mode="global"):
    """Two processes (7 and 5 rows) against one nn.BatchNorm1d over all 12 rows: outputs, input and
    weight gradients, running variance. Also run by the two-GPU test of `fused`."""
    distributed.launch(2, _share_and_norm, tmp_path, device=device, mode=mode)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    x = (torch.randn(12, 4, dtype=torch.float64).float() * 3 + 1).requires_grad_(True)
    bn = torch.nn.BatchNorm1d(4, momentum=0.5)
    y = bn(x)
    y.pow(3).mean().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-5, atol=1e-5)
    # each process's input gradient is that of the sum of all processes' losses: the world size
    # times the global mean's (DDP divides the weight gradients by it)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]) / 2, x.grad, rtol=1e-4, atol=1e-6)
    # DDP would average the weight gradients of the two processes (each divided by 2 above)
    torch.testing.assert_close(parts[0]["weight_grad"] + parts[1]["weight_grad"], bn.weight.grad, rtol=1e-4, atol=1e-6)
    for p in parts:
        torch.testing.assert_close(p["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
    return parts


def test_global_batch_norm_and_shares_equal_batch_norm_over_the_concatenated_batch(tmp_path):
    parts = check_batch_norm_over_the_concatenated_batch(tmp_path)
    assert {p["kind"] for p in parts} == {"GlobalBatchNorm"}


def test_local_batch_norm_normalises_each_process_own_rows(tmp_path):
    """`local`: plain DDP, each process's statistics (so not the global batch's)."""
    distributed.launch(2, _share_and_norm, tmp_path, device="cpu", mode="local")
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64).float() * 3 + 1
    for part, rows in zip(parts, (x[:7], x[7:])):
        assert part["kind"] == "BatchNorm1d"
        torch.testing.assert_close(part["y"], torch.nn.BatchNorm1d(4)(rows).detach(), rtol=1e-5, atol=1e-5)


def test_ddp_batch_norm_choices_are_checked(synth_cache, tmp_path):
    with pytest.raises(ValueError, match="unknown ddp_batch_norm 'sync'"):
        train(synth_cache, tmp_path / "a", _config(ddp_batch_norm="sync"), progress=False)
    with pytest.raises(ValueError, match="fused"):
        distributed.launch(2, train, synth_cache, tmp_path / "b", _config(ddp_batch_norm="fused"), device="cpu",
                           progress=False)


def test_adapt_over_two_processes_equals_one(synth_cache, joint_checkpoint, tmp_path):
    """Offline TTT-KD spread over 2 CPU processes: the same confusion matrices, per-scene mIoU (in
    scene order) and KD-loss curve as one process."""
    from tttkd.adapt import AdaptConfig
    from tttkd.experiment import run_method

    config = AdaptConfig(steps=2, lr=0.1, rotations=1, kd_points=256)
    kwargs = dict(config=config, device="cpu", classes=None)
    one = run_method("TTT-KD", "ttt-kd", joint_checkpoint, synth_cache, SCENES, **kwargs)
    two = run_method("TTT-KD", "ttt-kd", joint_checkpoint, synth_cache, SCENES, gpus=2, **kwargs)
    assert list(two.per_scene_miou) == SCENES
    assert two.confusion_by_step == {int(k): v for k, v in one.confusion_by_step.items()}
    assert two.per_scene_miou == pytest.approx(one.per_scene_miou, nan_ok=True)
    assert two.miou == one.miou and two.iou == pytest.approx(one.iou, nan_ok=True)
    assert two.miou_by_step == one.miou_by_step and two.updates == one.updates == 3 * 2
    assert two.kd_loss_by_step == pytest.approx(one.kd_loss_by_step)
