"""Joint training (paper §3.2, appendix C.1): segmentation + cosine distillation of cached teacher
features, read from a feature cache only.

One loop, nanoGPT-style: schedule, batch, forward, loss, backward, step, log; then per epoch
evaluate and checkpoint. Outputs in `out`: last.pt / best.pt, metrics.jsonl, curves.png.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tttkd.pipeline.cache import FeatureCache

from . import distributed
from .checkpoint import check_classes, check_teacher, load_checkpoint, teacher_of
from .data import CacheDataset, DataConfig, batches_per_epoch, in_channels, kd_basis, make_epoch_loader
from .evaluate import evaluate
from .loss import kd_loss, segmentation_loss
from .model import build_model, model_config, sparse_input


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 8
    max_lr: float = 0.005
    """AdamW with OneCycleLR (appendix C.1): max lr 0.005, div_factor 10, final_div_factor 1000."""
    div_factor: float = 10.0
    final_div_factor: float = 1000.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.2
    kd_weight: float = 1.0
    use_kd: bool = True
    """False trains the Source-Only model: no kd_head, no KD loss."""
    model: str = "minkunet34c"
    bn_momentum: float = 0.01
    """Backbone BN running-statistics momentum (Pointcept: 0.01); raise it for runs of few steps,
    whose running statistics would otherwise stay near their initial values."""
    split: str | None = "train"
    """Scenes of the cache to train on; None: every complete scene. A split the cache lacks is an
    error, never a fallback to every scene (which would train on its val scenes)."""
    val_split: str | None = "val"
    """Scenes evaluated after each epoch (of `val_cache` if given, else of the training cache) to
    choose best.pt; None: every complete scene. A split the cache lacks is an error."""
    validate: bool = True
    """False: no evaluation after each epoch and no best.pt (`val_split` is not read)."""
    seed: int = 0
    workers: int = 2
    amp: bool = True
    """fp16 autocast with loss scaling on CUDA (ignored on CPU)."""
    log_every: int = 10
    ddp_batch_norm: str = "global"
    """With several processes: `global` (exact: N processes compute the step one process would on the
    global batch), `fused` (the same statistics with torch.nn.SyncBatchNorm's CUDA kernels) or
    `local` (each process's own batch); see distributed.BATCH_NORM_MODES."""
    checkpoint_minutes: float = 5.0
    """last.pt is written after an epoch once this many minutes have passed since the last write, and
    always after the last epoch (0: after every epoch). A MinkUNet34C checkpoint with its optimiser
    is ~300 MB: on a small cache, writing it every epoch cost more than the steps. `--resume` goes on
    from the last written epoch, exactly."""
    memory_mb: float = 2048
    """Per loader worker: decoded scenes (points and whole feature arrays) kept in memory up to this
    size, so a split that fits is read from disk once per worker (0: read every sample from disk)."""
    reference_input: bool = False
    """The original input path (no scene memory, the per-corner elastic loop, float32 KD targets):
    the same samples, slower; for `tttkd bench train`'s comparison."""
    data: DataConfig = field(default_factory=DataConfig)


def split_scene_ids(cache: FeatureCache, split: str | None, *, option: str = "--split",
                    alternatives: str = "") -> list[str]:
    """Complete scenes of `split`, or every complete scene for None. Raises ValueError when there
    are none: a cache extracted with --scenes and no --split has scenes of no split, and falling
    back to all of them could train on (or choose best.pt by) val scenes. The error message tells
    the user to change the CLI option `option`, or do one of `alternatives`."""
    scene_ids = cache.scene_ids(split=split)
    if scene_ids:
        return scene_ids
    counts = cache.split_counts()
    has = ", ".join(f"{n} scenes of {'no split' if s is None else f'split {s!r}'}"
                    for s, n in sorted(counts.items(), key=lambda item: str(item[0]))) or "no complete scenes"
    if split is None:
        raise ValueError(f"{cache.path}: no complete scenes; run `tttkd-prep extract` first")
    raise ValueError(f"{cache.path}: no complete scenes of split {split!r} (it has {has}); pass {option} with "
                     f"one of its splits, {option} all for every complete scene{alternatives}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, total_steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.max_lr, total_steps=max(1, total_steps), div_factor=config.div_factor,
        final_div_factor=config.final_div_factor)
    return optimizer, scheduler


def batch_losses(model, batch, config: TrainConfig, basis: torch.Tensor | None = None,
                 share: torch.Tensor | None = None):
    """Forward one batch -> (total loss, seg loss, kd loss or None). `share` (data-parallel
    training: `distributed.global_share` of the labelled-voxel and KD-target counts) weights each
    mean so that the processes' averaged gradients are those of the global batch's means."""
    voxels = sparse_input(batch.grid_coord, batch.batch_index, batch.features, batch.num_scenes)
    logits, kd_prediction = model(voxels)
    loss_seg = segmentation_loss(logits, batch.label, label_smoothing=config.label_smoothing)
    seg_weight, kd_weight = (1.0, config.kd_weight) if share is None else (share[0], config.kd_weight * share[1])
    if kd_prediction is None:
        return loss_seg * seg_weight, loss_seg, None
    loss_kd = kd_loss(kd_prediction[batch.kd_voxel], batch.kd_target, basis)  # basis: a pca-int8 cache's (D, K)
    return loss_seg * seg_weight + kd_weight * loss_kd, loss_seg, loss_kd


def save_atomic(checkpoint: dict, path: Path) -> None:
    """torch.save to a temporary file, then a rename: a run killed mid-write leaves the previous
    checkpoint whole (a MinkUNet34C checkpoint with its optimiser is ~300 MB)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def train(cache_path: Path, out: Path, config: TrainConfig, *, val_cache: Path | None = None,
          device: str = "cpu", resume: bool = False, progress: bool = True) -> dict:
    """Train on the `config.split` scenes of `cache_path`; after each epoch evaluate the
    `config.val_split` scenes of `val_cache` (default: `cache_path`) unless `config.validate` is False.

    In a process group (`distributed`) each process trains on its part of every global batch of
    `config.batch_size` scenes; process 0 alone validates and writes checkpoints and logs."""
    from rich.progress import Progress

    out = Path(out)
    device = torch.device(device)
    rank, world_size = distributed.rank_and_size()
    progress = progress and rank == 0
    if config.ddp_batch_norm not in distributed.BATCH_NORM_MODES:
        raise ValueError(f"unknown ddp_batch_norm {config.ddp_batch_norm!r}; choose from "
                         f"{', '.join(distributed.BATCH_NORM_MODES)}")
    if config.ddp_batch_norm == "fused" and world_size > 1 and device.type != "cuda":
        raise ValueError("--ddp-batch-norm fused runs torch's SyncBatchNorm, which needs CUDA; use global on "
                         f"{device.type}")
    cache = FeatureCache(cache_path)
    provenance = cache.provenance
    class_names = provenance["class_names"]
    scene_ids = split_scene_ids(cache, config.split)
    val_ids = []
    if val_cache and not config.validate:
        raise ValueError(f"{val_cache}: a validation cache is never read without validation; "
                         "drop --val-cache or --val-split none")
    if config.validate:
        val_cache = val_cache or cache_path
        val_ids = split_scene_ids(FeatureCache(val_cache), config.val_split, option="--val-split",
                                  alternatives=", --val-cache with another cache, or --val-split none to skip validation")
        val_names = FeatureCache(val_cache).provenance["class_names"]
        if val_names != class_names:
            raise ValueError(f"{val_cache}: its {len(val_names)} classes differ from the {len(class_names)} of "
                             f"{cache_path}; validate on a cache of the same dataset, or pass --val-split none")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    seed_everything(config.seed)
    mconfig = model_config(config.model, in_channels=in_channels(config.data.input_features),
                           num_classes=len(class_names), kd_dim=provenance["feature_dim"] if config.use_kd else None,
                           bn_momentum=config.bn_momentum)
    model = build_model(mconfig, device=device)
    basis = kd_basis(cache, device)
    if world_size > 1:
        model = distributed.convert_batch_norm(model, config.ddp_batch_norm)
    dataset = CacheDataset(cache_path, scene_ids, config.data, train=True, seed=config.seed,
                           memory_mb=config.memory_mb, reference=config.reference_input)
    steps_per_epoch = batches_per_epoch(len(dataset), config.batch_size, world_size=world_size)
    optimizer, scheduler = make_optimizer(model, config, config.epochs * steps_per_epoch)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step, best, history = 0, 0, -1.0, []
    if resume and (out / "last.pt").exists():
        checkpoint = load_checkpoint(out / "last.pt")
        check_teacher(checkpoint["teacher"], provenance, cache_path=cache_path)
        check_classes(checkpoint["class_names"], provenance, cache_path=cache_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step, best, history = (checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["best_miou"],
                                            checkpoint["history"])
    net = model  # what is evaluated and saved; `model` is what trains (DDP-wrapped in a process group)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # GlobalBatchNorm keeps the running statistics equal everywhere
    log = None
    if rank == 0:  # the resumed checkpoint's history, then this run's: epochs after last.pt are not repeated
        log = open(out / "metrics.jsonl", "w")
        log.writelines(json.dumps(record) + "\n" for record in history)
    # one loader for the remaining epochs: its workers prefetch the next epoch while this one ends
    loader, _ = make_epoch_loader(dataset, batch_size=config.batch_size, shuffle=True, workers=config.workers,
                                  seed=config.seed, epochs=range(start_epoch, config.epochs), rank=rank,
                                  world_size=world_size)
    batches = iter(loader)
    saved, shown = time.monotonic(), float("nan")

    with Progress(disable=not progress) as bar:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch)
            for _ in range(steps_per_epoch):
                # batch
                batch = next(batches).to(device)
                # forward + loss
                share = None
                if world_size > 1:  # this process's share of the global batch's labelled voxels and KD targets
                    # the KD count filled on the device: torch.tensor(n, device=cuda) copies from pageable
                    # memory, which waits for the GPU at every step
                    share = distributed.global_share(torch.stack([(batch.label >= 0).sum(), batch.label.new_full(
                        (), len(batch.kd_voxel))]))
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    loss, loss_seg, loss_kd = batch_losses(model, batch, config, basis, share)
                # backward + step (the OneCycle schedule advances once per batch)
                lr = scheduler.get_last_lr()[0]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                # log (.item() syncs with the GPU: only every log_every steps; process 0's losses)
                if rank == 0 and (step % config.log_every == 0 or step == 1):
                    record = {"epoch": epoch, "step": step, "lr": lr, "loss": loss.item(),
                              "loss_seg": loss_seg.item(), "loss_kd": None if loss_kd is None else loss_kd.item(),
                              "time": time.time()}
                    history.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    shown = record["loss"]
                if progress:  # the loss only where it was logged: .item() would sync every step
                    bar.update(task, advance=1, description=f"epoch {epoch + 1}/{config.epochs} loss "
                                                           f"{shown:.3f}")
            if rank != 0:
                continue
            # evaluate
            miou = None
            if val_ids:
                result = evaluate(net, val_cache, val_ids, data_config=config.data, class_names=class_names,
                                  device=device)
                miou = result.miou
                record = {"epoch": epoch, "step": step, "val_miou": miou}
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
            # checkpoint
            improved = miou is not None and miou > best
            # last.pt whenever best.pt is written too: a resumed run then never forgets a better best.pt
            due = (time.monotonic() - saved >= 60 * config.checkpoint_minutes or epoch == config.epochs - 1
                   or improved)
            if not due:
                continue
            checkpoint = {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "history": history,
                "model_config": asdict(mconfig), "train_config": asdict(config), "class_names": list(class_names),
                "teacher": teacher_of(provenance), "dataset": provenance.get("dataset"), "best_miou": max(best, miou if miou is not None else -1.0),
            }
            save_atomic(checkpoint, out / "last.pt")
            saved = time.monotonic()
            if improved:
                best = miou
                save_atomic(checkpoint, out / "best.pt")
    if rank != 0:
        return {"out": str(out), "epochs": config.epochs, "steps": step, "best_val_miou": None, "final_loss": None}
    log.close()
    plot_curves(history, out / "curves.png")
    return {"out": str(out), "epochs": config.epochs, "steps": step, "best_val_miou": best if best >= 0 else None,
            "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None)}


def plot_curves(history: list[dict], path: Path) -> None:
    """Training losses against steps and validation mIoU against epochs, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h for h in history if "loss" in h]
    if steps:
        left.plot([h["step"] for h in steps], [h["loss_seg"] for h in steps], label="segmentation (CE)")
        kd = [h for h in steps if h["loss_kd"] is not None]
        if kd:
            left.plot([h["step"] for h in kd], [h["loss_kd"] for h in kd], label="KD (-cos)")
    left.set_xlabel("step"), left.set_title("training loss"), left.legend()
    val = [h for h in history if "val_miou" in h]
    right.plot([h["epoch"] + 1 for h in val], [h["val_miou"] for h in val], marker="o")
    right.set_xlabel("epoch"), right.set_title("validation mIoU"), right.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
