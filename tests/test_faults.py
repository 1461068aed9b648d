"""Extraction that survives faults: SIGKILL of a real multi-worker `tttkd-prep extract` at several
points, workers that die mid-scene, and runs that write one store at the same time.

Kill points are found without hooks in the library: the test watches the store on disk (a scene
group whose `complete` is still false) or holds the store's own root lock (cache.py) and waits
until the run blocks on it in /proc/locks, then kills the run's whole process group.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tttkd.pipeline import cache
from tttkd.pipeline.cache import CacheError, FeatureCache
from tttkd.pipeline.extract import PrepConfig
from tttkd.pipeline.job import run_extraction
from tttkd.pipeline.scene import Scene
from tttkd.pipeline.verify import check_scene

IDS = ["scene0000_00", "scene0001_00", "scene0002_00"]
PREP = Path(sys.executable).parent / "tttkd-prep"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from tttkd.pipeline.synth import generate

    root = tmp_path_factory.mktemp("faults_data")
    generate(root, domain="a", scenes=3, seed=0, views=2)
    return root


def start(root: Path, store: Path, scenes: list[str], *args: str, log: Path) -> subprocess.Popen:
    """`tttkd-prep extract` in its own session, so that killpg also kills its Dask workers."""
    command = [str(PREP), "extract", "--root", str(root), "--out", str(store), "--scenes", ",".join(scenes),
               "--model", "efficientnet_lite0", "--device", "cpu", "--batch-size", "2", *args]
    return subprocess.Popen(command, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "400"}, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # workers and nannies are gone, their locks released
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError("processes of the killed run are still alive")


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.001)
    kill(proc)
    raise AssertionError(f"no {what} within {timeout} s")


def scene_flags(store: Path) -> dict[str, bool]:
    """complete flag of every scene group on disk, read from its zarr.json (atomically replaced)."""
    flags = {}
    for scene_id in IDS:
        try:
            metadata = json.loads((store / "scenes" / scene_id / "zarr.json").read_text())
            flags[scene_id] = metadata["attributes"]["complete"]
        except (FileNotFoundError, KeyError):
            pass
    return flags


def check_store(store: Path) -> list[str]:
    """The store opens; every scene that reads as complete has all its arrays, whole. -> complete ids."""
    if not (store / "zarr.json").exists():
        return []
    c = FeatureCache(store)
    for scene_id in c.scene_ids():
        problems = check_scene(c, scene_id).problems
        assert not problems, (scene_id, problems)
    return c.scene_ids()


def files_of(store: Path, scene_ids) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of these scenes: equal before and after means not rewritten."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
            for s in scene_ids for p in (store / "scenes" / s).rglob("*") if p.is_file()}


def waiting_on(lock_file: Path) -> bool:
    """Some process is blocked on an flock of this file (/proc/locks marks waiters with '->')."""
    inode = f":{lock_file.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_killed_runs_resume_without_recomputing_complete_scenes(root, tmp_path):
    store, log = tmp_path / "s.zarr", tmp_path / "run.log"
    run = lambda: start(root, store, IDS, "--split", "train", "--workers", "2", log=log)  # noqa: E731

    # 1. early: the store exists, no scene written yet
    proc = run()
    wait_for(lambda: (store / "scenes" / "zarr.json").exists(), proc, log, "store")
    kill(proc)
    check_store(store)

    # 2. during a scene write: a scene group exists with complete=false
    proc = run()
    caught = wait_for(lambda: [s for s, done in scene_flags(store).items() if not done], proc, log, "scene write")
    kill(proc)
    complete = check_store(store)
    assert caught[0] not in complete
    with pytest.raises(CacheError, match="missing or incomplete"):
        FeatureCache(store).read(caught[0])
    before = files_of(store, complete)

    # 3. during the final metadata update: every scene done, the run blocked on the root lock
    proc = run()
    wait_for(lambda: scene_flags(store).get(caught[0]), proc, log, f"{caught[0]} redone")  # past its start
    with cache.root_lock(store):
        wait_for(lambda: all(scene_flags(store).get(s) for s in IDS), proc, log, "all scenes complete")
        held = wait_for(lambda: waiting_on(store / ".lock"), proc, log, "run waiting to record last_run")
        kill(proc)
    assert held and "last_run" not in zarr.open_group(store, mode="r").attrs
    assert check_store(store) == IDS
    assert files_of(store, complete) == before  # complete scenes were kept, not recomputed
    before = files_of(store, IDS)

    # 4. the same command to the end: nothing left to do, nothing rewritten
    proc = run()
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert check_store(store) == IDS and files_of(store, IDS) == before
    last_run = zarr.open_group(store, mode="r").attrs["last_run"]
    assert sorted(last_run["skipped"]) == IDS and last_run["done"] == [] and last_run["failed"] == {}
    assert FeatureCache(store).provenance["splits"] == ["train"]


PRELOAD = """
import os

from distributed import WorkerPlugin


class Die(WorkerPlugin):
    # kills its worker when it starts the scene: {always} every time, {once} the first time only
    def transition(self, key, start, finish, **kwargs):
        if finish != "executing":
            return
        if key == "extract-{always}":
            os._exit(1)
        if key == "extract-{once}":
            try:
                os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)


def dask_setup(worker):
    worker.plugins["die"] = Die()
"""


def test_a_scene_whose_workers_die_is_retried_once_or_reported_failed(root, tmp_path):
    import dask
    import distributed  # noqa: F401  its defaults must be in dask's config before the set, or leaving it drops them

    store, marker, preload = tmp_path / "d.zarr", tmp_path / "died_once", tmp_path / "die_preload.py"
    preload.write_text(PRELOAD.format(always=IDS[0], once=IDS[1], marker=str(marker)))
    config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=2)
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        report = run_extraction(config, out=store, scene_ids=IDS, workers=2, device="cpu", progress=False)
    assert marker.exists()  # IDS[1]'s first worker died, the retry finished it
    assert sorted(report.done) == IDS[1:] and list(report.failed) == [IDS[0]]
    assert "KilledWorker" in report.failed[IDS[0]]
    assert zarr.open_group(store, mode="r").attrs["last_run"]["failed"] == report.failed
    assert check_store(store) == IDS[1:]


ROOT_WRITER = """
import sys, time
from pathlib import Path
from tttkd.pipeline import cache
from tttkd.pipeline.job import ExtractReport, record_run

store, me = Path(sys.argv[1]), sys.argv[2]
while not (store.parent / "go").exists():
    time.sleep(0.001)
for k in range(15):
    cache.open_for_writing(store, {"teacher": "t", "feature_dim": 4}, split=f"{me}_{k}")
    record_run(store, ExtractReport(store=str(store), done=[f"{me}_{k}"]))
"""


def test_root_attribute_updates_of_concurrent_runs_are_not_lost(tmp_path):
    """Three processes create one store and update its root attributes (the provenance's splits,
    last_run) at the same time: every split survives."""
    store = tmp_path / "r.zarr"
    procs = [subprocess.Popen([sys.executable, "-c", ROOT_WRITER, str(store), f"p{i}"], stderr=subprocess.PIPE)
             for i in range(3)]
    time.sleep(3)  # imports
    (tmp_path / "go").touch()
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["provenance"]["splits"] == sorted(f"p{i}_{k}" for i in range(3) for k in range(15))
    assert attrs["last_run"]["done"][0] in {f"p{i}_14" for i in range(3)}


def test_a_scene_written_by_two_writers_at_once_ends_whole_from_one(tmp_path, monkeypatch):
    """Writer A pauses half-way through the scene (after creating `feature`, before filling it);
    writer B of the same scene must not overwrite it nor mark a mixture complete."""
    store = tmp_path / "w.zarr"
    cache.open_for_writing(store, {"teacher": "t", "feature_dim": 4, "class_names": []})
    n = 50
    data = {}
    for name, seed in (("A", 0), ("B", 1)):
        rng = np.random.default_rng(seed)
        scene = Scene("scene0000_00", rng.normal(size=(n, 3)).astype(np.float32),
                      rng.integers(0, 255, (n, 3), dtype=np.uint8), np.tile(np.float32([0, 0, 1]), (n, 1)),
                      rng.integers(-1, 5, n).astype(np.int16))
        data[name] = dict(scene=scene, seen_index=np.arange(n), feature=np.full((n, 4), 0.1 + 0.2 * seed),
                          view_count=np.ones(n), attrs={"split": None})
    paused, resume = threading.Event(), threading.Event()
    create_array = zarr.Group.create_array

    def pausing_create_array(self, name, **kwargs):
        array = create_array(self, name, **kwargs)
        if name == "feature" and threading.current_thread().name == "A":
            paused.set()
            resume.wait(30)
        return array

    monkeypatch.setattr(zarr.Group, "create_array", pausing_create_array)
    results = {}

    def write(writer: str):
        results[writer] = cache.write_scene(store, **data[writer])

    writers = {name: threading.Thread(name=name, target=write, args=(name,)) for name in "AB"}
    writers["A"].start()
    assert paused.wait(30)
    writers["B"].start()
    writers["B"].join(1.0)
    still_writing = writers["B"].is_alive()
    flags = scene_flags(store)
    resume.set()
    for writer in writers.values():
        writer.join(30)
    assert still_writing, "B wrote the scene while A was half-way through it"
    assert flags == {"scene0000_00": False}
    assert results == {"A": True, "B": False}
    c = FeatureCache(store)
    assert check_scene(c, "scene0000_00").ok
    scene = c.read("scene0000_00")
    np.testing.assert_array_equal(scene.coord, data["A"]["scene"].coord)
    np.testing.assert_allclose(scene.feature, 0.1, atol=1e-3)


def test_two_extract_commands_share_one_store(root, tmp_path):
    """Two runs at once: disjoint scenes in different splits, and one scene in both. Every scene
    ends complete and whole, both splits are recorded, and the shared scene belongs to the run
    that wrote it; the other run reports it failed (a scene belongs to one split)."""
    store = tmp_path / "c.zarr"
    logs = [tmp_path / "train.log", tmp_path / "val.log"]
    procs = [start(root, store, [IDS[0], IDS[2]], "--split", "train", log=logs[0]),
             start(root, store, [IDS[1], IDS[2]], "--split", "val", log=logs[1])]
    codes = [proc.wait(timeout=120) for proc in procs]
    assert check_store(store) == IDS
    c = FeatureCache(store)
    assert c.provenance["splits"] == ["train", "val"]
    assert c.scene_attrs(IDS[0])["split"] == "train" and c.scene_attrs(IDS[1])["split"] == "val"
    winner = ["train", "val"].index(c.scene_attrs(IDS[2])["split"])
    assert codes[winner] == 0, logs[winner].read_text()[-3000:]
    loser = logs[1 - winner].read_text()
    assert codes[1 - winner] == 1 and "failed scene0002_00" in loser and "another split" in loser, loser[-3000:]
    assert c.root.attrs["last_run"]["done"] and set(c.root.attrs["last_run"]["done"]) <= set(IDS)


class _Pool:
    """Stands in for a worker's process pool: records the tasks it ran and its shutdown."""

    def __init__(self):
        self.shutdown_with = None
        self.ran = []

    def submit(self, fn, *args):
        from concurrent.futures import Future

        self.ran.append(fn)
        done = Future()
        done.set_result(fn(*args))
        return done

    def shutdown(self, **kwargs):
        self.shutdown_with = kwargs


@pytest.mark.parametrize("error", ["RuntimeError", "BrokenProcessPool"])
def test_a_group_failing_midway_keeps_its_written_scenes_and_drops_broken_pools(tmp_path, monkeypatch, error):
    """The fast path's group task: a failure after one scene was written fails only the scenes not yet
    yielded; a dead decoding/writing process (BrokenProcessPool) also drops the worker's cached pools,
    so the worker's next group starts new ones instead of failing at once. New pools run a first task
    during the set-up, before the teacher is loaded (it starts their processes); kept ones do not."""
    from concurrent.futures.process import BrokenProcessPool

    from tttkd.pipeline import batched, job
    from tttkd.pipeline.extract import SceneResult

    made: list[_Pool] = []
    monkeypatch.setattr(job, "_worker_pools", {})
    monkeypatch.setattr(job, "_teacher_on_worker", lambda *a: [p.ran[:] for p in made[-2:]])
    monkeypatch.setattr(job, "make_reader", lambda *a: None)
    monkeypatch.setattr(batched, "process_pool", lambda n: made.append(_Pool()) or made[-1])
    fail = {"RuntimeError": RuntimeError("teacher blew up"), "BrokenProcessPool": BrokenProcessPool("child died")}

    def extract_scenes(reader, scene_ids, *, pool, writers, store, teacher, **kwargs):
        assert (pool, writers) == (job._worker_pools["decode"], job._worker_pools["write"])
        assert teacher == [[os.getpid], [os.getpid]] and pool.ran == writers.ran == [os.getpid]  # no more later
        yield SceneResult(scene_ids[0], "done", num_views=2)
        if scene_ids[0] == IDS[0]:
            # a writer completed the second scene, but the failure came before it was yielded
            zarr.open_group(store / "scenes" / scene_ids[1], mode="w", zarr_format=3).attrs.update(
                {"complete": True, "num_points": 50, "num_seen": 40, "num_views": 3, "views_skipped": {"blurry": 1}})
            zarr.open_group(store / "scenes" / scene_ids[2], mode="w", zarr_format=3).attrs.update({"complete": False})
            raise fail[error]
        yield from (SceneResult(s, "done", num_views=2) for s in scene_ids[1:])

    monkeypatch.setattr(batched, "extract_scenes", extract_scenes)
    task = dict(config=PrepConfig(dataset="scannet", root=tmp_path, teacher="efficientnet_lite0"), weights=None,
                device="cpu", gpus=None, decoders=2, store=tmp_path / "store.zarr", split="train")
    results = job._scenes_task(IDS, **task).results
    assert [(r.scene_id, r.status) for r in results] == [(IDS[0], "done"), (IDS[1], "done"), (IDS[2], "failed")]
    assert (results[1].num_points, results[1].num_seen, results[1].num_views, results[1].views_skipped) == (
        50, 40, 3, {"blurry": 1})  # reported from the store, as the writer left it
    for r in results[2:]:
        assert r.reason.startswith(f"scene {r.scene_id}: ") and "\n" not in r.reason
        assert ("a decoding/writing process died" in r.reason) == (error == "BrokenProcessPool"), r.reason
    first = made[:2]
    if error == "BrokenProcessPool":
        assert job._worker_pools == {}
        assert all(p.shutdown_with == {"wait": False, "cancel_futures": True} for p in first)
    else:  # the pools are fine: the worker keeps them
        assert list(job._worker_pools.values()) == first and all(p.shutdown_with is None for p in first)
    again = job._scenes_task(["scene0003_00", "scene0004_00"], **task)
    assert [r.status for r in again.results] == ["done", "done"]
    assert again.worker == "local" and again.setup_s >= 0 and again.began <= again.ended
    assert len(made) == (4 if error == "BrokenProcessPool" else 2)


def test_workers_beyond_the_gpus_are_spread_round_robin(monkeypatch):
    """`--gpus 2 --workers 4`: workers 0..3 on cuda:0, cuda:1, cuda:0, cuda:1 (two processes feed each
    GPU); without --gpus, a worker keeps the given device."""
    import dask.distributed
    from types import SimpleNamespace

    from tttkd.pipeline import job

    seen = []
    for name in range(4):
        monkeypatch.setattr(dask.distributed, "get_worker", lambda name=name: SimpleNamespace(name=name))
        seen.append(job._worker_device("cuda", 2))
    assert seen == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert job._worker_device("cuda:1", None) == "cuda:1"
