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

from .options import DeviceOpt, PcaDimsOpt, ScaleOpt, TeacherOpt, WeightsOpt, fail, pca_dims_for, waits_text

app = typer.Typer(help="Benchmarks: print a table and write a JSON result.", no_args_is_help=True)
console = Console()


@app.command("extract")
def extract(
    root: Annotated[Optional[Path], typer.Option(help="ScanNet-layout dataset (default: generate embedded scenes)")] = None,
    scenes: Annotated[int, typer.Option(help="rooms generated per workload (or scenes of --root)")] = 2,
    copies: Annotated[int, typer.Option(help="each generated room is also extracted as this many scenes in all")] = 1,
    rendered: Annotated[int, typer.Option(help="frames ray-cast per room; further views link to them")] = 8,
    data: Annotated[Optional[Path], typer.Option(help="keep generated workloads here, and reuse them (default: a temporary folder)")] = None,
    workloads: Annotated[Optional[str], typer.Option(
        help="VIEWSxPOINTS per scene, comma-separated (default: 16x50000,16x150000,48x150000 on CUDA, 8x20000 on CPU)")] = None,
    image_sizes: Annotated[Optional[str], typer.Option(
        help="colour JPEG sizes WxH, comma-separated; depth is 640x480 (default: 1296x968,640x480 on CUDA, 640x480 on CPU)")] = None,
    model: TeacherOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option(help="images per teacher batch (both measures)")] = 16,
    image_scale: ScaleOpt = 0.25,
    decoders: Annotated[Optional[int], typer.Option(help="decoding processes (default: CPU cores - 1)")] = None,
    writers: Annotated[Optional[int], typer.Option(help="processes writing scenes (default: CPU cores / 2)")] = None,
    feature_codec: Annotated[str, typer.Option(
        help="fp16, int8 or pca-int8 (codes made on the GPU; pca-int8 in a basis fitted on the first scene)")] = "fp16",
    pca_dims: PcaDimsOpt = None,
    write: Annotated[bool, typer.Option(help="--no-write: everything but the zarr write, to see what it costs")] = True,
    repeats: Annotated[int, typer.Option(help="timed repeats of the model-only batch")] = 10,
    profile: Annotated[int, typer.Option(
        help="after the timed run, extract this many scenes again under torch.profiler: GPU kernel time against "
             "wall time, CUDA syncs and copies, top kernels; 0: skip")] = 0,
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-extract.json"),
):
    """Teacher-only and end-to-end extraction throughput (images/s) and their ratio, in one run, for
    each workload (views and points per scene) and colour image size."""
    import os

    from tttkd.pipeline.bench import Workload, bench_extract, default_bench_config, make_workload
    from tttkd.pipeline.job import default_device

    device = device or default_device()
    cuda = device.startswith("cuda")
    try:
        sizes = [tuple(int(x) for x in item.lower().split("x")) for item in
                 (image_sizes or ("1296x968,640x480" if cuda else "640x480")).split(",")]
        loads = [tuple(int(x) for x in item.lower().split("x")) for item in
                 (workloads or ("16x50000,16x150000,48x150000" if cuda else "8x20000")).split(",")]
        assert all(len(p) == 2 for p in sizes + loads)
    except (ValueError, AssertionError):
        fail("--workloads takes VIEWSxPOINTS and --image-sizes WxH items, comma-separated (e.g. 16x150000, 1296x968)")
    from tttkd.pipeline.cache import FEATURE_CODECS

    if feature_codec not in FEATURE_CODECS:
        fail(f"--feature-codec {feature_codec}: choose one of {', '.join(FEATURE_CODECS)}")
    if pca_dims is not None and pca_dims < 1 and feature_codec == "pca-int8":
        fail(f"--pca-dims {pca_dims}: coefficients per point, 1 or more")
    pca_dims = pca_dims_for(feature_codec, pca_dims)
    decoders = decoders if decoders is not None else max(1, (os.cpu_count() or 2) - 1)
    writers = writers if writers is not None else max(1, (os.cpu_count() or 2) // 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(None, None)] if root is not None else [(Workload(v, p, size), size) for size in sizes for v, p in loads]
        for workload, _ in cases:
            case_dir = Path(tmp) / (workload.name if workload else "root")
            case_dir.mkdir()
            if workload is None:
                ids = sorted(p.name for p in (root / "scans").iterdir())[:scenes] if (root / "scans").is_dir() else []
                if not ids:
                    fail(f"{root}: no scans/ folder with scenes")
            else:
                folder = (data or case_dir) / f"{workload.name}-{scenes}x{copies}-r{rendered}"
                console.print(f"generating {scenes} rooms of {workload.name} in {folder} ...")
                ids = make_workload(folder, workload, unique=scenes, copies=copies, rendered=rendered)
            config = default_bench_config(root if workload is None else folder, model, weights=weights, batch_size=batch_size, image_scale=image_scale,
                                          feature_codec=feature_codec, pca_dims=pca_dims)
            try:
                result = bench_extract(config, scene_ids=ids, device=device, decoders=decoders, repeats=repeats,
                                       store_dir=case_dir, write=write, writers=writers, profile_scenes=profile)
            except (OSError, ValueError, RuntimeError) as e:
                fail(str(e))
            rows.append({"workload": workload.name if workload else str(root), **result})
    table = Table(title=f"tttkd bench extract: {rows[0]['teacher']} on {rows[0]['device']} ({rows[0]['dtype']}), "
                        f"batch {batch_size}, {decoders} decoding and {writers} writing processes"
                        + ("" if write else ", no cache write"))
    for column in ("workload", "colour (H, W)", "teacher input", "model only: images / s", "end to end: images / s",
                   "ratio", "s / scene", "scenes, images, points", "host: core ms / image", "host bound: images / s"):
        table.add_column(column, justify="left" if column == "workload" else "right")
    for r in rows:
        table.add_row(r["workload"], str(tuple(r["image_size"])), str(tuple(r["teacher_input"])),
                      f"{r['model_images_per_s']:.1f}", f"{r['end_to_end_images_per_s']:.1f}", f"{r['ratio']:.1%}",
                      f"{r['end_to_end_s_per_scene']:.3f}",
                      f"{r['end_to_end_scenes']}, {r['end_to_end_images']}, {r['end_to_end_points']}",
                      f"{r['host']['host_core_ms_per_image']:.2f}", f"{r['host']['host_bound_images_per_s']:.0f}")
    console.print(table)
    for r in rows:  # whole lines too: a narrow terminal folds the table's headers
        h = r["host"]
        console.print(f"{r['workload']}: model only: images / s {r['model_images_per_s']:.1f}, end to end: images / s "
                      f"{r['end_to_end_images_per_s']:.1f}, ratio {r['ratio']:.1%}; host, one core: decode "
                      f"{h['decode_ms_per_image']:.2f} ms an image, write {h['write_s_per_scene']:.3f} s a scene of "
                      f"{h['views_per_scene']} views ({r['feature_codec']}): at most {h['host_bound_images_per_s']:.0f} "
                      f"images / s on {h['host_cores']} cores; the extracting thread's {r['end_to_end_seconds']:.2f} s: "
                      f"{waits_text(r['main_thread_s'])}", soft_wrap=True, highlight=False)
    from tttkd.pipeline.bench import grouped_calls

    for r in rows:
        if r["profile"]:
            p = r["profile"]
            calls = grouped_calls(p["runtime_calls"])
            kernels = "-" if p["kernel_ms"] is None else f"{p['kernel_ms'] / 1e3:.2f} s of GPU kernels"
            console.print(f"{r['workload']}, profiled ({p['scenes']} scene{'s' * (p['scenes'] != 1)}): {p['wall_s']:.2f} s wall, {kernels}; "
                          f"syncs {calls['syncs']}, copies {calls['copies']}, launches {calls['launches']}; top "
                          "kernels (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in list(p["top_kernels_ms"].items())[:5]),
                          soft_wrap=True, highlight=False)
    out.write_text(json.dumps({**rows[0], "rows": rows}, indent=1))  # top level: the first row, as before
    console.print(f"wrote {out}")


@app.command("codecs")
def codecs(
    cache: Annotated[Path, typer.Option("--cache", help="an fp16 feature cache (2 scenes or more)")],
    dims: Annotated[str, typer.Option(help="pca-int8 dimensions K, comma-separated")] = "64,128,256,384",
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-codecs.json"),
):
    """Bytes per seen point, write time per scene and fidelity (cosine to fp16) of the int8 and
    pca-int8 codecs on a store, pca-int8 also with a basis fitted without the scene it encodes."""
    from tttkd.pipeline.bench import bench_codecs

    try:
        k = tuple(int(d) for d in dims.split(","))
    except ValueError:
        fail(f"--dims takes integers, comma-separated, not {dims!r}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = bench_codecs(cache, dims=k, work=Path(tmp))
        except (OSError, ValueError) as e:
            fail(str(e))
    stats = lambda c: "-" if c is None else f"{c['mean']:.4f}/{c['p1']:.4f}"
    table = Table(title=f"tttkd bench codecs: {result['teacher']} (D = {result['feature_dim']}), "
                        f"{result['scenes']} scenes, {result['seen_points']} seen points",
                  caption="B/pt: bytes per seen point, all arrays; write s: one scene's write in this process; "
                          "cosine to fp16: mean/1st percentile, also with a basis fitted on the other scenes")
    for column in ("codec", "B/pt", "write s", "cosine", "other scenes' basis"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for r in result["rows"]:
        table.add_row(r["codec"] + (f" K={r['dims']}" if r["dims"] else ""), f"{r['bytes_per_seen_point']:.0f}",
                      f"{r['write_s_per_scene']:.3f}", stats(r.get("cosine")), stats(r.get("cosine_held_out")))
    console.print(table)
    out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {out}")


@app.command("train")
def train(
    cache: Annotated[Path, typer.Option("--cache", help="feature cache to train from")],
    model: Annotated[str, typer.Option(help="minkunet34c (paper) or small")] = "minkunet34c",
    batch_size: Annotated[str, typer.Option(help="scenes per batch, comma-separated for several")] = "4,8",
    workers: Annotated[int, typer.Option(help="data-loading workers")] = 4,
    steps: Annotated[int, typer.Option(help="timed steps (after 3 warm-up steps)")] = 20,
    voxel: Annotated[float, typer.Option(help="voxel size in metres")] = 0.04,
    memory_mb: Annotated[float, typer.Option(help="fast path: MB of decoded scenes per loader worker")] = 2048,
    paths: Annotated[str, typer.Option(help="input paths timed, comma-separated: reference (the original input path, "
                                             "an iterator per epoch), fast-epochs (the fast input path, an iterator "
                                             "per epoch), fast (the trainer's: fast input, one iterator over all "
                                             "epochs)")] = "reference,fast-epochs,fast",
    device: DeviceOpt = None,
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-train.json"),
):
    """Training step time, the fraction of it spent waiting on data and scenes/s, for the original
    input path, the fast one with an iterator per epoch, and the trainer's (fast, one iterator over
    all epochs), at each batch size, in one run."""
    from dataclasses import replace

    from tttkd.bench import bench_train
    from tttkd.data import DataConfig
    from tttkd.pipeline.job import default_device
    from tttkd.train import TrainConfig

    rows = []
    try:
        for size in (int(b) for b in batch_size.split(",")):
            for path in paths.split(","):
                if path not in ("reference", "fast-epochs", "fast"):
                    fail(f"unknown input path {path!r}; choose from reference, fast-epochs, fast")
                config = TrainConfig(model=model, batch_size=size, workers=workers, memory_mb=memory_mb,
                                     reference_input=path == "reference", data=replace(DataConfig(), voxel_size_m=voxel))
                row = bench_train(cache, config, steps=steps, device=device or default_device(), span_epochs=path == "fast")
                rows.append(row | {"path": path})
    except (OSError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"tttkd bench train: {model} on {rows[0]['device']}, {workers} loader workers, "
                        f"{rows[0]['scenes']} scenes")
    for column in ("batch", "input path", "voxels / batch", "ms / step", "compute ms", "data wait", "scenes / s",
                   "peak GPU GB"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["batch_size"]), r["path"], f"{r['voxels_per_batch']:.0f}", f"{r['ms_per_step']:.1f}",
                      f"{r['ms_compute_per_step']:.1f}", f"{100 * r['data_wait_fraction']:.0f}%",
                      f"{r['scenes_per_s']:.1f}", "-" if r["peak_gpu_mem_gb"] is None else f"{r['peak_gpu_mem_gb']:.2f}")
    console.print(table)
    out.write_text(json.dumps(rows, indent=1))
    console.print(f"wrote {out}")


def profile_table(rows: list[dict], paths: list[str]) -> Table:
    """Per size and path: kernel ms and the CUDA runtime calls a step makes, grouped."""
    from tttkd.pipeline.bench import grouped_calls

    groups = ("malloc", "free", "syncs", "copies", "launches")
    table = Table(title="profiled steps: per step")
    for column in ("voxels", "path", "GPU kernel ms", *groups):
        table.add_column(column, justify="right")
    for r in rows:
        for path in paths:
            calls = grouped_calls(r[f"runtime_calls_per_step_{path}"])
            counts = [calls[group] for group in groups]
            kernel = r[f"kernel_ms_per_step_{path}"]
            table.add_row(str(r["voxels"]), path, "-" if kernel is None else f"{kernel:.1f}", *(f"{c:.0f}" for c in counts))
    return table


@app.command("ttt")
def ttt(
    sizes: Annotated[str, typer.Option(help="comma-separated voxel counts")] = "25000,100000,400000",
    model: Annotated[str, typer.Option(help="minkunet34c (paper) or small")] = "minkunet34c",
    steps: Annotated[int, typer.Option(help="timed steps per size and path")] = 10,
    kd_points: Annotated[int, typer.Option(help="KD targets per step (paper: 16384)")] = 16384,
    protocol_rotations: Annotated[int, typer.Option(
        help="rotations of the offline protocol (100 steps each) to time per size and path, scaled to 8; 0: skip")] = 1,
    tf32: Annotated[bool, typer.Option(help="also time the fast path on TF32 tensor cores (CUDA)")] = False,
    graph: Annotated[Optional[bool], typer.Option(
        help="also time the fast path replayed as a CUDA graph, what `tttkd adapt` runs on CUDA (default: on CUDA)")] = None,
    profile: Annotated[int, typer.Option(
        help="profile this many more steps per path: GPU kernel ms and CUDA runtime calls (malloc, free, "
             "syncs, copies, launches) per step; 0: skip")] = 0,
    device: DeviceOpt = None,
    out: Annotated[Path, typer.Option(help="JSON result")] = Path("bench-ttt.json"),
):
    """ms per TTT step, peak GPU memory and seconds per scene of the offline protocol at three scene
    sizes: the reference path (index pairs rebuilt every step) beside the fast one (pairs built once
    per rotation, nothing read back inside the step loop) and, on CUDA, the fast one as a CUDA graph."""

    from tttkd.bench import bench_ttt
    from tttkd.pipeline.job import default_device

    device = device or default_device()
    graph = device.startswith("cuda") if graph is None else graph
    rows = bench_ttt(tuple(int(s) for s in sizes.split(",")), model=model, steps=steps, kd_points=kd_points,
                     device=device, protocol_rotations=protocol_rotations, tf32=tf32, graph=graph,
                     profile_steps=profile)
    extra = [path for path, on in (("tf32", tf32), ("graph", graph)) if on]
    table = Table(title=f"tttkd bench ttt: {model} on {rows[0]['device']}, {kd_points} KD points")
    columns = ("voxels", "ms / step ref", "ms / step fast", "speed-up", "peak GB ref", "peak GB fast",
               "s / scene ref", "s / scene fast") + sum(((f"ms / step {p}", f"s / scene {p}") for p in extra), ())
    for column in columns:
        table.add_column(column, justify="right")
    number = lambda value, form: "-" if value is None else format(value, form)
    for r in rows:
        table.add_row(str(r["voxels"]), f"{r['ms_per_step_reference']:.1f}", f"{r['ms_per_step_fast']:.1f}",
                      f"{r['ms_per_step_reference'] / r['ms_per_step_fast']:.1f}x",
                      number(r["peak_gpu_mem_gb_reference"], ".2f"), number(r["peak_gpu_mem_gb_fast"], ".2f"),
                      number(r.get("protocol_s_reference"), ".1f"), number(r.get("protocol_s_fast"), ".1f"),
                      *sum(((f"{r[f'ms_per_step_{p}']:.1f}", number(r.get(f"protocol_s_{p}"), ".1f")) for p in extra), ()))
    console.print(table)
    if profile:
        console.print(profile_table(rows, ["reference", "fast", *extra]))
    if graph and not rows[0]["graph_captured"]:
        console.print("the graph path ran eagerly: graphs are a CUDA feature, and on CUDA a refused capture warns above")
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
    suite: Annotated[Optional[str], typer.Option(help="cpu, gpu (indoor shift families) or outdoor (16- -> 64-beam "
                                                      "streets, Table 2's rows): the suite with this protocol "
                                                      "preset (then --scenes ... --voxel are not used)")] = None,
    families: Annotated[Optional[str], typer.Option(help="suite: shift families, comma-separated (none: in-distribution; "
                                                         "default: the preset's)")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="suite: seeds, comma-separated (default: the preset's)")] = None,
    rows: Annotated[Optional[str], typer.Option(help="suite: rows, comma-separated (default: all)")] = None,
    teacher: Annotated[str, typer.Option(help="suite: efficientnet_lite0/1/2 (teacher ablation)")] = "efficientnet_lite0",
    max_views: Annotated[Optional[int], typer.Option(help="suite: views per scene in the cache (ablation)")] = None,
    work: Annotated[Optional[Path], typer.Option(help="suite: folder for data, caches, models (default OUT/work)")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="suite: stop cleanly before this many minutes")] = None,
    jobs: Annotated[int, typer.Option(help="suite: processes on the device sharing the scenes of an offline TTT-KD "
                                           "cell (a GPU runs 2-4 at once; results do not change)")] = 1,
    scene_gpus: Annotated[Optional[str], typer.Option(help="suite: GPUs (CUDA_VISIBLE_DEVICES ids, comma-separated) "
                                                           "whose processes, --jobs on each, share the scenes of an "
                                                           "offline TTT-KD cell (results do not change)")] = None,
    input_features: Annotated[Optional[str], typer.Option(help="suite: the 3D network's point inputs, color_normal or "
                                                                "xyz (default: the preset's), cells of their own "
                                                                "protocol: does a shift act through the colours?")] = None,
    tf32: Annotated[bool, typer.Option(help="suite: TTT-KD on TF32 tensor cores (CUDA), cells of their own protocol: "
                                            "compare with the fp32 cells of another --out")] = False,
):
    """The embedded domain-shift experiment. With --suite: every row on every shift family and seed,
    each cell saved as it finishes (a rerun resumes), then results.md (rows x families, mean ± std),
    results.json and miou_vs_steps_<family>.png under --out. Without: a -> b and b -> a, with controls."""
    from dataclasses import replace


    from tttkd.pipeline.job import default_device
    from tttkd.shift import ShiftConfig, run_shift

    if suite is not None:
        _accuracy_suite(suite, out=out, families=families, seeds=seeds, rows=rows, teacher=teacher,
                        max_views=max_views, workers=workers, work=work, max_minutes=max_minutes, jobs=jobs,
                        scene_gpus=scene_gpus, input_features=input_features, tf32=tf32,
                        device=device or default_device())
        return

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


def _accuracy_suite(name: str, *, out: Path, families: str | None, seeds: str | None, rows: str | None, teacher: str,
                    max_views: int | None, workers: int, work: Path | None, max_minutes: float | None, jobs: int,
                    scene_gpus: str | None, input_features: str | None, tf32: bool, device: str) -> None:
    from dataclasses import replace

    from tttkd.suite import SUITES, run_suite

    if name not in SUITES:
        fail(f"--suite {name!r}: choose one of {', '.join(SUITES)}")
    config = SUITES[name]()
    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds else config.seeds
    except ValueError:
        fail(f"--seeds {seeds!r}: give integers, comma-separated")
    if jobs < 1:
        fail(f"--jobs {jobs}: give at least 1")
    gpus = tuple(g.strip() for g in scene_gpus.split(",") if g.strip()) if scene_gpus else ()
    if gpus and not device.startswith("cuda"):
        fail(f"--scene-gpus {scene_gpus}: takes GPUs, and the device is {device}")
    config = replace(config, families=tuple(f.strip() for f in families.split(",") if f.strip()) if families
                     else config.families, seeds=seed_list,
                     rows=tuple(r.strip() for r in rows.split(",")) if rows else config.rows, teacher=teacher,
                     max_views=max_views, workers=max(workers, config.workers), jobs=jobs, scene_gpus=gpus,  # gpu presets: >= 8 workers
                     adapt=replace(config.adapt, tf32=tf32))
    if input_features is not None:
        from tttkd.data import in_channels

        try:
            in_channels(input_features)
        except KeyError:
            fail(f"--input-features {input_features!r}: choose color_normal or xyz")
        config = replace(config, train=replace(config.train, data=replace(config.train.data,
                                                                          input_features=input_features)))
    try:
        run = run_suite(config, out, work=work, device=device, max_minutes=max_minutes,
                        log=lambda m: console.print(f"[bold]{m}[/bold]"), bars=True)
    except (OSError, ValueError, RuntimeError) as e:
        fail(str(e))
    console.print((out / "results.md").read_text().split("\n\n### ")[0])
    console.print(f"results.md, results.json and miou_vs_steps_<family>.png under {out}; cells under {out / 'cells'}")
    console.print(f"cells done: {run.done}/{run.total}" + (" (stopped at the time limit: run again to go on)"
                                                          if run.stopped else ""))


@app.command("ablation")
def ablation(
    runs: Annotated[str, typer.Option(help="suite --out folders, comma-separated, one per value of the ablated "
                                           "setting (--max-views or --teacher)")],
    out: Annotated[Path, typer.Option(help="folder for ablation.md, ablation.json, ablation_<family>.png")] =
        Path("ablation"),
    rows: Annotated[str, typer.Option(help="rows to compare, comma-separated")] = "Joint-Train,TTT-KD",
    steps: Annotated[str, typer.Option(help="also each row after these TTT steps, comma-separated (e.g. 10)")] = "",
):
    """Suite runs that differ in one setting side by side: mIoU (mean ± std over seeds) against views
    per scene (paper Fig. 4b) or against the teacher, per family, as a table and plots."""
    from tttkd.ablation import write_ablation

    try:
        after = tuple(int(s) for s in steps.split(",") if s.strip())
    except ValueError:
        fail(f"--steps {steps!r}: expected whole numbers of TTT steps, comma-separated (e.g. 10,25)")
    try:
        table = write_ablation([Path(r.strip()) for r in runs.split(",") if r.strip()], out,
                               rows=tuple(r.strip() for r in rows.split(",") if r.strip()), steps=after)
    except (OSError, ValueError) as e:
        fail(str(e))
    console.print((out / "ablation.md").read_text())
    console.print(f"ablation of {table['setting']} over {len(table['values'])} runs: {out}/ablation.md, "
                  f"ablation.json and {len(table['plots'])} plot(s)")


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
