"""`tttkd train` and `tttkd eval`: joint training from a feature cache, and evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import CacheOpt, DeviceOpt, fail

console = Console()

# outdoor: xMUDA's 3D network on xyz only, 5 cm voxels (xMUDA's scale 20; paper §4.2 "only 3D coordinates"),
# with xMUDA's LiDAR augmentation (augment.OUTDOOR_AUGMENTATION)
TRAIN_PRESETS = {"outdoor": dict(model="scn_unet", input_features="xyz", voxel=0.05)}


def train(
    ctx: typer.Context,
    cache: CacheOpt,
    out: Annotated[Path, typer.Option(help="run folder: checkpoints, metrics.jsonl, curves.png")] = Path("runs/scannet"),
    val_cache: Annotated[Optional[Path], typer.Option(help="cache whose --val-split scenes are evaluated after every epoch (default: CACHE)")] = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 100,
    batch_size: Annotated[int, typer.Option(help="scenes per batch")] = 8,
    voxel: Annotated[float, typer.Option(help="voxel size in metres (paper: 0.04)")] = 0.04,
    input_features: Annotated[str, typer.Option(help="color_normal (6 channels, indoors) or xyz (LiDAR)")] = "color_normal",
    no_kd: Annotated[bool, typer.Option("--no-kd", help="Source-Only: no kd_head, no KD loss")] = False,
    model: Annotated[str, typer.Option(help="minkunet34c (paper, indoors), scn_unet (xMUDA / MM-TTA's U-Net, outdoors: "
                                            "paper §4.2) or small (CPU)")] = "minkunet34c",
    preset: Annotated[Optional[str], typer.Option(help="outdoor: --model scn_unet --input-features xyz --voxel 0.05 "
                                                      "and xMUDA's LiDAR augmentation (no elastic, crop, colour "
                                                      "or Mix3D): paper §4.2; explicit options win")] = None,
    split: Annotated[str, typer.Option(
        help="split of the cache to train on, or all (every complete scene); a split the cache lacks is an error")] = "train",
    val_split: Annotated[str, typer.Option(
        help="split of the val cache (default CACHE) evaluated after every epoch to choose best.pt, all (every "
             "complete scene), or none (no evaluation, no best.pt); a split the cache lacks is an error")] = "val",
    bn_momentum: Annotated[float, typer.Option(help="BN running-stat momentum (0.01; raise for short runs)")] = 0.01,
    lr: Annotated[float, typer.Option(help="OneCycle max learning rate (paper: 0.005)")] = 0.005,
    workers: Annotated[int, typer.Option(help="data-loading worker processes")] = 2,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue from OUT/last.pt")] = False,
    gpus: Annotated[int, typer.Option(help="data-parallel processes, one per GPU (CPU processes with --device cpu); "
                                           "--batch-size stays the global batch. Or launch with torchrun")] = 1,
    memory_mb: Annotated[float, typer.Option(help="per loader worker: MB of decoded scenes kept in memory")] = 2048,
    ddp_batch_norm: Annotated[str, typer.Option(
        help="batch norm over several processes: global (the global batch's statistics, exact), fused (the same "
             "with torch's SyncBatchNorm, CUDA only) or local (each process's own batch)")] = "global",
    checkpoint_minutes: Annotated[float, typer.Option(
        help="write last.pt after an epoch once this many minutes have passed since the last write, and after the "
             "last epoch (0: every epoch); --resume goes on from the last one written")] = 5.0,
    device: DeviceOpt = None,
):
    """Train the 3D network jointly on segmentation and on distilling the cached teacher features."""

    from tttkd import distributed
    from tttkd.augment import OUTDOOR_AUGMENTATION, AugmentConfig
    from tttkd.data import DataConfig
    from tttkd.pipeline.job import default_device
    from tttkd.train import TrainConfig, train as run

    if ddp_batch_norm not in distributed.BATCH_NORM_MODES:
        fail(f"unknown --ddp-batch-norm {ddp_batch_norm!r}; choose one of {', '.join(distributed.BATCH_NORM_MODES)}")
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            fail(f"unknown preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
        chosen = {name: (value if ctx.get_parameter_source(name).name != "DEFAULT" else TRAIN_PRESETS[preset][name])
                  for name, value in (("model", model), ("input_features", input_features), ("voxel", voxel))}
        model, input_features, voxel = chosen["model"], chosen["input_features"], chosen["voxel"]
    config = TrainConfig(epochs=epochs, batch_size=batch_size, max_lr=lr, use_kd=not no_kd, model=model,
                         split=None if split == "all" else split, validate=val_split != "none",
                         val_split=None if val_split in ("all", "none") else val_split,
                         bn_momentum=bn_momentum, seed=seed, workers=workers, memory_mb=memory_mb,
                         checkpoint_minutes=checkpoint_minutes, ddp_batch_norm=ddp_batch_norm,
                         data=replace(DataConfig(), voxel_size_m=voxel, input_features=input_features,
                                      augment=OUTDOOR_AUGMENTATION if preset == "outdoor" else AugmentConfig()))
    device = device or default_device()
    if gpus > 1:  # spawn one process per GPU; process 0 writes the outputs
        try:
            distributed.launch(gpus, run, cache, out, config, val_cache=val_cache, device=device, resume=resume)
        except (OSError, ValueError) as e:
            fail(str(e))
        console.print(f"trained on {gpus} processes; outputs in {out} (last.pt, best.pt, metrics.jsonl, curves.png)")
        return
    rank, _, device = distributed.init_from_env(device)  # under torchrun: join its process group
    try:
        summary = run(cache, out, config, val_cache=val_cache, device=device, resume=resume)
    except (OSError, ValueError) as e:
        fail(str(e))
    finally:
        distributed.finish()
    if rank != 0:
        return
    console.print(f"trained {summary['steps']} steps; best val mIoU {summary['best_val_miou']}; "
                  f"outputs in {out} (last.pt, best.pt, metrics.jsonl, curves.png)")


def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint (last.pt / best.pt)")],
    cache: CacheOpt,
    export_ply: Annotated[Optional[Path], typer.Option(help="write one PLY per scene coloured by class")] = None,
    split: Annotated[Optional[str], typer.Option(
        help="only the scenes of this split, or all (default: every complete scene); a split the cache lacks is an error")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON result (default: next to the checkpoint)")] = None,
    device: DeviceOpt = None,
):
    """mIoU and per-class IoU of a checkpoint on every complete scene of a cache. A checkpoint of
    another dataset than the cache's is scored on the classes both share (named as the cache names them)."""

    from tttkd.checkpoint import data_config_of, load_checkpoint, model_from_checkpoint
    from tttkd.evaluate import evaluate as run
    from tttkd.pipeline.cache import FeatureCache
    from tttkd.pipeline.job import default_device
    from tttkd.train import split_scene_ids

    device = device or default_device()
    try:
        state = load_checkpoint(checkpoint)
        model = model_from_checkpoint(state, device=device)
        data_config = data_config_of(state)
        target = FeatureCache(cache)
        scene_ids = split_scene_ids(target, None if split == "all" else split)
        result = run(model, cache, scene_ids, data_config=data_config, class_names=state["class_names"],
                     source_dataset=state.get("dataset"), device=device, export_dir=export_ply)
    except (OSError, ValueError, KeyError) as e:
        fail(f"{checkpoint}: {e}" if isinstance(e, KeyError) else str(e))
    table = Table(title=f"{checkpoint} on {cache}: mIoU {result.miou:.4f} ({result.scenes} scenes)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in result.iou.items():
        table.add_row(name, "-" if iou != iou else f"{iou:.4f}")
    console.print(table)
    source, target = state.get("dataset"), target.provenance.get("dataset")
    if source and source != target:
        console.print(f"scored on the {len(result.iou)} classes {source} and {target} share")
    out = out or Path(checkpoint).with_name(f"eval-{Path(cache).name}.json")
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "cache": str(cache), **result.to_json()}, indent=1))
    console.print(f"wrote {out}")
