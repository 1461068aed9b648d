"""The Dask job of `tttkd-prep extract`: one task per scene, on a local cluster or an existing one.

The client (this process) alone writes the store's root attributes (provenance, run report),
under the store's root lock (see cache.py); each task writes only its own scene group. A worker
loads the teacher once and keeps it for all its tasks. Scenes already complete in the store are
skipped, so an interrupted run resumes. A scene whose worker dies (killed, out of memory) is run
once more (the local cluster's allowed-failures is 1); if that worker dies too, the scene is
reported failed (dask's KilledWorker), left incomplete in the store, and the other scenes go on.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dask
import torch

import tttkd

from . import cache
from .extract import PrepConfig, SceneResult, extract_scene, make_reader, provenance
from .scene import check_scene_id
from .teacher import TEACHERS, Teacher, feature_dim_of, file_sha256, load_teacher, resolve_weights

_worker_teachers: dict[tuple, Teacher] = {}


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
                   progress: bool = True) -> ExtractReport:
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
        progress: show a progress bar of scenes and images.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    start = time.perf_counter()
    device = device or default_device()
    reader = make_reader(config.dataset, config.root, config.reader_options)
    if scene_ids is None:
        if split is None:
            raise ValueError("give a split or a list of scenes")
        scene_ids = reader.scene_ids(split)
    scene_ids = [check_scene_id(s) for s in scene_ids]
    weights = resolve_weights(config.teacher, config.weights)
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
            with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                                  "distributed.scheduler.worker-saturation": 1.0}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
            client = Client(cluster)
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        try:
            futures = client.map(_scene_task, todo, key=[f"extract-{s}" for s in todo], config=config,
                                 weights=weights, device=device, threads=threads, store=Path(out).resolve(),
                                 split=split, pure=False)
            _collect(as_completed(futures), dict(zip(futures, todo)), report, total=len(todo), progress=progress)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    report.seconds = time.perf_counter() - start
    _record_run(out, report)
    return report


def _collect(results, scene_of: dict, report: ExtractReport, *, total: int, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[images]} images, {task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("scenes", total=total, images=0, failed=0)
        for future in results:
            try:
                result: SceneResult = future.result()
            except Exception as e:  # the task's workers died (distributed.KilledWorker), or it was lost
                result = SceneResult(scene_of[future], "failed", reason=f"{type(e).__name__}: {e}")
            if result.status == "done":
                report.done.append(result.scene_id)
                report.images += result.num_views
                for reason, count in result.views_skipped.items():
                    report.views_skipped[reason] = report.views_skipped.get(reason, 0) + count
            else:
                report.failed[result.scene_id] = result.reason
                bar.console.print(f"[red]failed[/red] {result.scene_id}: {result.reason}")
            bar.update(task, advance=1, images=report.images, failed=len(report.failed))


def _record_run(out: Path, report: ExtractReport) -> None:
    """Keep the last run's outcome in the root attributes (only clients write them, under the root lock)."""
    cache.set_root_attribute(out, "last_run", {**asdict(report), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
