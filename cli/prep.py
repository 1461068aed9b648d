"""`tttkd-prep`: build the feature cache (synth, extract, info)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .options import (DeviceOpt, PcaDimsOpt, ScaleOpt, SingleValueGroup, TeacherOpt, WeightsOpt, fail, pca_dims_for,
                      waits_text)

app = typer.Typer(help="Build TTT-KD feature caches: 2D teacher features projected onto 3D points.",
                  no_args_is_help=True, add_completion=False, cls=SingleValueGroup)
console = Console()


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="dataset root to write (ScanNet layout)")],
    domain: Annotated[str, typer.Option(help="a, b, or a shift family of a's rooms: appearance, sensor, geometry, all")] = "a",
    scenes: Annotated[int, typer.Option(help="number of rooms")] = 8,
    seed: Annotated[int, typer.Option(help="random seed; output is deterministic for (seed, domain)")] = 0,
    views: Annotated[int, typer.Option(help="posed RGB-D views per room")] = 8,
    image_size: Annotated[str, typer.Option(help="colour JPEG size WxH (ScanNet's sensor: 1296x968)")] = "640x480",
    depth_size: Annotated[Optional[str], typer.Option(help="depth PNG size WxH (default: the colour size)")] = None,
    points: Annotated[Optional[int], typer.Option(help="about this many points per room (ScanNet: ~150000); "
                                                       "default: the domain's density")] = None,
):
    """Write procedural indoor rooms with posed RGB-D views in the ScanNet layout."""
    from rich.progress import Progress

    from tttkd.pipeline import synth as generator

    if domain not in generator.DOMAINS:
        fail(f"unknown domain {domain!r}; choose one of {', '.join(generator.DOMAINS)}")
    try:
        colour, depth = (tuple(int(x) for x in size.lower().split("x")) if size else None
                         for size in (image_size, depth_size))
        assert all(size is None or (len(size) == 2 and min(size) > 0) for size in (colour, depth))
    except (ValueError, AssertionError):
        fail(f"--image-size {image_size!r} / --depth-size {depth_size!r}: give WxH with positive integers, e.g. 1296x968")
    with Progress(console=console) as bar:
        task = bar.add_task(f"domain {domain}", total=scenes)
        generator.generate(out, domain=domain, scenes=scenes, seed=seed, views=views, image_size=colour,
                           depth_size=depth, points=points, progress=lambda _: bar.advance(task))
    console.print(f"wrote {scenes} scenes of domain {domain} to {out}")


@app.command("synth-outdoor")
def synth_outdoor(
    out: Annotated[Path, typer.Option(help="dataset root to write (SemanticKITTI layout)")],
    domain: Annotated[str, typer.Option(help="source (16-beam LiDAR, A2D2-like) or target (64-beam, SemanticKITTI-like)")] = "target",
    scenes: Annotated[int, typer.Option(help="number of frames (one street each): 60% train, 20% val, 20% test")] = 10,
    seed: Annotated[int, typer.Option(help="random seed; output is deterministic for (seed, domain)")] = 0,
    image_scale: Annotated[float, typer.Option(help="size of the camera images relative to KITTI's 1242x375")] = 1.0,
):
    """Write procedural streets with a camera image and a simulated LiDAR sweep in the SemanticKITTI layout."""
    from rich.progress import Progress

    from tttkd.pipeline import streets

    if domain not in streets.DOMAINS:
        fail(f"unknown outdoor domain {domain!r}; choose one of {', '.join(streets.DOMAINS)}")
    if scenes < 1 or not 0 < image_scale <= 4:
        fail(f"--scenes must be at least 1 and --image-scale in (0, 4]; got {scenes} and {image_scale}")
    with Progress(console=console) as bar:
        task = bar.add_task(f"outdoor {domain}", total=scenes)
        frames = streets.generate(out, domain=domain, scenes=scenes, seed=seed, image_scale=image_scale,
                                  progress=lambda _: bar.advance(task))
    console.print(f"wrote {len(frames)} frames of domain {domain} to {out}/sequences (00 train, 07 val, 08 test)")


@app.command()
def extract(
    dataset: Annotated[str, typer.Option(help="dataset reader: scannet, s3dis, matterport (or matterport3d), custom")] = "scannet",
    root: Annotated[Path, typer.Option(help="dataset root")] = Path("data/scannet"),
    model: TeacherOpt = "dinov2_vitl14",
    out: Annotated[Optional[Path], typer.Option(help="store to write (default ./zarr/<dataset>)")] = None,
    split: Annotated[Optional[str], typer.Option(
        help="split recorded on the scenes; without --scenes its list selects them (give --split or --scenes)")] = None,
    scenes: Annotated[Optional[list[str]], typer.Option(
        help="scene ids, comma-separated and/or repeated; they get --split's name only if it is given")] = None,
    max_views: Annotated[Optional[int], typer.Option(help="at most this many random views per scene")] = None,
    workers: Annotated[int, typer.Option(help="worker processes of the local Dask cluster")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(help="address of an existing Dask scheduler to join")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="workers on the GPUs of this machine (worker i on cuda:i mod N), scenes spread over them: one a GPU, or --workers if more")] = None,
    device: DeviceOpt = None,
    weights: WeightsOpt = None,
    image_scale: ScaleOpt = 0.25,
    batch_size: Annotated[int, typer.Option(help="images per teacher batch")] = 16,
    frames_source: Annotated[Optional[str], typer.Option(help="scannet: folder (25k-subset frames) or sens (.sens streams)")] = None,
    frame_skip: Annotated[Optional[int], typer.Option(help="scannet --frames-source sens: keep every N-th frame (default 20)")] = None,
    sens_cache: Annotated[Optional[Path], typer.Option(help="scannet --frames-source sens: where frames are exported (default ROOT/sens_frames)")] = None,
    points: Annotated[Optional[str], typer.Option(help="scannet: mesh (scans/*_vh_clean_2.ply) or pointcept (preprocessed .npy)")] = None,
    points_root: Annotated[Optional[Path], typer.Option(help="scannet --points pointcept: the preprocessed folder (default ROOT)")] = None,
    images_root: Annotated[Optional[Path], typer.Option(help="s3dis: the 2D-3D-S folder holding area_* (default ROOT)")] = None,
    feature_codec: Annotated[str, typer.Option(help="how features are stored: fp16, int8 (1 byte a component) or "
                                               "pca-int8 (1 byte per coefficient in a fitted basis)")] = "fp16",
    pca_dims: PcaDimsOpt = None,
    basis_scenes: Annotated[Optional[int], typer.Option(
        help="pca-int8, a new store: fit the basis on a seeded sample of N of the run's scenes (staged in fp16) and "
             "extract the rest straight into it (default: stage and fit on all of them)")] = None,
    depth_tolerance: Annotated[float, typer.Option(help="visibility: relative depth agreement (OpenScene: 0.25)")] = 0.005,
    depth_tolerance_m: Annotated[float, typer.Option(help="visibility: absolute depth agreement in metres (OpenScene: 0)")] = 0.02,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list scenes, their points and usable images; "
                                           "run no teacher, write nothing")] = False,
):
    """Project each scene's points into its images, run the teacher once per image, and write the cache."""
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction

    from tttkd.pipeline.project import ProjectionConfig

    options = {"frames_source": frames_source, "frame_skip": frame_skip, "sens_cache": sens_cache, "points": points,
               "points_root": points_root, "images_root": images_root}
    reader_options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    config = PrepConfig(dataset=dataset, root=root, teacher=model, weights=weights, image_scale=image_scale,
                        max_views=max_views, batch_size=batch_size, reader_options=reader_options,
                        feature_codec=feature_codec, pca_dims=pca_dims_for(feature_codec, pca_dims),
                        projection=ProjectionConfig(depth_tolerance=depth_tolerance, depth_tolerance_m=depth_tolerance_m))
    out = out or Path("zarr") / dataset
    scene_ids = [s.strip() for value in scenes for s in value.split(",") if s.strip()] if scenes else None
    if split is None and not scene_ids:
        fail("give --split NAME (the scenes of the dataset's split list) or --scenes ID,ID,... (scenes of no split)")
    if basis_scenes is not None and (feature_codec != "pca-int8" or basis_scenes < 1):
        fail(f"--basis-scenes {basis_scenes}: a number of scenes (1 or more) for --feature-codec pca-int8")
    if dry_run:
        _dry_run(config, scene_ids=scene_ids, split=split)
        return
    try:
        from tttkd.pipeline.pca import extract_pca  # pca-int8: a new store stages fp16 features first

        pca = {"basis_scenes": basis_scenes} if feature_codec == "pca-int8" else {}
        report = (extract_pca if feature_codec == "pca-int8" else run_extraction)(
            config, out=out, scene_ids=scene_ids, split=split, workers=workers, scheduler=scheduler, device=device,
            gpus=gpus, **pca)
    except (OSError, ValueError) as e:
        fail(str(e))
    console.print(f"{len(report.done)} scenes extracted, {len(report.skipped)} already complete, "
                  f"{len(report.failed)} failed; {report.images} images in {report.seconds:.1f} s")
    if report.timeline:
        console.print(timeline_text(report.timeline))
    if report.views_skipped:
        console.print(f"views skipped: {report.views_skipped}")
    _print_info(out)
    if report.failed:
        raise typer.Exit(1)


def _dry_run(config, *, scene_ids: list[str] | None, split: str | None) -> None:
    """One table row per scene: points, labelled share, usable and skipped views, or its error."""
    from rich.progress import Progress

    from tttkd.pipeline.extract import make_reader, survey_scene

    try:
        reader = make_reader(config.dataset, config.root, config.reader_options)
        scene_ids = scene_ids or reader.scene_ids(split)
    except (OSError, ValueError) as e:
        fail(str(e))
    if not scene_ids:
        fail(f"{config.root}: no scenes in split {split!r} of {config.dataset}")
    rows = []
    with Progress(console=console, transient=True) as bar:
        for scene_id in bar.track(scene_ids, description="reading scenes"):
            rows.append(survey_scene(reader, scene_id, config))
    table = Table(title=f"{config.dataset} at {config.root}: {len(rows)} scenes (dry run)")
    for column in ("scene", "points", "labelled", "images", "skipped", "status"):
        table.add_column(column, justify="right" if column in ("points", "labelled", "images") else "left")
    for r in rows:
        skipped = ", ".join(f"{k}: {v}" for k, v in r.views_skipped.items())
        table.add_row(r.scene_id, str(r.num_points), f"{r.labelled_fraction:.0%}", str(r.num_views), skipped,
                      "[red]problem[/red]" if r.error else "ok")
    console.print(table)
    bad = [r for r in rows if r.error]
    for r in bad:  # whole lines, so a long path is never wrapped away
        console.print(f"[red]problem[/red] {r.scene_id}: {r.error}", soft_wrap=True, highlight=False)
    console.print(f"{len(rows) - len(bad)} scenes ready, {len(bad)} with problems; "
                  f"{sum(r.num_views for r in rows)} images, {sum(r.num_points for r in rows)} points")
    if bad:
        raise typer.Exit(1)


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="feature cache to check")],
    recompute: Annotated[int, typer.Option(help="also extract this many random scenes again and compare")] = 0,
    root: Annotated[Optional[Path], typer.Option(help="dataset root, for --recompute")] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
):
    """Check every complete scene of a cache: arrays, shapes, dtypes, checksums, index ranges, finite
    values, feature norms; exit code 1 on any problem."""
    from rich.progress import Progress

    from tttkd.pipeline.cache import CacheError, FeatureCache
    from tttkd.pipeline.job import default_device
    from tttkd.pipeline.verify import verify_store

    try:
        total = len(FeatureCache(store).scene_ids())
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("checking scenes", total=total)
            checks = verify_store(store, recompute=recompute, root=root, weights=weights,
                                  device=device or default_device(), progress=lambda _: bar.advance(task))
    except (OSError, CacheError, ValueError) as e:
        fail(str(e))
    for check in checks:
        for problem in check.problems:
            console.print(f"[red]problem[/red] {check.scene_id}: {problem}", soft_wrap=True, highlight=False)
        if check.min_cosine is not None and check.ok:
            console.print(f"{check.scene_id}: re-extracted, lowest cosine {check.min_cosine:.4f}")
    bad = [c for c in checks if not c.ok]
    console.print(f"{store}: {len(checks) - len(bad)} scenes ok, {len(bad)} with problems", soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command()
def recode(
    source: Annotated[Path, typer.Argument(help="feature cache to read")],
    destination: Annotated[Path, typer.Argument(help="new feature cache to write")],
    feature_codec: Annotated[str, typer.Option(help="fp16, int8 or pca-int8")] = "int8",
    pca_dims: PcaDimsOpt = None,
):
    """Copy a cache into one with another feature codec, without running the teacher again."""
    from rich.progress import Progress

    from tttkd.pipeline.cache import CacheError, FeatureCache, recode as run

    try:
        total = len(FeatureCache(source).scene_ids())
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("recoding scenes", total=total)
            written = run(source, destination, feature_codec=feature_codec, pca_dims=pca_dims_for(feature_codec, pca_dims),
                          progress=lambda _: bar.advance(task))
    except (OSError, CacheError, ValueError) as e:
        fail(str(e))
    console.print(f"{written} scenes written to {destination} ({feature_codec})")
    _print_info(destination)


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="feature cache to describe")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
):
    """Scenes, points, bytes per point, teacher and provenance of a feature cache."""
    _print_info(store, as_json=as_json)


def timeline_text(timeline: dict) -> str:
    """The fast path's timeline (job.timeline) in a few lines: where the run's seconds went."""
    lines = [f"time: {timeline['before_workers_s']:.1f} s before the workers (weights hash, store, cluster and its "
             f"processes), {timeline['startup_s']:.1f} s until the first scene (CUDA, teacher, pools), "
             f"{timeline['extracting_s']:.1f} s extracting ({timeline['extracting_images_per_s']:.0f} images/s), "
             f"{timeline['closing_s']:.1f} s closing (pools, cluster)"]
    for name, w in sorted(timeline["workers"].items()):
        waits = w["waits"]  # seconds summed over the worker's groups
        lines.append(f"  worker {name} ({w['device']}): {w['scenes']} scenes in {w['groups']} group(s), set-up "
                     f"{w['setup_s']:.1f} s, extracting {w['extracting_s']:.1f} s; its feeding thread: {waits_text(waits)}")
    return "\n".join(lines)


def _print_info(store: Path, *, as_json: bool = False) -> None:
    from tttkd.pipeline.cache import CacheError, summarize

    try:
        summary = summarize(store)
    except CacheError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    table = Table(title=f"feature cache {store}", show_header=False)
    for key in ("scenes", "incomplete", "points", "seen_points", "seen_fraction", "mean_views_per_point",
                "bytes_on_disk", "bytes_per_point", "bytes_per_seen_point", "teacher", "feature_dim", "feature_codec",
                "pca_dims", "pca_cosine_mean", "pca_cosine_min"):
        value = summary[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    if summary["pca_basis_scenes"]:
        table.add_row("pca_basis_scenes", f"{len(summary['pca_basis_scenes'])} (the basis was fitted on these only)")
    last = summary.get("last_run") or {}
    if last:
        table.add_row("last_run", f"{last.get('finished', '?')}: {len(last.get('done', []))} extracted, "
                                  f"{len(last.get('failed', {}))} failed, {last.get('images', 0)} images in "
                                  f"{last.get('seconds', 0.0):.1f} s")
    if last.get("timeline"):
        table.add_row("last_run.timeline", timeline_text(last["timeline"]).split("\n")[0].removeprefix("time: "))
    for key, value in summary["provenance"].items():
        table.add_row(f"provenance.{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
