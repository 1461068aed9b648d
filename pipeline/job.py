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
them. A killed worker then takes its group's scenes with it (retried once, as one scene is). A
group's task returns when all its scenes are done, so its worker also announces each finished scene
as a Dask event: the progress bar moves scene by scene.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

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


@dataclass
class GroupOutcome:
    """What a fast-path task returns: its scenes' results and where its time went. `began` and
    `ended` are wall-clock times (time.time) of the first and last scene of the group, so the client
    can find when its workers were extracting; `setup_s` is the worker's start-up paid by this group
    (teacher, pools, page-locked blocks: the first group of a worker), `waits` the extracting thread's
    seconds by what it waited on (`batched.extract_scenes`' timings)."""
    results: list[SceneResult]
    worker: str
    device: str
    setup_s: float
    began: float
    ended: float
    waits: dict


def _this_worker():
    """The Dask worker running this task; None when called directly."""
    from dask.distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _announce(topic: str | None, result: SceneResult) -> None:
    """Tell the client a scene is finished, before its group's task returns (a Dask event)."""
    worker = _this_worker() if topic is not None else None
    if worker is not None:
        worker.log_event(topic, {"scene_id": result.scene_id, "status": result.status, "images": result.num_views})


def _scenes_task(scene_ids: list[str], *, config: PrepConfig, weights: Path, device: str, gpus: int | None,
                 decoders: int, store: Path, split: str | None, topic: str | None = None) -> GroupOutcome:
    """A group of scenes through the fast path (one stream of teacher batches across them).

    A failure midway fails only the scenes neither yielded nor complete in the store: those yielded
    are written and marked complete, and so may be one a writer finished before the failure. A decoding or writing process that dies (OOM killer, SIGBUS on a full /dev/shm) breaks
    its pool for good, so the worker's pools are dropped and the next group starts new ones."""
    from concurrent.futures import BrokenExecutor

    from .batched import SharedBlocks, extract_scenes, process_pool

    start, began = time.perf_counter(), time.time()
    results: list[SceneResult] = []
    waits: dict[str, float] = {}
    setup_s = 0.0
    try:
        device = _worker_device(device, gpus)
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # so side streams and pinned memory use that GPU
        started = []
        if not _worker_pools:  # for the worker's life: starting processes costs seconds
            _worker_pools.update(decode=process_pool(decoders), write=process_pool(max(1, decoders // 2)))
            # a first task starts the pools' forkserver, which imports torch (1.3 s on a 2-core CPU, where
            # it was the job's whole extra time against the bench): now, beside the teacher's load
            started = [pool.submit(os.getpid) for pool in _worker_pools.values()]
        teacher = _teacher_on_worker(config.teacher, weights, device, 1)
        for future in started:
            future.result()
        if device not in _worker_blocks:  # page-locked once, then reused by every group of this worker
            _worker_blocks[device] = blocks = SharedBlocks(pin=torch.device(device).type == "cuda")
            atexit.register(blocks.close)
        reader = make_reader(config.dataset, config.root, config.reader_options)
        setup_s, began = time.perf_counter() - start, time.time()
        for result in extract_scenes(reader, scene_ids, teacher=teacher, config=config, store=store, split=split,
                                     pool=_worker_pools["decode"], writers=_worker_pools["write"],
                                     blocks=_worker_blocks[device], timings=waits):
            results.append(result)
            _announce(topic, result)
    except Exception as e:  # a batch job records every failure and goes on with the other groups
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, BrokenExecutor):  # process.BrokenProcessPool is one
            _drop_worker_pools()
            reason = f"a decoding/writing process died ({reason})"
        yielded = {r.scene_id for r in results}
        results += [written_or_failed(store, s, f"scene {s}: {reason}", seconds=time.perf_counter() - start)
                    for s in scene_ids if s not in yielded]
    worker = _this_worker()
    return GroupOutcome(results, worker="local" if worker is None else str(worker.name), device=str(device),
                        setup_s=setup_s, began=began, ended=time.time(), waits=waits)


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


def _release_worker_state() -> None:
    """On each worker of a job's own local cluster, as the job ends: shut its pools down and unlink
    its shared-memory blocks. A closing cluster stops its workers without running their exit
    handlers, so they would be left behind (processes, and /dev/shm until it fills up). Runs in the
    worker's event-loop thread (`client.run`), so it never waits: the pools' processes end once idle
    (and with their worker, `batched.exit_with`); page-locked blocks are released on their own GPU."""
    _drop_worker_pools()
    for device, blocks in _worker_blocks.items():
        on_gpu = torch.device(device).type == "cuda"
        with torch.cuda.device(torch.device(device)) if on_gpu else nullcontext():
            blocks.close(taken=False)  # a task may still be copying into the others (a job that ended early)
    _worker_blocks.clear()


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
    timeline: dict = field(default_factory=dict)
    """Fast path: where the run's seconds went (see `timeline`); empty otherwise."""

    def count(self, result: SceneResult) -> None:
        """One scene's outcome into the report."""
        if result.status == "done":
            self.done.append(result.scene_id)
            self.images += result.num_views
            self.count_skipped(result.views_skipped)
        else:
            self.failed[result.scene_id] = result.reason

    def count_skipped(self, views_skipped: dict[str, int]) -> None:
        for reason, count in views_skipped.items():
            self.views_skipped[reason] = self.views_skipped.get(reason, 0) + count

    def add(self, other: ExtractReport) -> None:
        """Another run's scenes into this report (two parts of one command)."""
        self.done += other.done
        self.skipped += other.skipped
        self.failed.update(other.failed)
        self.images += other.images
        self.count_skipped(other.views_skipped)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_extraction(config: PrepConfig, *, out: Path, scene_ids: list[str] | None = None, split: str | None = None,
                   workers: int = 1, scheduler: str | None = None, device: str | None = None,
                   gpus: int | None = None, batched: bool | None = None, progress: bool = True,
                   on_scene: Callable[[str, str, int], None] | None = None) -> ExtractReport:
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
        on_scene: called on this process with (scene id, "done" or "failed", images) once per scene,
            as soon as it is finished: on the fast path before its group's task returns.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    start, wall_start = time.perf_counter(), time.time()
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
            # workers that are not daemons may start the fast path's decoding processes; no
            # statistical profiler: every 10 ms it walks each thread's stack under the interpreter
            # lock that the thread feeding the GPU needs
            with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                                  "distributed.scheduler.worker-saturation": 1.0,
                                  "distributed.worker.daemon": not batched,
                                  "distributed.worker.profile.enabled": False}):
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
            client = Client(cluster)
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        submitted, groups_done = time.time(), []
        topic, subscribed = f"tttkd-extract-{uuid.uuid4().hex}", False  # this run's scene events only
        try:
            board = SceneBoard(total=len(todo), progress=progress, on_scene=on_scene)
            if batched:
                client.subscribe_topic(topic, lambda event: board.heard(event[1]))
                subscribed = True
                groups = _groups(todo, workers)
                futures = client.map(_scenes_task, groups, key=[f"extract-{g[0]}-{len(g)}" for g in groups],
                                     config=config, weights=weights, device=device, gpus=None if scheduler else gpus,
                                     decoders=max(1, threads - 1), store=Path(out).resolve(), split=split,
                                     topic=topic, pure=False)
                scenes_of = dict(zip(futures, groups))
            else:
                futures = client.map(_scene_task, todo, key=[f"extract-{s}" for s in todo], config=config,
                                     weights=weights, device=device, threads=threads, store=Path(out).resolve(),
                                     split=split, pure=False)
                scenes_of = {f: [s] for f, s in zip(futures, todo)}
            with board:
                _collect(as_completed(futures), scenes_of, report, board, store=Path(out).resolve(),
                         groups=groups_done)
        finally:
            if subscribed:
                client.unsubscribe_topic(topic)
            if cluster is not None:  # an existing cluster's workers keep theirs for the next job
                try:
                    client.run(_release_worker_state)
                except Exception:  # a worker that died has nothing left to release
                    pass
            client.close()
            if cluster is not None:
                cluster.close()
        if groups_done and not scheduler:  # workers' clocks are the client's only on its own local cluster
            report.timeline = timeline(groups_done, wall_start, submitted, images=report.images)
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


def timeline(groups: list[GroupOutcome], wall_start: float, submitted: float, *, images: int) -> dict:
    """Where a fast-path run's time went, from its groups' outcomes (wall-clock seconds of one host):
    "before_workers_s" (hashing the weights, opening the store, starting the cluster and its worker
    processes), "startup_s" (from then until the first group began extracting: each worker's CUDA,
    teacher and pools), "extracting_s" (from the first group's first scene to the last group's end) and the
    images a second in that span, "closing_s" (from then until now: releasing the workers' pools and
    closing the cluster, when called after that); per worker, its set-up, its groups' extracting seconds, and its
    extracting thread's waits summed over its groups."""
    began, ended = min(g.began for g in groups), max(g.ended for g in groups)
    workers: dict[str, dict] = {}
    for g in groups:
        mine = workers.setdefault(g.worker, {"device": g.device, "groups": 0, "setup_s": 0.0, "extracting_s": 0.0,
                                             "scenes": 0, "waits": {}})
        mine["groups"] += 1
        mine["scenes"] += len(g.results)
        mine["setup_s"] += g.setup_s
        mine["extracting_s"] += g.ended - g.began
        for key, value in g.waits.items():
            mine["waits"][key] = mine["waits"].get(key, 0.0) + value
    extracting = max(ended - began, 1e-9)
    return {"before_workers_s": submitted - wall_start, "startup_s": max(0.0, began - submitted),
            "extracting_s": extracting, "extracting_images_per_s": images / extracting,
            "closing_s": max(0.0, time.time() - ended), "workers": workers}


class SceneBoard:
    """Each finished scene once, as soon as the client hears of it: the progress bar and the
    caller's `on_scene`. A fast-path task returns only when its whole group (up to 64 scenes) is
    done, so its worker also announces each scene as an event (`_announce`), handled here on the
    client's event-loop thread; the tasks' results then settle the count."""

    def __init__(self, *, total: int, progress: bool, on_scene: Callable[[str, str, int], None] | None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[images]} images, {task.fields[failed]} failed"), TimeElapsedColumn())
        self.bar = Progress(*columns, disable=not progress, transient=False)
        self.task = self.bar.add_task("scenes", total=total, images=0, failed=0)
        self.on_scene = on_scene
        self.lock = threading.Lock()
        self.finished: set[str] = set()
        self.images = self.failed = 0

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def scene(self, scene_id: str, status: str, images: int) -> None:
        with self.lock:
            if scene_id in self.finished:
                return
            self.finished.add(scene_id)
            self.images += images if status == "done" else 0
            self.failed += status != "done"
            self.bar.update(self.task, completed=len(self.finished), images=self.images, failed=self.failed)
        if self.on_scene is not None:
            self.on_scene(scene_id, status, images)

    def heard(self, event: dict) -> None:
        """A worker's event (`_announce`; Dask adds the worker's address)."""
        self.scene(event["scene_id"], event["status"], event["images"])

    def print(self, text: str) -> None:
        self.bar.console.print(text)


def _collect(results, scenes_of: dict, report: ExtractReport, board: SceneBoard, *, store: Path,
             groups: list | None = None) -> None:
    for future in results:
        try:
            outcome = future.result()
            if isinstance(outcome, GroupOutcome):
                if groups is not None:
                    groups.append(outcome)
                outcome = outcome.results
            outcome = outcome if isinstance(outcome, list) else [outcome]
        except Exception as e:  # the task's workers died (distributed.KilledWorker), or it was lost
            outcome = [written_or_failed(store, s, f"{type(e).__name__}: {e}") for s in scenes_of[future]]
        for result in outcome:
            report.count(result)
            if result.status != "done":
                board.print(f"[red]failed[/red] {result.scene_id}: {result.reason}")
            board.scene(result.scene_id, result.status, result.num_views if result.status == "done" else 0)


def record_run(out: Path, report: ExtractReport) -> None:
    """Keep the last run's outcome in the root attributes (only clients write them, under the root lock)."""
    cache.set_root_attribute(out, "last_run", {**asdict(report), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
