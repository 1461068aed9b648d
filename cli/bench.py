"""`tttkd bench ...`: performance measurements any user can run on their own machine.

Each prints a table and writes a JSON result; GPU figures go to README's Performance section
with the card, the sizes and the date.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import DeviceOpt, ScaleOpt, TeacherOpt, WeightsOpt, fail

app = typer.Typer(help="Benchmarks: print a table and write a JSON result.", no_args_is_help=True)
console = Console()


@app.command("extract")
def extract(
    root: Annotated[Optional[Path], typer.Option(help="ScanNet-layout dataset (default: generate embedded scenes)")] = None,
    scenes: Annotated[int, typer.Option(help="scenes extracted end to end")] = 2,
    model: TeacherOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option(help="images per teacher batch")] = 16,
    image_scale: ScaleOpt = 0.25,
    repeats: Annotated[int, typer.Option(help="timed repeats of the model-only batch")] = 10,
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-extract.json"),
):
    """Teacher-only and end-to-end extraction throughput (images/s), in one run."""
    from tttkd.pipeline.bench import bench_extract, default_bench_config
    from tttkd.pipeline.job import default_device
    from tttkd.pipeline.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root = Path(tmp) / "synth"
            ids = generate(root, domain="a", scenes=scenes, seed=0)
        else:
            ids = sorted(p.name for p in (root / "scans").iterdir())[:scenes] if (root / "scans").is_dir() else []
            if not ids:
                fail(f"{root}: no scans/ folder with scenes")
        config = default_bench_config(root, model, weights=weights, batch_size=batch_size, image_scale=image_scale)
        try:
            result = bench_extract(config, scene_ids=ids, device=device or default_device(), repeats=repeats)
        except (OSError, ValueError, RuntimeError) as e:
            fail(str(e))
    table = Table(title=f"tttkd bench extract: {result['teacher']} on {result['device']} ({result['dtype']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("image size (H, W)", str(tuple(result["image_size"])))
    table.add_row("batch", str(result["batch_size"]))
    table.add_row("model only: ms / batch", f"{result['model_ms_per_batch']:.1f}")
    table.add_row("model only: images / s", f"{result['model_images_per_s']:.1f}")
    table.add_row("end to end: images / s", f"{result['end_to_end_images_per_s']:.1f}")
    table.add_row("end to end: s / scene", f"{result['end_to_end_s_per_scene']:.2f}")
    table.add_row("scenes, images, points", f"{result['end_to_end_scenes']}, {result['end_to_end_images']}, {result['end_to_end_points']}")
    console.print(table)
    out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {out}")


@app.command("train")
def train(
    cache: Annotated[Path, typer.Option("--cache", help="feature cache to train from")],
    model: Annotated[str, typer.Option(help="minkunet34c (paper) or small")] = "minkunet34c",
    batch_size: Annotated[int, typer.Option(help="scenes per batch")] = 8,
    workers: Annotated[int, typer.Option(help="data-loading workers")] = 4,
    steps: Annotated[int, typer.Option(help="timed steps (after 3 warm-up steps)")] = 20,
    voxel: Annotated[float, typer.Option(help="voxel size in metres")] = 0.04,
    device: DeviceOpt = None,
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-train.json"),
):
    """Training step time and the fraction of it spent waiting on data."""
    from dataclasses import replace


    from tttkd.bench import bench_train
    from tttkd.pipeline.job import default_device
    from tttkd.data import DataConfig
    from tttkd.train import TrainConfig

    config = TrainConfig(model=model, batch_size=batch_size, workers=workers,
                         data=replace(DataConfig(), voxel_size_m=voxel))
    try:
        result = bench_train(cache, config, steps=steps, device=device or default_device())
    except (OSError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"tttkd bench train: {model} on {result['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in ("batch_size", "workers", "voxels_per_batch", "ms_per_step", "ms_compute_per_step",
                "data_wait_fraction", "peak_gpu_mem_gb", "amp"):
        value = result[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {out}")


@app.command("ttt")
def ttt(
    sizes: Annotated[str, typer.Option(help="comma-separated voxel counts")] = "25000,100000,400000",
    model: Annotated[str, typer.Option(help="minkunet34c (paper) or small")] = "minkunet34c",
    steps: Annotated[int, typer.Option(help="timed steps per size (median reported)")] = 10,
    kd_points: Annotated[int, typer.Option(help="KD targets per step (paper: 16384)")] = 16384,
    device: DeviceOpt = None,
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-ttt.json"),
):
    """ms per TTT step and peak GPU memory at three scene sizes."""

    from tttkd.bench import bench_ttt
    from tttkd.pipeline.job import default_device

    rows = bench_ttt(tuple(int(s) for s in sizes.split(",")), model=model, steps=steps, kd_points=kd_points,
                     device=device or default_device())
    table = Table(title=f"tttkd bench ttt: {model} on {rows[0]['device']}, {kd_points} KD points")
    for column in ("voxels", "ms / step", "peak GPU memory (GB)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["voxels"]), f"{r['ms_per_step']:.1f}",
                      "-" if r["peak_gpu_mem_gb"] is None else f"{r['peak_gpu_mem_gb']:.2f}")
    console.print(table)
    out.write_text(json.dumps(rows, indent=1))
    console.print(f"wrote {out}")


@app.command("accuracy")
def accuracy(
    out: Annotated[Path, typer.Option(help="folder for data, caches, runs and results")] = Path("bench-accuracy"),
    scenes: Annotated[int, typer.Option(help="rooms per domain (a quarter are the val split)")] = 16,
    epochs: Annotated[int, typer.Option(help="training epochs per model")] = 20,
    model: Annotated[str, typer.Option(help="small (CPU) or minkunet34c")] = "small",
    steps: Annotated[int, typer.Option(help="TTT steps per scene and rotation")] = 20,
    lr: Annotated[float, typer.Option(help="TTT learning rate")] = 0.1,
    rotations: Annotated[int, typer.Option(help="rotation ensemble size")] = 2,
    voxel: Annotated[float, typer.Option(help="voxel size in metres")] = 0.06,
    workers: Annotated[int, typer.Option(help="Dask and data-loading workers")] = 2,
    device: DeviceOpt = None,
):
    """The embedded domain-shift experiment, both directions, with controls; writes the tables."""
    from dataclasses import replace


    from tttkd.pipeline.job import default_device
    from tttkd.shift import ShiftConfig, run_shift

    config = ShiftConfig(scenes=scenes, workers=workers)
    config = replace(config, train=replace(config.train, epochs=epochs, model=model,
                                           data=replace(config.train.data, voxel_size_m=voxel)),
                     adapt=replace(config.adapt, steps=steps, lr=lr, rotations=rotations))
    try:
        tables = run_shift(out, config, device=device or default_device(),
                           log=lambda m: console.print(f"[bold]{m}[/bold]"))
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
    for table in tables.values():
        console.print(table)
    (out / "results.md").write_text("\n".join(tables.values()))
    console.print(f"wrote {out / 'results.md'}")


@app.command("visibility")
def visibility(
    tolerances: Annotated[str, typer.Option(help="relative:absolute_m pairs, comma-separated")] = "0.25:0,0.01:0,0.005:0.02,0:0.04",
    scenes: Annotated[int, typer.Option(help="embedded rooms per domain")] = 4,
    views: Annotated[int, typer.Option(help="views per room")] = 8,
    domains: Annotated[str, typer.Option(help="embedded domains, comma-separated")] = "a,b",
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-visibility.json"),
):
    """Precision and recall of the depth test against the generator's exact visibility (CPU)."""
    from dataclasses import asdict

    from tttkd.pipeline.visibility import visibility_study

    try:
        pairs = [tuple(float(x) for x in item.split(":")) for item in tolerances.split(",")]
        assert all(len(p) == 2 for p in pairs)
    except (ValueError, AssertionError):
        fail(f"--tolerances {tolerances!r}: give relative:absolute_m pairs such as 0.25:0,0.005:0.02")
    table = Table(title=f"depth-test visibility vs exact truth ({scenes} rooms x {views} views per domain)")
    for column in ("domain", "relative", "absolute (m)", "precision", "recall", "points with features no view sees"):
        table.add_column(column, justify="right")
    rows = []
    for domain in domains.split(","):
        for r in visibility_study(pairs, scenes=scenes, views=views, domain=domain):
            rows.append({"domain": domain, **asdict(r)})
            table.add_row(domain, f"{r.depth_tolerance:g}", f"{r.depth_tolerance_m:g}", f"{r.precision:.3f}",
                          f"{r.recall:.3f}", f"{r.hidden_feature_share:.1%}")
    console.print(table)
    out.write_text(json.dumps(rows, indent=1))
    console.print(f"wrote {out}")
