"""The Dask job of `tttkd-prep extract`: one task per scene, on a local cluster or an existing one.

The client (this process) alone writes the store's root attributes (provenance, run report),
under the store's root lock (see cache.py); each task writes only its own scene group. A worker
loads the teacher once and keeps it for all its tasks. Scenes already complete in the store are
skipped, so an interrupted run resumes. A scene whose worker dies (killed, out of memory) is run
once more (the local cluster's allowed-failures is 1); if that worker dies too, the scene is
reported failed (dask's KilledWorker), left incomplete in the store, and the other scenes go on.

On CUDA a task is a group of scenes run by the fast path (`batched.py`: teacher batches across
scenes, decoding and writing in process pools that live as long as the worker, or until one of
their processes dies: then the group's unwritten scenes fail and the next group starts new pools);
`gpus=N` starts one worker per GPU of this machine, worker i on cuda:i, and spreads the groups over
them. A killed worker then takes its group's scenes with it (retried once, as one scene is).
"""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dask
import torch
import zarr

import tttkd

from . import cache
from .extract import PrepConfig, SceneResult, extract_scene, make_reader, provenance
from .scene import check_scene_id
from .teacher import TEACHERS, Teacher, feature_dim_of, file_sha256, load_teacher, resolve_weights

_worker_teachers: dict[tuple, Teacher] = {}
_worker_pools: dict[str, object] = {}
_worker_blocks: dict[str, object] = {}  # device -> batched.SharedBlocks, for the worker's life


def _teacher_on_worker(name: str, weights: Path | None, device: str, threads: int) -> Teacher:
    """Load the teacher once per worker process (the cache is module state of that process)."""
    key = (name, str(weights), device)
    if key not in _worker_teachers:
        if device == "cpu":
            torch.set_num_threads(threads)
        _worker_teachers[key] = load_teacher(name, weights=weights, device=device)
    return _worker_teachers[key]


def _scene_task(scene_id: str, *, config: PrepConfig, weights: Path, device: str, threads: int,
                store: Path, split: str | None) -> SceneResult:
    start = time.perf_counter()
    try:
        teacher = _teacher_on_worker(config.teacher, weights, device, threads)
        reader = make_reader(config.dataset, config.root, config.reader_options)
        return extract_scene(reader, scene_id, teacher=teacher, config=config, store=store, split=split)
    except Exception as e:  # a batch job records every failure and goes on with the other scenes
        return SceneResult(scene_id, "failed", reason=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)


def _worker_device(device: str, gpus: int | None) -> str:
    """cuda:i on the i-th worker of a local cluster started with `gpus` workers, else `device`."""
    if not gpus:
        return device
    from dask.distributed import get_worker

    name = get_worker().name  # LocalCluster names its workers 0, 1, ...
    return f"cuda:{int(name) % gpus}" if isinstance(name, int) or str(name).isdigit() else device


def _scenes_task(scene_ids: list[str], *, config: PrepConfig, weights: Path, device: str, gpus: int | None,
                 decoders: int, store: Path, split: str | None) -> list[SceneResult]:
    """A group of scenes through the fast path (one stream of teacher batches across them).

    A failure midway fails only the scenes neither yielded nor complete in the store: those yielded
    are written and marked complete, and so may be one a writer finished before the failure. A decoding or writing process that dies (OOM killer, SIGBUS on a full /dev/shm) breaks
    its pool for good, so the worker's pools are dropped and the next group starts new ones."""
    from concurrent.futures import BrokenExecutor

    from .batched import SharedBlocks, extract_scenes, process_pool

    start = time.perf_counter()
    results: list[SceneResult] = []
    try:
        device = _worker_device(device, gpus)
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # so side streams and pinned memory use that GPU
        teacher = _teacher_on_worker(config.teacher, weights, device, 1)
        if not _worker_pools:  # for the worker's life: starting processes costs seconds
            _worker_pools.update(decode=process_pool(decoders), write=process_pool(max(1, decoders // 2)))
        if device not in _worker_blocks:  # page-locked once, then reused by every group of this worker
            _worker_blocks[device] = blocks = SharedBlocks(pin=torch.device(device).type == "cuda")
            atexit.register(blocks.close)
        reader = make_reader(config.dataset, config.root, config.reader_options)
        for result in extract_scenes(reader, scene_ids, teacher=teacher, config=config, store=store, split=split,
                                     pool=_worker_pools["decode"], writers=_worker_pools["write"],
                                     blocks=_worker_blocks[device]):
            results.append(result)
        return results
    except Exception as e:  # a batch job records every failure and goes on with the other groups
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, BrokenExecutor):  # process.BrokenProcessPool is one
            _drop_worker_pools()
            reason = f"a decoding/writing process died ({reason})"
        yielded = {r.scene_id for r in results}
        return results + [written_or_failed(store, s, f"scene {s}: {reason}", seconds=time.perf_counter() - start)
                          for s in scene_ids if s not in yielded]


def written_or_failed(store: Path, scene_id: str, reason: str, *, seconds: float = 0.0) -> SceneResult:
    """The outcome of a scene whose task failed before reporting it: done if the store holds it
    complete (a writer finished all its arrays before the failure; only a scene that was not complete
    when the run began is ever given to a task), else failed with `reason`."""
    try:
        attrs = dict(zarr.open_group(Path(store) / "scenes" / check_scene_id(scene_id), mode="r", zarr_format=3).attrs)
    except (OSError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
        attrs = {}
    if attrs.get("complete") is not True:
        return SceneResult(scene_id, "failed", reason=reason, seconds=seconds)
    return SceneResult(scene_id, "done", num_points=int(attrs.get("num_points", 0)),
                       num_seen=int(attrs.get("num_seen", 0)), num_views=int(attrs.get("num_views", 0)),
                       views_skipped=dict(attrs.get("views_skipped") or {}), seconds=seconds)


def _drop_worker_pools() -> None:
    """Shut the worker's pools down (a broken pool never recovers) so the next group starts new ones."""
    for pool in _worker_pools.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _worker_pools.clear()


@dataclass
class ExtractReport:
    store: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    views_skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_extraction(config: PrepConfig, *, out: Path, scene_ids: list[str] | None = None, split: str | None = None,
                   workers: int = 1, scheduler: str | None = None, device: str | None = None,
                   gpus: int | None = None, batched: bool | None = None, progress: bool = True) -> ExtractReport:
    """Extract every selected scene of `config.dataset` into the store at `out`.

    Args:
        config: what to extract, and how.
        out: the store's path (created, or resumed if its provenance matches).
        scene_ids: scenes to extract; default: the scenes of `split`.
        split: the split recorded on each scene (and whose list selects them without `scene_ids`);
            None records no split: such scenes are trained on only when every scene is asked for.
        workers: worker processes of the local cluster (ignored with `scheduler`).
        scheduler: address of an existing Dask scheduler; its workers must see `config.root` and `out`.
        device: "cuda", "cpu", ...; default: CUDA when available.
        gpus: local workers on the GPUs of this machine, worker i on cuda:(i mod gpus): one per GPU,
            or `workers` of them if more.
        batched: the fast path (groups of scenes per task, teacher batches across scenes);
            default: on CUDA.
        progress: show a progress bar of scenes and images.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    start = time.perf_counter()
    device = device or default_device()
    if gpus:
        if not device.startswith("cuda") or gpus > torch.cuda.device_count():
            raise ValueError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        # --workers above --gpus: worker i on cuda:(i mod N), so each GPU is fed by several processes
        # (the fast path's host work runs under one interpreter lock per process)
        workers, device = max(workers, gpus), "cuda"
    batched = device.startswith("cuda") if batched is None else batched
    reader = make_reader(config.dataset, config.root, config.reader_options)
    if scene_ids is None:
        if split is None:
            raise ValueError("give a split or a list of scenes")
        scene_ids = reader.scene_ids(split)
    scene_ids = [check_scene_id(s) for s in scene_ids]
    weights = resolve_weights(config.teacher, config.weights)
    # hashed once, here: workers load the file, they never hash it (1.2 GB for ViT-L: ~1 s)
    record = provenance(config, feature_dim=feature_dim_of(config.teacher), stride=TEACHERS[config.teacher].stride,
                        weights_sha256=file_sha256(weights), code_version=tttkd.__version__,
                        class_names=reader.class_names)
    complete = cache.open_for_writing(out, record, split=split, scene_ids=scene_ids)
    report = ExtractReport(store=str(out), skipped=[s for s in scene_ids if s in complete])
    todo = [s for s in scene_ids if s not in complete]
    if todo:
        if scheduler:
            client, cluster = Client(scheduler), None
        else:
            # one retry per scene; one task per worker at a time, so a worker's death counts only
            # against the scene it was running, not against scenes queued behind it
            # workers that are not daemons may start the fast path's decoding processes
            with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                                  "distributed.scheduler.worker-saturation": 1.0,
                                  "distributed.worker.daemon": not batched}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
            client = Client(cluster)
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        try:
            if batched:
                groups = _groups(todo, workers)
                futures = client.map(_scenes_task, groups, key=[f"extract-{g[0]}-{len(g)}" for g in groups],
                                     config=config, weights=weights, device=device, gpus=None if scheduler else gpus,
                                     decoders=max(1, threads - 1), store=Path(out).resolve(), split=split, pure=False)
                scenes_of = dict(zip(futures, groups))
            else:
                futures = client.map(_scene_task, todo, key=[f"extract-{s}" for s in todo], config=config,
                                     weights=weights, device=device, threads=threads, store=Path(out).resolve(),
                                     split=split, pure=False)
                scenes_of = {f: [s] for f, s in zip(futures, todo)}
            _collect(as_completed(futures), scenes_of, report, total=len(todo), progress=progress,
                     store=Path(out).resolve())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    report.seconds = time.perf_counter() - start
    record_run(out, report)
    return report


def _groups(scene_ids: list[str], workers: int) -> list[list[str]]:
    """Scenes in groups for the fast path: two groups per worker, so workers finish together; at
    most 64 scenes a group, so a killed worker loses a bounded part; contiguous, to keep order. Each
    group fills and drains the stream of batches once: on an H200 (2026-11-26) the job over 128
    scenes in groups of 16 took 51 s for 2,048 images, start-up included, where `tttkd bench extract`
    ran the same scenes as one stream at 171 images/s."""
    size = max(1, min(64, -(-len(scene_ids) // (2 * max(1, workers)))))
    return [scene_ids[i: i + size] for i in range(0, len(scene_ids), size)]


def _collect(results, scenes_of: dict, report: ExtractReport, *, total: int, progress: bool, store: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[images]} images, {task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("scenes", total=total, images=0, failed=0)
        for future in results:
            try:
                outcome = future.result()
                outcome = outcome if isinstance(outcome, list) else [outcome]
            except Exception as e:  # the task's workers died (distributed.KilledWorker), or it was lost
                outcome = [written_or_failed(store, s, f"{type(e).__name__}: {e}") for s in scenes_of[future]]
            for result in outcome:
                _count(result, report, bar)
                bar.update(task, advance=1, images=report.images, failed=len(report.failed))


def _count(result: SceneResult, report: ExtractReport, bar) -> None:
    if result.status == "done":
        report.done.append(result.scene_id)
        report.images += result.num_views
        for reason, count in result.views_skipped.items():
            report.views_skipped[reason] = report.views_skipped.get(reason, 0) + count
    else:
        report.failed[result.scene_id] = result.reason
        bar.console.print(f"[red]failed[/red] {result.scene_id}: {result.reason}")


def record_run(out: Path, report: ExtractReport) -> None:
    """Keep the last run's outcome in the root attributes (only clients write them, under the root lock)."""
    cache.set_root_attribute(out, "last_run", {**asdict(report), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
