"""The fast extraction path against the reference path: batched torch projection against
`project_view`, sparse feature accumulation against `sample_features`, and the cross-scene
batched extraction against the per-scene one (same cache)."""

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tttkd.pipeline.cache import FeatureCache

from tttkd.pipeline.project import ProjectionConfig, project_view, project_views
from tttkd.pipeline.scene import Camera


@dataclass(frozen=True)
class Geometry:
    """The per-view inputs of project_views (what extract.DecodedView carries)."""

    cam_to_world: np.ndarray
    camera: Camera
    image_scale: float
    depth: np.ndarray | None = None
    depth_camera: Camera | None = None
    depth_scale: float = 1000.0


def look_at(position, target):
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
    pose[:3, 3] = position
    return pose


def random_views(rng, coord, count):
    """Views of a random point cloud: depth images made from the points themselves (a z-buffer of
    the points, with noise and holes, at another size than the colour image), and views without one."""
    views = []
    for i in range(count):
        pose = look_at(rng.uniform(-0.5, 0.5, 3) + [0, 0, 0.5], rng.uniform(-1, 1, 3) * [2, 2, 0.3] + [0, 0, 0.0])
        pose[:3, 3] += rng.normal(0, 0.3, 3)
        width, height = int(rng.integers(60, 90)), int(rng.integers(40, 70))
        k = np.array([[rng.uniform(50, 80), rng.uniform(-0.5, 0.5), width / 2], [0, rng.uniform(50, 80), height / 2],
                      [0, 0, 1]])
        camera = Camera(k, width, height)
        if i % 3 == 2:  # no depth image: the z-buffer test
            views.append(Geometry(pose, camera, rng.uniform(0.2, 1.0)))
            continue
        depth_camera = camera.resized(width * 2, height * 2)
        cam = (coord - pose[:3, 3]) @ pose[:3, :3]
        depth = np.zeros((height * 2, width * 2))
        front = cam[:, 2] > 0.05
        pixel = np.rint(cam[front, :2] / cam[front, 2:] @ depth_camera.intrinsics[:2, :2].T
                        + depth_camera.intrinsics[:2, 2]).astype(int)
        ok = (pixel[:, 0] >= 0) & (pixel[:, 0] < width * 2) & (pixel[:, 1] >= 0) & (pixel[:, 1] < height * 2)
        z = cam[front, 2][ok]
        order = np.argsort(-z)  # nearest written last
        depth[pixel[ok][order, 1], pixel[ok][order, 0]] = z[order]
        depth = depth + rng.normal(0, 0.01, depth.shape) * (depth > 0)
        raw = np.clip(depth * 1000, 0, 65535).round().astype(np.uint16)
        raw[rng.random(raw.shape) < 0.05] = 65535 if i % 2 else 0  # holes: both "no measurement" codes
        views.append(Geometry(pose, camera, rng.uniform(0.2, 1.0), raw, depth_camera, 1000.0))
    return views


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_projection_returns_project_views_rows_for_depth_and_zbuffer_views(seed):
    """A bug in any test (frustum, border, depth lookup, hole codes, z-buffer slabs per view, the
    order of rows) shows as a different set of indices or pixels."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform(-2, 2, (4000, 3)) * [1, 1, 0.5]
    views = random_views(rng, coord, 7)
    config = ProjectionConfig()
    view_index, point_index, uv = project_views(torch.from_numpy(coord), views, config=config)
    total = 0
    for i, g in enumerate(views):
        reference = project_view(coord, g.cam_to_world, g.camera, config=config, image_scale=g.image_scale,
                                 depth=g.depth, depth_camera=g.depth_camera, depth_scale=g.depth_scale)
        rows = (view_index == i).numpy()
        np.testing.assert_array_equal(point_index[rows].numpy(), reference.point_index)
        np.testing.assert_allclose(uv[rows].numpy(), reference.uv, atol=1e-3)
        total += len(reference.point_index)
    assert len(view_index) == total
    assert total > 500, "the random views must see points, or the comparison is empty"
    with_depth = sum(len(project_view(coord, g.cam_to_world, g.camera, config=config, image_scale=g.image_scale,
                                      depth=g.depth, depth_camera=g.depth_camera).point_index)
                     for g in views if g.depth is not None)
    assert 0 < with_depth < total


def test_sparse_accumulation_equals_sample_features_per_view():
    """The Gram-matrix norm and the sparse (points x cells) product against grid_sample + normalise +
    index_add_, with samples on the border rows and columns (where grid_sample repeats the edge)."""
    from tttkd.pipeline.batched import accumulate
    from tttkd.pipeline.teacher import sample_features

    g = torch.Generator().manual_seed(0)
    stride, views, n = 8, 3, 500
    grids = torch.randn(views, 16, 5, 7, generator=g) + 0.3
    view_index = torch.randint(0, views, (2000,), generator=g)
    point_index = torch.randint(0, n, (2000,), generator=g)
    uv = torch.rand(2000, 2, generator=g) * torch.tensor([7 * stride + 6, 5 * stride + 6]) - 3  # past the edges too
    uv[:50, 0] = 7 * stride - 1  # the last pixel column
    result = torch.zeros(n, 16)
    accumulate(result, grids, view_index, point_index, uv, stride=stride)
    reference = torch.zeros(n, 16)
    for v in range(views):
        rows = view_index == v
        reference.index_add_(0, point_index[rows], sample_features(grids[v], uv[rows], stride=stride))
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-5)
    # rows sorted by point: the CSR matrix gives the same sums (the fast path's form), with weights
    order = torch.argsort(point_index * views + view_index, stable=True)
    weight = (torch.rand(2000, generator=g) > 0.3).float()
    for weights in (None, weight):
        coo, csr = torch.zeros(n, 16), torch.zeros(n, 16)
        accumulate(coo, grids, view_index, point_index, uv, stride=stride, weight=weights)
        accumulate(csr, grids, view_index[order], point_index[order], uv[order], stride=stride,
                   weight=None if weights is None else weights[order], point_sorted=True)
        torch.testing.assert_close(csr, coo, atol=1e-6, rtol=1e-6)


def test_point_major_candidates_are_the_same_rows_sorted_by_point():
    """`project_candidates(point_major=True)` (what the CSR accumulation needs): the view-major rows,
    each with the same uv and visibility, ordered by point then view."""
    from tttkd.pipeline.project import project_candidates

    rng = np.random.default_rng(3)
    coord = rng.uniform(-2, 2, (3000, 3)) * [1, 1, 0.5]
    views = random_views(rng, coord, 6)
    points = torch.from_numpy(coord)
    by_view = project_candidates(points, views, config=ProjectionConfig())
    by_point = project_candidates(points, views, config=ProjectionConfig(), point_major=True)
    order = torch.argsort(by_view.point_index * len(views) + by_view.view_index)
    for a, b in zip(by_point, by_view):
        assert torch.equal(a, b[order])
    assert len(by_point.point_index) > 100 and by_point.visible.any() and not by_point.visible.all()


def corrupt_one_image(root):
    """Truncate one colour JPEG: both paths must skip that view and count it the same way."""
    image = sorted((root / "scannet_frames_25k" / "scene0001_00" / "color").iterdir())[1]
    image.write_bytes(image.read_bytes()[:200])


@pytest.mark.parametrize("processes, codec", [(False, "fp16"), (True, "fp16"), (False, "int8"), (True, "int8")])
def test_cross_scene_batches_write_the_cache_of_the_per_scene_path(synth_root, tmp_path, processes, codec,
                                                                   monkeypatch, shared_block_use):
    """Batches that span scenes (batch 4, scenes of 2-3 views), decoding and writing in threads or in
    processes (SkippedView, DecodedView and the scene's arrays cross the process boundary; with
    processes, a window of 4 views and one scene loading ahead, so that later chunks and scenes come
    back through shared blocks and a scene's writing process reads its arrays there): same seen points in the same order, same view counts and skip counts, features with
    cosine >= 0.999. With int8, the batched path hands over codes made on its device, the per-scene
    path floats."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from tttkd.pipeline import batched, cache
    from tttkd.pipeline.batched import extract_scenes, process_pool
    from tttkd.pipeline.extract import PrepConfig, extract_scene
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    original, encoded = batched.int8_codes, []
    monkeypatch.setattr(batched, "int8_codes", lambda feature: encoded.append(len(feature)) or original(feature))
    root = Path(shutil.copytree(synth_root, tmp_path / "data"))
    corrupt_one_image(root)
    ids = ["scene0000_00", "scene0001_00", "scene0002_00", "scene0404_00"]  # the last one does not exist
    teacher = load_teacher("efficientnet_lite0", device="cpu")
    config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=4, feature_codec=codec)
    reader = ScanNetReader(root)
    stores = {}
    for path in ("per_scene", "batched"):
        stores[path] = tmp_path / f"{path}.zarr"
        cache.open_for_writing(stores[path], {"teacher": "efficientnet_lite0", "feature_codec": codec})
    reference = {s: extract_scene(reader, s, teacher=teacher, config=config, store=stores["per_scene"], split="x")
                 for s in ids}
    pool, writers = (process_pool(2), process_pool(1)) if processes else (ThreadPoolExecutor(2), 2)
    with pool:
        results = {r.scene_id: r for r in extract_scenes(reader, ids, teacher=teacher, config=config,
                                                         store=stores["batched"], split="x", pool=pool, writers=writers,
                                                         window=4 if processes else None)}
    if processes:
        writers.shutdown()
    use = shared_block_use
    assert use.chunks[0] is False and any(use.chunks) == processes  # a block only once sizes are known
    assert use.scenes == [False, False, processes, processes]  # the third load is the first after a result
    assert sorted(results) == sorted(ids)
    assert len(encoded) == (3 if codec == "int8" else 0)  # each written scene's codes made by the extracting process
    assert results["scene0404_00"].status == "failed" and "scene0404_00" in results["scene0404_00"].reason
    assert results["scene0001_00"].views_skipped == reference["scene0001_00"].views_skipped == {"unreadable image": 1}
    for s in ids[:3]:
        assert results[s].status == "done", results[s].reason
        assert (results[s].num_views, results[s].num_seen) == (reference[s].num_views, reference[s].num_seen)
        a, b = FeatureCache(stores["per_scene"]).read(s), FeatureCache(stores["batched"]).read(s)
        np.testing.assert_array_equal(a.seen_index, b.seen_index)
        np.testing.assert_array_equal(a.view_count, b.view_count)
        for name in ("coord", "color", "normal", "label"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(a.feature.astype(np.float32)),
                                                       torch.from_numpy(b.feature.astype(np.float32)), dim=1)
        assert cosine.min() >= 0.999, (s, float(cosine.min()))
        raw = zarr.open_array(stores["batched"] / "scenes" / s / "feature", mode="r")
        assert len(raw.metadata.codecs) == (4 if codec == "int8" else 3)  # the int8 filter, bytes, zstd, crc32c
        group = zarr.open_group(stores["batched"] / "scenes" / s, mode="r")
        assert group.attrs["complete"] is True and group.attrs["split"] == "x"


def test_a_decoding_task_places_what_fits_in_its_block_and_keeps_each_views_place(synth_root, tmp_path):
    """decode_chunk with a block that holds one view's image: that image comes back as where it lies
    (its bytes equal decode_view's), the next view's arrays through the pipe, an unreadable view as its
    SkippedView in its place; the chunk reads the placed image back and returns its block once each
    view is done."""
    import shutil
    from multiprocessing.shared_memory import SharedMemory

    from tttkd.pipeline import batched
    from tttkd.pipeline.extract import DecodedView, SkippedView, decode_view
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    root = Path(shutil.copytree(synth_root, tmp_path / "data"))
    corrupt_one_image(root)  # scene0001_00's second view
    views = ScanNetReader(root).read_views("scene0001_00").views[:3]
    spec = load_teacher("efficientnet_lite0", device="cpu").spec
    expected = [decode_view(views[0], image_scale=0.25, fit=spec), None, decode_view(views[2], image_scale=0.25, fit=spec)]
    blocks = batched.SharedBlocks(pin=False)
    block = blocks.take(expected[0].image.nbytes)
    try:
        outcomes = batched.decode_chunk(views, image_scale=0.25, fit=spec, block_name=block.name)
        assert isinstance(outcomes[0].image, batched._Placed) and isinstance(outcomes[1], SkippedView)
        assert outcomes[1].reason == "unreadable image"
        assert isinstance(outcomes[2].image, np.ndarray)  # the block is full
        done = Future()
        done.set_result(outcomes)
        chunk = batched._Chunk(None, views, done, block, blocks)
        read = chunk.outcomes()
        assert isinstance(read[0], DecodedView)
        np.testing.assert_array_equal(read[0].image, expected[0].image)
        np.testing.assert_array_equal(read[0].depth, expected[0].depth)  # no room left: through the pipe
        np.testing.assert_array_equal(read[2].image, expected[2].image)
        del read
        chunk.done(2)
        assert blocks.free == []
        chunk.done()
        assert blocks.free == [block]
    finally:
        blocks.close()
    assert blocks.made == {} and not Path("/dev/shm", block.name).exists()


SHARED_WRITES = """
import sys
from pathlib import Path
from tttkd.pipeline import cache
from tttkd.pipeline.batched import extract_scenes, process_pool
from tttkd.pipeline.extract import PrepConfig
from tttkd.pipeline.scannet import ScanNetReader
from tttkd.pipeline.teacher import load_teacher

root, store = Path(sys.argv[1]), Path(sys.argv[2])
config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=4)
cache.open_for_writing(store, {"teacher": "efficientnet_lite0"})
with process_pool(1) as pool, process_pool(1) as writers:
    results = list(extract_scenes(ScanNetReader(root), ["scene0000_00", "scene0001_00"],
                                  teacher=load_teacher("efficientnet_lite0", device="cpu"), config=config,
                                  store=store, split="x", pool=pool, writers=writers))
print(*(r.status for r in results))
"""


def _shared_memory_room() -> bool:
    from tttkd.pipeline.batched import _shm_room

    return _shm_room(0)


@pytest.mark.skipif(not _shared_memory_room(), reason="/dev/shm missing or under 1 GiB free: arrays go to the "
                                                      "writers through a pipe")
def test_writing_processes_leave_the_shared_memory_bookkeeping_to_its_creator(synth_root, tmp_path):
    """Scenes handed to writing processes through shared memory: written, every block unlinked, and
    the resource tracker the processes share prints nothing (a writer that unregistered a block made it
    print a KeyError traceback for each one when the creator unlinked it)."""
    import os
    import subprocess
    import sys

    before = set(os.listdir("/dev/shm"))
    run = subprocess.run([sys.executable, "-c", SHARED_WRITES, str(synth_root), str(tmp_path / "c.zarr")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["done", "done"]
    assert "KeyError" not in run.stderr and "leaked shared_memory" not in run.stderr, run.stderr[-2000:]
    assert not [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("psm_")]


@pytest.mark.parametrize("fault, message", [
    ("far", "scene0001_00: none of its 3 views sees any of its"),
    ("inf", "scene0001_00: no usable views ({'invalid pose': 3}"),
])
def test_the_batched_path_fails_a_scene_no_view_sees_with_one_line(synth_root, tmp_path, fault, message):
    """A scene's seen points are found in a writer thread: a scene none of whose views sees a point,
    or with no usable view, fails there with the per-scene path's one-line reason; the others finish."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from tttkd.pipeline import cache
    from tttkd.pipeline.batched import extract_scenes
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    root = Path(shutil.copytree(synth_root, tmp_path / "data"))
    for path in (root / "scannet_frames_25k" / "scene0001_00" / "pose").glob("*.txt"):
        pose = np.loadtxt(path)
        if fault == "far":
            pose[:3, 3] += 1000.0  # valid rigid poses, a kilometre away
        else:
            pose[:] = np.inf
        np.savetxt(path, pose)
    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, {"teacher": "efficientnet_lite0"})
    config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=4)
    with ThreadPoolExecutor(2) as pool:
        results = {r.scene_id: r for r in extract_scenes(
            ScanNetReader(root), ["scene0000_00", "scene0001_00", "scene0002_00"],
            teacher=load_teacher("efficientnet_lite0", device="cpu"), config=config, store=store, split="x",
            pool=pool, writers=1)}
    failed = results.pop("scene0001_00")
    assert failed.status == "failed" and message in failed.reason and "\n" not in failed.reason
    assert all(r.status == "done" for r in results.values())
    assert sorted(FeatureCache(store).scene_ids()) == ["scene0000_00", "scene0002_00"]


@pytest.mark.skipif(not _shared_memory_room(), reason="/dev/shm missing or under 1 GiB free")
def test_shared_blocks_are_reused_replaced_when_too_small_and_unlinked_at_close():
    """A scene's block goes back to the pool after its write and carries a later scene that fits; a
    larger scene replaces the largest free block instead of growing the pool; close unlinks them all,
    also one never given back, and `close(taken=False)` only the free ones."""
    import os

    from tttkd.pipeline.batched import SharedBlocks

    blocks = SharedBlocks(pin=False)
    first = blocks.take(1000)
    blocks.bytes(first)[:4].copy_(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
    blocks.give(first)
    again = blocks.take(900)
    assert again.name == first.name and blocks.bytes(again)[:4].tolist() == [1, 2, 3, 4]
    other = blocks.take(500)  # the only block is in use: a second one
    assert other.name != first.name
    blocks.give(again)
    blocks.give(other)
    larger = blocks.take(10_000)
    assert larger.size >= 10_000 and {first.name} & set(os.listdir("/dev/shm")) == set(), \
        "the largest free block (the first) was released for the larger scene"
    assert [b.name for b in blocks.free] == [other.name]
    blocks.give(larger)
    taken = blocks.take(100)  # `other`, never given back (a run that ended early)
    blocks.close(taken=False)  # a job's end while a task may still use its block: only the free ones
    assert larger.name not in os.listdir("/dev/shm") and taken.name in os.listdir("/dev/shm")
    blocks.close()
    assert {other.name, larger.name} & set(os.listdir("/dev/shm")) == set() and not blocks.free and not blocks.views
    assert blocks.made == {}


@pytest.mark.skipif(not _shared_memory_room(), reason="/dev/shm missing or under 1 GiB free")
def test_a_workers_shared_blocks_carry_the_scenes_of_its_later_groups(synth_root, tmp_path):
    """A job's worker passes its blocks to every group (extract_scenes call): the second group's scene
    travels in the first group's block, is written whole, and the blocks outlive both calls."""
    import os

    from tttkd.pipeline import cache
    from tttkd.pipeline.batched import SharedBlocks, extract_scenes, process_pool
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    teacher = load_teacher("efficientnet_lite0", device="cpu")
    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4)
    blocks, names = SharedBlocks(pin=False), []
    with process_pool(1) as pool, process_pool(1) as writers:
        for group in ("first", "second"):  # the same scene into two stores: the same bytes, so the same block fits
            store = tmp_path / f"{group}.zarr"
            cache.open_for_writing(store, {"teacher": "efficientnet_lite0"})
            results = list(extract_scenes(ScanNetReader(synth_root), ["scene0000_00"], teacher=teacher, config=config,
                                          store=store, split="x", pool=pool, writers=writers, blocks=blocks))
            assert [r.status for r in results] == ["done"], results[0].reason
            names.append(sorted(blocks.views))
    assert names[0] == names[1] and len(names[0]) == 1 and set(names[0]) <= set(os.listdir("/dev/shm"))
    first, second = FeatureCache(tmp_path / "first.zarr").read("scene0000_00"), \
        FeatureCache(tmp_path / "second.zarr").read("scene0000_00")
    np.testing.assert_array_equal(first.seen_index, second.seen_index)
    np.testing.assert_array_equal(first.feature, second.feature)
    blocks.close()
    assert not set(names[0]) & set(os.listdir("/dev/shm"))


@pytest.mark.skipif(not _shared_memory_room(), reason="/dev/shm missing or under 1 GiB free")
def test_no_write_differs_from_a_run_only_by_the_write(synth_root, tmp_path):
    """`bench extract --no-write` isolates what the zarr write costs: the scene still goes through a
    shared block (the copy out of the device is the same), and nothing is written or marked complete."""
    from tttkd.pipeline import cache
    from tttkd.pipeline.batched import SharedBlocks, extract_scenes, process_pool
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, {"teacher": "efficientnet_lite0"})
    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4)
    blocks = SharedBlocks(pin=False)
    with process_pool(1) as pool, process_pool(1) as writers:
        results = list(extract_scenes(ScanNetReader(synth_root), ["scene0000_00"], teacher=load_teacher(
            "efficientnet_lite0", device="cpu"), config=config, store=store, split="x", pool=pool, writers=writers,
            write=False, blocks=blocks))
    assert [r.status for r in results] == ["done"] and results[0].num_seen > 0
    assert len(blocks.views) == 1, "the scene did not travel through a shared block"
    blocks.close()
    assert cache.complete_scene_ids(store) == set() and not (store / "scenes" / "scene0000_00").exists()


@pytest.mark.parametrize("processes, cap, at_once", [(6, 16, 6), (6, 3, 3)])
def test_every_writing_process_gets_a_scene_at_once_up_to_the_cap(synth_root, tmp_path, monkeypatch, processes, cap,
                                                                  at_once):
    """One writer thread a writing process, at most WRITE_THREADS: with 4 threads for 16 processes
    the feeding thread waited for writers while 12 processes idled (9th session, an H200)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tttkd.pipeline import batched, cache
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    monkeypatch.setattr(batched, "WRITE_THREADS", cap)
    gate, lock, writing, most = threading.Barrier(at_once, timeout=60), threading.Lock(), [0], [0]

    def write(*args, **kwargs):  # a write that returns only once `at_once` scenes are being written together
        with lock:
            writing[0] += 1
            most[0] = max(most[0], writing[0])
        gate.wait()  # BrokenBarrierError, and a failed scene, if fewer writer threads than `at_once`
        with lock:
            writing[0] -= 1

    monkeypatch.setattr(batched, "_write_shared", write)
    monkeypatch.setattr(cache, "write_scene", write)  # where /dev/shm is too small for a block
    store = tmp_path / "c.zarr"
    cache.open_for_writing(store, {"teacher": "efficientnet_lite0"})
    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4)
    ids = ["scene0000_00", "scene0001_00", "scene0002_00"] * 2  # the writes are fake: a scene may come twice
    with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(processes) as writers:
        results = list(batched.extract_scenes(ScanNetReader(synth_root), ids, teacher=load_teacher(
            "efficientnet_lite0", device="cpu"), config=config, store=store, split="x", pool=pool, writers=writers))
    assert [r.status for r in results] == ["done"] * 6, [r.reason for r in results]
    assert most[0] == at_once


def test_writer_threads_go_to_the_runs_gpu_also_when_it_is_named_without_an_index(monkeypatch):
    # "cuda" alone is the current device: set_device needs its index (it refuses a bare "cuda")
    from tttkd.pipeline.batched import thread_on

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    assert thread_on(torch.device("cpu")) is None
    thread_on(torch.device("cuda"))()
    thread_on(torch.device("cuda:1"))()
    assert calls == [2, 1]


def test_the_benchs_host_costs_rewrite_a_scene_as_the_run_stored_it(synth_root, tmp_path):
    """`bench extract` times the host's own work after the run: a scene written again from what the
    run stored (int8: its codes) gives the same chunk files, and the bound adds decode and write."""
    from tttkd.pipeline.bench import host_costs
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4,
                        feature_codec="int8")
    store = tmp_path / "s.zarr"
    report = run_extraction(config, out=store, scene_ids=["scene0000_00"], workers=1, device="cpu", progress=False)
    assert report.done == ["scene0000_00"]
    host = host_costs(ScanNetReader(synth_root), "scene0000_00", config=config,
                      teacher=load_teacher("efficientnet_lite0", device="cpu"), store=store, scratch=tmp_path / "h.zarr",
                      views=4)

    def chunks(folder):
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    for name in ("feature", "seen_index", "coord", "view_count"):
        assert chunks(tmp_path / "h.zarr" / "scenes" / "scene0000_00_1" / name) == chunks(
            store / "scenes" / "scene0000_00" / name), name
    assert host["views_per_scene"] == FeatureCache(store).scene_attrs("scene0000_00")["num_views"]
    per_image = host["decode_ms_per_image"] / 1e3 + host["write_s_per_scene"] / host["views_per_scene"]
    assert host["decode_ms_per_image"] > 0 and host["write_s_per_scene"] > 0
    assert host["host_bound_images_per_s"] == pytest.approx(host["host_cores"] / per_image)
