"""`tttkd adapt`: test-time training (and the baselines) on every target scene, and the results table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress

from .options import DeviceOpt, fail

console = Console()

# Named settings of the paper's experiments; an option given explicitly wins over its preset.
# outdoor (paper §4.2, "Testing"): 4 rotations, 25 offline TTT steps, lr 0.1 (A2D2 -> SemanticKITTI).
PRESETS = {"indoor": dict(steps=100, lr=1.0, rotations=8), "outdoor": dict(steps=25, lr=0.1, rotations=4)}


def resolve(source: str, target: str, *, checkpoint: Optional[Path], cache: Optional[Path]) -> tuple[Path, Path]:
    """--source/--target name datasets: runs/<source>/last.pt and ./zarr/<target> unless overridden."""
    return checkpoint or Path("runs") / source / "last.pt", cache or Path("zarr") / target


def adapt(
    ctx: typer.Context,
    source: Annotated[str, typer.Option(help="source dataset: its model is runs/<source>/last.pt")],
    target: Annotated[str, typer.Option(help="target dataset: its cache is ./zarr/<target>")],
    steps: Annotated[int, typer.Option(help="TTT steps per scene and rotation (paper: 100)")] = 100,
    method: Annotated[str, typer.Option(help="ttt-kd, ttt-kd-o, tent, dua, adacontrast, xmuda, mm-tta, none, or all "
                                             "(all runs xmuda and mm-tta only when the 2D head, head2d.pt beside the "
                                             "checkpoint, exists; naming one fits the head if missing)")] = "all",
    preset: Annotated[Optional[str], typer.Option(help="indoor (100 steps, lr 1.0, 8 rotations) or outdoor (25 steps, "
                                                      "lr 0.1, 4 rotations: paper §4.2); explicit options win")] = None,
    source_cache: Annotated[Optional[Path], typer.Option(help="source feature cache the 2D head of xmuda/mm-tta is "
                                                            "fitted on (default ./zarr/<source>)")] = None,
    source_split: Annotated[str, typer.Option(help="split of the source cache the 2D head is fitted on")] = "train",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Joint-Train checkpoint (default runs/<source>/last.pt)")] = None,
    source_only: Annotated[Optional[Path], typer.Option(help="Source-Only checkpoint (trained with --no-kd)")] = None,
    oracle: Annotated[Optional[Path], typer.Option(help="checkpoint trained on the target, for the Oracle row")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="target feature cache (default ./zarr/<target>)")] = None,
    split: Annotated[str, typer.Option(help="target scenes of this split (paper: val); all: every complete scene")] = "val",
    lr: Annotated[float, typer.Option(help="TTT SGD learning rate (paper: 1.0)")] = 1.0,
    rotations: Annotated[int, typer.Option(help="rotations about up in the ensemble (paper: 8)")] = 8,
    stride: Annotated[int, typer.Option(help="TTT-KD-O: update every s-th scene")] = 1,
    kd_points: Annotated[int, typer.Option(help="KD targets per TTT step (paper: 16384)")] = 16384,
    out: Annotated[Optional[Path], typer.Option(help="results folder (default results/<source>-to-<target>)")] = None,
    export_ply: Annotated[bool, typer.Option(help="write per-scene predictions as PLY")] = False,
    gpus: Annotated[int, typer.Option(help="processes (one per GPU; CPU processes with --device cpu) that share the "
                                           "scenes of TTT-KD and the unadapted rows; online methods run in one")] = 1,
    tf32: Annotated[bool, typer.Option(help="TTT-KD's fp32 products on TF32 tensor cores (CUDA; about half the "
                                             "kernel time; check the adapted mIoU against a run without it)")] = False,
    cuda_graph: Annotated[bool, typer.Option(help="replay TTT-KD's step as a CUDA graph (CUDA; same results, the "
                                                   "step no longer bound by kernel launches)")] = True,
    device: DeviceOpt = None,
):
    """Adapt a trained model to each target scene, predict, and compare with the baselines."""

    from tttkd.adapt import AdaptConfig
    from tttkd.checkpoint import load_checkpoint
    from tttkd.head2d import fit_head2d, head2d_path
    from tttkd.experiment import METHODS, MULTIMODAL, plan_rows, run_method, scored_classes, target_scene_ids, write_results
    from tttkd.pipeline.cache import FeatureCache
    from tttkd.pipeline.job import default_device
    from tttkd.pipeline.manifests import paper_label, paper_results

    joint, cache = resolve(source, target, checkpoint=checkpoint, cache=cache)
    out = out or Path("results") / f"{source}-to-{target}"
    console.print(f"source model {joint}; target cache {cache}; results -> {out}")
    methods = list(METHODS) if method == "all" else [method]
    if any(m not in METHODS for m in methods):
        fail(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or all")
    device = device or default_device()
    if preset is not None:
        if preset not in PRESETS:
            fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        given = {name for name in PRESETS[preset] if ctx.get_parameter_source(name).name != "DEFAULT"}
        steps, lr, rotations = (value if name in given else PRESETS[preset][name]
                                for name, value in (("steps", steps), ("lr", lr), ("rotations", rotations)))
    config = AdaptConfig(steps=steps, lr=lr, rotations=rotations, stride=stride, kd_points=kd_points, tf32=tf32,
                         cuda_graph=cuda_graph)
    try:
        for path in filter(None, (joint, source_only, oracle)):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no checkpoint here (train one with `tttkd train`)")
        scene_ids = target_scene_ids(cache, split=split)
        # --source names the run; the source model knows the dataset it was trained on
        source_dataset = load_checkpoint(joint).get("dataset") or source
        target_dataset = FeatureCache(cache).provenance["dataset"]
        classes = scored_classes(source_dataset, target_dataset)
        head2d = head2d_path(joint)  # the 2D branch of xMUDA and MM-TTA
        if method in MULTIMODAL and not head2d.is_file():
            source_cache = source_cache or Path("zarr") / source
            console.print(f"fitting the 2D head of {method} on {source_cache} ({source_split}) -> {head2d}")
            with Progress(console=console) as bar:
                task = bar.add_task("2D head: reading source scenes", total=None)
                fit_head2d(source_cache, joint, split=None if source_split == "all" else source_split,
                           device=device, progress=lambda _: bar.advance(task))
        results = []
        with Progress(console=console) as bar:
            for row, name, ckpt in plan_rows(joint=joint, source_only=source_only, oracle=oracle, methods=methods,
                                             head2d=head2d.is_file()):
                task = bar.add_task(row, total=len(scene_ids))
                results.append(run_method(row, name, ckpt, cache, scene_ids, config=config, device=device,
                                          classes=classes,
                                          export_dir=out / "ply" if export_ply else None,
                                          progress=lambda _: bar.advance(task), gpus=gpus, head2d=head2d))
    except (OSError, ValueError) as e:
        fail(str(e))
    table = write_results(results, out, title=f"{source} -> {target} ({len(scene_ids)} {split} scenes)",
                          classes=classes, config=config, paper=paper_results(source_dataset, target_dataset),
                          paper_label=paper_label(source_dataset, target_dataset),
                          setup={"source": source, "source_dataset": source_dataset, "target": target,
                                 "split": split, "checkpoint": str(joint),
                                 "source_only": str(source_only), "oracle": str(oracle), "cache": str(cache)})
    console.print(table)
    console.print(f"wrote {out}/results.md, results.json" + (", miou_vs_steps.png" if "ttt-kd" in methods else ""))
