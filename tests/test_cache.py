"""The feature cache: plain-zarr round trip, completeness, resume, provenance checks, Dask job."""

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tttkd.pipeline import cache
from tttkd.pipeline.cache import CacheError, FeatureCache
from tttkd.pipeline.extract import PrepConfig
from tttkd.pipeline.job import run_extraction
from tttkd.pipeline.scene import Scene

PROVENANCE = {"teacher": "efficientnet_lite0", "weights_sha256": "ab", "image_scale": 0.25, "feature_dim": 5,
              "feature_dtype": "float16", "stride": 8, "projection": {"border_px": 10.0}, "dataset": "scannet"}


def tiny_scene(scene_id="scene0000_00", n=7, seed=0):
    rng = np.random.default_rng(seed)
    return Scene(scene_id, rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 255, (n, 3), dtype=np.uint8),
                 np.tile(np.array([0, 0, 1], np.float32), (n, 1)), rng.integers(-1, 20, n).astype(np.int16))


def test_round_trip_through_plain_zarr(tmp_path):
    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, PROVENANCE, split="train")
    scene = tiny_scene()
    feature = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    cache.write_scene(store, scene, seen_index=np.array([0, 2, 5]), feature=feature,
                      view_count=np.array([1, 2, 3]), attrs={"split": "train"})
    # a user without tttkd: plain zarr, documented names
    root = zarr.open_group(store, mode="r")
    assert root.attrs["provenance"]["teacher"] == "efficientnet_lite0"
    assert root.attrs["provenance"]["splits"] == ["train"]
    group = root["scenes/scene0000_00"]
    assert group.attrs["complete"] is True and group.attrs["num_points"] == 7
    np.testing.assert_array_equal(group["coord"][:], scene.coord)
    np.testing.assert_array_equal(group["label"][:], scene.label)
    np.testing.assert_array_equal(group["seen_index"][:], [0, 2, 5])
    assert group["feature"].dtype == np.float16
    np.testing.assert_allclose(group["feature"][:], feature, atol=2e-3)
    assert root.metadata.zarr_format == 3
    read = FeatureCache(store).read("scene0000_00")
    np.testing.assert_array_equal(read.color, scene.color)


def test_incomplete_scene_is_invisible_and_rewritten(tmp_path):
    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, PROVENANCE)
    # what a worker killed mid-write leaves behind: a group without complete=true
    zarr.open_group(store / "scenes", mode="r+").create_group("scene0001_00", attributes={"complete": False})
    c = FeatureCache(store)
    assert c.scene_ids() == [] and c.incomplete_scene_ids() == ["scene0001_00"]
    with pytest.raises(CacheError, match="scene0001_00 is missing or incomplete"):
        c.read("scene0001_00")
    cache.write_scene(store, tiny_scene("scene0001_00"), seen_index=np.array([1]), feature=np.ones((1, 5)),
                      view_count=np.array([1]), attrs={})
    assert FeatureCache(store).scene_ids() == ["scene0001_00"]


def test_store_with_another_teacher_is_refused(tmp_path):
    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, PROVENANCE)
    with pytest.raises(CacheError, match="teacher='efficientnet_lite0'.*'dinov2_vitl14'"):
        cache.open_for_writing(store, {**PROVENANCE, "teacher": "dinov2_vitl14"})
    with pytest.raises(CacheError, match="no feature cache"):
        FeatureCache(tmp_path / "nowhere")


class ViewConstantTeacher:
    """A stand-in teacher whose feature grid for the k-th image it sees is one vector everywhere:
    vectors[k] = scale_k * (e_k + 0.5 * e_last), scales 1e-2 .. 1e2 apart, so a point's stored
    feature says which views saw it (its axis-k component is non-zero) and whether they were
    normalised before averaging."""

    device = torch.device("cpu")
    stride = 8

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors  # (V, D)
        self.images = 0

    def visible_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).permute(2, 0, 1).float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        grids = self.vectors[self.images: self.images + batch, :, None, None]  # (B, D, 1, 1)
        self.images += batch
        return grids.expand(-1, -1, -(-height // self.stride), -(-width // self.stride)).clone()


def test_mean_of_normalised_features_gives_the_exact_multiview_objective(synth_root, tmp_path):
    """Brief §2: E_i[f . g_i/|g_i|] = f . mean_i(g_i/|g_i|), so one stored vector per point suffices.
    Checked on what extraction stores: catches a cache of raw (unnormalised) means, re-normalised
    means, sums, or a count over the wrong views."""
    from tttkd.pipeline.extract import extract_scene
    from tttkd.pipeline.scannet import ScanNetReader

    reader = ScanNetReader(synth_root)
    views = len(reader.read_views("scene0000_00").views)
    dim = views + 1
    scale = torch.logspace(-2, 2, views)
    g = scale[:, None] * (torch.eye(views, dim) + 0.5 * torch.eye(dim)[-1])  # (V, D) raw view features
    teacher = ViewConstantTeacher(g)
    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, {**PROVENANCE, "feature_dim": dim})
    result = extract_scene(reader, "scene0000_00", teacher=teacher, store=store, split=None,
                           config=PrepConfig(dataset="scannet", root=synth_root, batch_size=2))  # 2 batches
    assert result.status == "done", result.reason
    assert teacher.images == views
    stored = FeatureCache(store).read("scene0000_00")
    feature = torch.from_numpy(stored.feature.astype(np.float32))  # (M, D) as the trainer reads it
    seen_by = torch.from_numpy(stored.feature[:, :views] > 0)      # (M, V) the views that saw each point
    count = torch.from_numpy(stored.view_count.astype(np.int64))
    assert torch.equal(seen_by.sum(1), count) and count.min() >= 1
    assert (count >= 2).sum() > 100  # enough points seen twice or more for the mean to matter
    # the stored vector is the mean over the point's views of the normalised view features
    unit = torch.nn.functional.normalize(g, dim=1)
    mean = (seen_by.float() @ unit) / count[:, None]
    torch.testing.assert_close(feature, mean, atol=1e-3, rtol=1e-3)
    # so for any unit student vector f, f . stored is the expectation over those views of f . g_i/|g_i|
    f = torch.nn.functional.normalize(torch.randn(len(feature), dim, generator=torch.Generator().manual_seed(0)), dim=1)
    per_view = (f @ g.T) / g.norm(dim=1)  # (M, V) cosine-KD term per view
    expectation = (per_view * seen_by).sum(1) / count
    torch.testing.assert_close((f * feature).sum(1), expectation, atol=2e-3, rtol=0)


def extract_config(root):
    return PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=2)


def test_two_worker_dask_run_writes_one_store_and_resumes(synth_root, tmp_path):
    store = tmp_path / "a.zarr"
    ids = ["scene0000_00", "scene0001_00", "scene0002_00"]
    report = run_extraction(extract_config(synth_root), out=store, scene_ids=ids, split="train", workers=2,
                            device="cpu", progress=False)
    assert sorted(report.done) == ids and not report.failed
    assert report.views_skipped == {"invalid pose": 1}  # scene0002_00 has a -inf pose
    c = FeatureCache(store)
    assert c.scene_ids() == ids
    prov = c.provenance
    assert prov["feature_dim"] == 472 and prov["teacher"] == "efficientnet_lite0" and len(prov["weights_sha256"]) == 64
    for scene_id in ids:
        s = c.read(scene_id)
        # two or three views of a room: a tenth of its points at least (exact visibility, no hidden points)
        assert s.feature.shape == (len(s.seen_index), 472) and len(s.seen_index) > 0.1 * len(s.coord)
        norms = np.linalg.norm(s.feature.astype(np.float32), axis=1)
        # a mean of unit vectors: at most 1, exactly 1 where a single view saw the point
        assert norms.max() <= 1.01
        np.testing.assert_allclose(norms[s.view_count == 1], 1.0, atol=2e-3)
        assert len(np.unique(s.seen_index)) == len(s.seen_index) and np.any(np.diff(s.seen_index) < 0)

    # an interrupted rerun: drop one scene's completion flag; only that scene is redone
    zarr.open_group(store / "scenes" / "scene0001_00", mode="r+").attrs["complete"] = False
    report = run_extraction(extract_config(synth_root), out=store, scene_ids=ids, split="train", workers=1,
                            device="cpu", progress=False)
    assert report.done == ["scene0001_00"] and sorted(report.skipped) == ["scene0000_00", "scene0002_00"]
    assert FeatureCache(store).scene_ids() == ids


def test_failed_scene_is_reported_and_the_others_go_on(synth_root, tmp_path):
    store = tmp_path / "b.zarr"
    report = run_extraction(extract_config(synth_root), out=store, scene_ids=["scene0000_00", "scene0077_00"],
                            workers=1, device="cpu", progress=False)
    assert report.done == ["scene0000_00"]
    assert "scene0077_00_vh_clean_2.ply" in report.failed["scene0077_00"]
    assert zarr.open_group(store, mode="r").attrs["last_run"]["failed"] == report.failed


def test_a_fast_path_job_records_where_its_time_went(synth_root, tmp_path):
    """The Dask job on the fast path (as on a GPU, here on the CPU): every group reports its worker's
    set-up and its extracting span; the run's timeline adds up within the run's seconds, names the
    worker, counts its scenes, and is kept in the store's last_run and printed by the CLI."""
    from typer.testing import CliRunner

    from tttkd.cli.prep import app as prep_app
    from tttkd.cli.prep import timeline_text

    ids = ["scene0000_00", "scene0001_00", "scene0002_00"]
    config = replace(extract_config(synth_root), batch_size=4)
    store = tmp_path / "t.zarr"
    heard = []  # each scene as the client hears of it, and on which thread
    report = run_extraction(config, out=store, scene_ids=ids, workers=1, device="cpu", batched=True, progress=False,
                            on_scene=lambda *scene: heard.append((*scene, threading.current_thread().name)))
    assert sorted(report.done) == ids
    views = {s: FeatureCache(store).scene_attrs(s)["num_views"] for s in ids}
    assert sorted(h[:3] for h in heard) == [(s, "done", views[s]) for s in ids]  # each scene once
    # a group returns when all its scenes are done; its first scene was heard before, from the worker's
    # event (on the client's event-loop thread), not from the task's result (on this thread)
    assert any(h[3] != threading.main_thread().name for h in heard), heard
    line = report.timeline
    assert list(line["workers"]) == ["0"] and line["workers"]["0"]["scenes"] == 3
    assert line["workers"]["0"]["groups"] == 2  # two groups a worker
    waits = line["workers"]["0"]["waits"]
    assert line["workers"]["0"]["setup_s"] > 0 and waits["batches"] > 0 and waits["load"] > 0
    # the feeding thread's waits and the rest cover its groups' extracting time
    assert sum(waits.values()) == pytest.approx(line["workers"]["0"]["extracting_s"], rel=0.1)
    parts = ("before_workers_s", "startup_s", "extracting_s", "closing_s")
    assert 0 < line["extracting_s"] and sum(line[p] for p in parts) <= report.seconds
    assert sum(line[p] for p in parts) > 0.9 * report.seconds  # the parts cover the run
    assert line["extracting_images_per_s"] == pytest.approx(report.images / line["extracting_s"])
    assert zarr.open_group(store, mode="r").attrs["last_run"]["timeline"] == json.loads(json.dumps(line))
    text = timeline_text(line)
    assert f"{line['extracting_s']:.1f} s extracting" in text and "worker 0 (cpu): 3 scenes in 2 group(s)" in text
    shown = CliRunner().invoke(prep_app, ["info", str(store)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0 and "3 extracted, 0 failed" in shown.output, shown.output
    assert f"{line['extracting_s']:.1f} s extracting" in shown.output


def _forkserver_family(marker: str) -> set[int]:
    """Pids of multiprocessing forkservers and the pool processes they made whose environment holds
    `marker` (Linux /proc; only this test's, whatever else runs on the machine)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and b"multiprocessing.forkserver" in (entry / "cmdline").read_bytes()
                    and marker.encode() in (entry / "environ").read_bytes() and not _ended(int(entry.name))):
                pids.add(int(entry.name))
        except OSError:  # ended meanwhile, or not ours
            pass
    return pids


def _ended(pid: int) -> bool:
    """Gone, or a zombie (ended, not yet reaped: under a PID 1 that does not reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _until(condition, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/environ").exists() or not Path("/dev/shm").is_dir(), reason="Linux only")
def test_a_fast_path_job_leaves_no_processes_or_shared_memory_behind(synth_root, tmp_path, monkeypatch):
    """The job's workers start decoding and writing pools and shared-memory blocks that last as long
    as they do; when the job's cluster closes, they all go (before the fix: 2 orphaned pool processes,
    their forkserver and every block in /dev/shm stayed after each job)."""
    import uuid

    marker = f"TTTKD_TEST_{uuid.uuid4().hex}"
    monkeypatch.setenv(marker, "1")  # inherited by the job's workers and their pools
    blocks = lambda: {p.name for p in Path("/dev/shm").glob("psm_*")}
    before = blocks()
    report = run_extraction(replace(extract_config(synth_root), batch_size=4), out=tmp_path / "l.zarr",
                            scene_ids=["scene0000_00", "scene0001_00"], workers=1, device="cpu", batched=True,
                            progress=False)
    assert len(report.done) == 2
    assert _until(lambda: not _forkserver_family(marker), 15), _forkserver_family(marker)
    # another program's blocks come and go; a leaked block stays
    assert _until(lambda: not blocks() - before, 15), blocks() - before


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux only")
def test_pool_processes_end_with_the_process_that_made_the_pool(tmp_path):
    """A process killed while its pool is up (no shutdown, no exit handlers): the pool's processes end."""
    import select
    import signal
    import subprocess
    import sys

    owner = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from tttkd.pipeline.batched import process_pool\n"
        "if __name__ == '__main__':\n"
        "    pool = process_pool(2)\n"
        "    print(sorted({pool.submit(os.getpid).result() for _ in range(8)}), flush=True)\n"
        "    time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([owner.stdout], [], [], 120)[0], "the pool's processes did not start"
        workers = json.loads(owner.stdout.readline())
        assert workers and not any(_ended(pid) for pid in workers)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert _until(lambda: all(_ended(pid) for pid in workers), 10), [p for p in workers if not _ended(p)]
