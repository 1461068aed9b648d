"""The fast extraction path: many scenes as one stream of teacher batches (`tttkd-prep extract` on GPU).

`extract.extract_scene` does one scene at a time in numpy; at ScanNet sizes that leaves a GPU
idle most of the time (issue 8: 24 img/s end to end against 5,600 img/s for ViT-L alone). Here:
  - scenes are read (`load_scene`) and their views decoded (JPEG draft mode, depth PNG;
    `decode_chunk`, a few views a task) in a pool of processes, `window` views ahead of the
    teacher; scene arrays and decoded pixels come back through shared memory, not the tasks' pipe,
    and a scene's arrays go on from there to its writing process;
  - decoded views of any scene fill teacher batches (a batch may span scenes), so a scene with
    few views never runs a small batch;
  - uint8 pixels go to the device through pinned memory and are normalised there;
  - each scene's points go to the device once; projection, the depth test, feature sampling and
    the per-point accumulation are batched tensor ops (`project.project_candidates`, `accumulate`),
    with one host sync per scene and batch, on a stream of their own: it never waits for a teacher
    batch, so the GPU has the next batch queued while this thread prepares the one after;
  - a finished scene's arrays are copied to the host on a side stream by a writer thread and
    written by a pool of processes, through shared memory blocks reused from scene to scene and
    page-locked for CUDA (`SharedBlocks`; `cache.write_scene` marks the scene complete only after
    all its arrays).

Failures keep `extract_scene`'s contract: bad views are skipped and counted by reason, a bad scene
comes back failed with one line naming it, and the other scenes go on. A decoding or writing
process that dies breaks its pool: the BrokenExecutor raises out of `extract_scenes`, and the
caller, which owns the pools, replaces them (job.py).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import warnings
import zlib
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import cache
from .extract import (OUT_OF_MEMORY, DecodedView, PrepConfig, SceneResult, SkippedView, check_scene, decode_view,
                      select_views)
from .project import to_device, project_candidates
from .scene import DatasetReader, Scene, SceneReadError, View
from .teacher import Teacher

# accumulate's CSR matrix: one warning per process that the format is "beta" says nothing to a user
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)

DECODE_CHUNK = 4
"""Views a decoding task: each task's submit and result wake a thread of the extracting process,
which must take the interpreter lock from the thread feeding the GPU."""
LOADS_AHEAD = 8
"""Scenes loading in the pool ahead of the one whose views are being handed out (a load waits
behind up to `window` views of decoding in the pool's queue)."""
WRITE_THREADS = 16
"""At most this many scenes handed to the writing processes at once: one a process (each scene is
held on the GPU until copied out, and as many again may wait for a thread with their accumulators).
With 4 threads for 16 processes the feeding thread waited 2.5 s of 6.6 for writers (int8, an H200)."""
LEAD_BATCHES = 2
"""Teacher batches queued on the GPU ahead of the one being prepared: enough to keep it busy, few
enough that the host cannot run ahead with pinned buffers and scene accumulators."""


def accumulate(feature_sum: torch.Tensor, grids: torch.Tensor, view_index: torch.Tensor, point_index: torch.Tensor,
               uv: torch.Tensor, *, stride: int, weight: torch.Tensor | None = None, point_sorted: bool = False) -> None:
    """feature_sum[point] += weight * normalise(bilinear sample of grids[view] at uv), for every (view, point) row.

    The same numbers as `teacher.sample_features` per view followed by index_add_, without ever
    holding a (rows, D) tensor: a bilinear sample is a weighted sum of four grid cells, so the sum
    over views is one sparse (points x cells) matrix times the (cells, D) feature matrix. The
    normalisation needs only each sample's norm, |sum_c w_c g_c|^2 = sum_{c,c'} w_c w_c' <g_c, g_c'>,
    a quadratic form in the four weights whose dot products are precomputed once per cell and
    neighbour (grid_sample's border padding repeats the last row and column, so do these).

    Args:
        feature_sum: (N, D) float32 accumulator of one scene.
        grids: (V, D, h, w) feature grids of the views.
        view_index, point_index: (K,) int64 rows of project_views.
        uv: (K, 2) float32 pixel coordinates.
        weight: (K,) per row (0 drops a row without a host sync to compact them), default 1.
        point_sorted: the rows are sorted by point (`project_candidates(point_major=True)`): the
            matrix is then built in CSR form directly, where a COO matrix must first be coalesced
            (a sort, and on CUDA a host sync). The same sums.
    """
    v_count, _, h, w = grids.shape
    grids = grids.float()
    padded = F.pad(grids, (0, 1, 0, 1), mode="replicate")  # (V, D, h+1, w+1)
    here, right, down, diagonal = padded[:, :, :h, :w], padded[:, :, :h, 1:], padded[:, :, 1:, :w], padded[:, :, 1:, 1:]
    dots = lambda a, b: (a * b).sum(1).reshape(-1)  # (V*h*w,)
    square, dot_right, dot_down, dot_diagonal, dot_anti = (dots(here, here), dots(here, right), dots(here, down),
                                                            dots(here, diagonal), dots(right, down))
    # grid_sample's source coordinate with align_corners=False, border padding: clamp into the grid
    x = ((uv[:, 0] + 0.5) / stride - 0.5).clamp(0, w - 1)
    y = ((uv[:, 1] + 0.5) / stride - 0.5).clamp(0, h - 1)
    # the last column (row) interpolates from the one before it with weight 0, so the four cells of
    # a row are distinct and ascending, as a CSR matrix wants; the same values as x1 = x0 there
    x0, y0 = x.floor().clamp(max=max(w - 2, 0)), y.floor().clamp(max=max(h - 2, 0))
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    base = view_index * (h * w)
    cells = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1], 1)  # (K, 4)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)           # (K, 4)
    c00, c01, c10, _ = cells.unbind(1)
    w00, w01, w10, w11 = weights.unbind(1)
    norm2 = (weights.square() * square[cells]).sum(1) + 2 * (
        w00 * w01 * dot_right[c00] + w00 * w10 * dot_down[c00] + w00 * w11 * dot_diagonal[c00]
        + w01 * w10 * dot_anti[c00] + w01 * w11 * dot_down[c01] + w10 * w11 * dot_right[c10])
    coefficients = weights / norm2.clamp_min(0).sqrt().clamp_min(1e-12)[:, None]  # F.normalize's eps
    if weight is not None:
        coefficients = coefficients * weight[:, None]
    cell_features = grids.permute(0, 2, 3, 1).reshape(v_count * h * w, -1)  # (V*h*w, D)
    size = (feature_sum.shape[0], v_count * h * w)
    if point_sorted:  # a point's rows are its views in order: columns ascend within each CSR row
        crow = torch.searchsorted(point_index, torch.arange(size[0] + 1, device=point_index.device)) * 4
        matrix = torch.sparse_csr_tensor(crow, cells.reshape(-1), coefficients.reshape(-1), size,
                                         check_invariants=False)
        feature_sum.addmm_(matrix, cell_features)
        return
    matrix = torch.sparse_coo_tensor(torch.stack([point_index.repeat_interleave(4), cells.reshape(-1)]),
                                     coefficients.reshape(-1), size,
                                     check_invariants=False)  # indices are in range by construction
    feature_sum += torch.sparse.mm(matrix, cell_features)


@dataclass
class _SceneWork:
    """One scene in flight: its points on the device, its accumulators and its bookkeeping."""

    scene: Scene
    views: list[View]
    coord: torch.Tensor                    # (N, 3) float64 on the device
    view_count: torch.Tensor               # (N,) int32
    feature_sum: torch.Tensor | None = None  # (N, D) float32, allocated with the first grid
    remaining: int = 0                     # views not yet through the teacher (or skipped)
    used: int = 0
    skipped: dict = field(default_factory=dict)
    view_errors: dict = field(default_factory=dict)
    failed: str = ""
    finished: bool = False
    start: float = 0.0
    scene_block: SharedMemory | None = None  # where the scene's arrays lie (`load_scene`) until it is written
    scene_placed: dict | None = None


@dataclass(frozen=True)
class _Placed:
    """Where a decoding process left an array in its task's shared block."""

    offset: int
    shape: tuple
    dtype: str


def _aligned(nbytes: int) -> int:
    """An array's room in a shared block: every array starts 64-byte aligned."""
    return -(-nbytes // 64) * 64


def _place(arrays: dict[str, np.ndarray | None], block: SharedMemory | None, offset: int
           ) -> tuple[dict[str, _Placed], int]:
    """Copy each array that fits into `block` from `offset` on: name -> where it lies, and the next offset."""
    placed = {}
    for name, array in arrays.items():
        if block is None or array is None or offset + array.nbytes > block.size:
            continue  # no room: this one goes through the pipe
        np.copyto(np.ndarray(array.shape, array.dtype, buffer=block.buf, offset=offset), array)
        placed[name] = _Placed(offset, array.shape, array.dtype.str)
        offset += _aligned(array.nbytes)
    return placed, offset


def _in_place(buffer, placed: dict[str, _Placed]) -> dict[str, np.ndarray]:
    """The placed arrays, read where they lie (no copy)."""
    return {name: np.ndarray(p.shape, np.dtype(p.dtype), buffer=buffer, offset=p.offset) for name, p in placed.items()}


def _padded_nbytes(arrays) -> int:
    return sum(_aligned(a.nbytes) for a in arrays if isinstance(a, np.ndarray))


def decode_chunk(views: list[View], *, image_scale: float, fit, block_name: str | None = None
                 ) -> list[DecodedView | SkippedView]:
    """`decode_view` for a few views of a scene, in a decoding process; a view that cannot be used
    comes back as its SkippedView, in its place. With a shared block (`_Chunk`), each image and depth
    image that fits goes into it and only where it lies crosses the pipe: a decoded ScanNet view is
    0.85 MB, which the extracting process would unpickle in a thread that takes the interpreter lock
    from the one feeding the GPU (on a 2-core CPU: 2 ms alone, 56 ms beside a busy thread)."""
    block = attach_shared(block_name) if block_name else None
    results: list[DecodedView | SkippedView] = []
    offset = 0
    try:
        for view in views:
            try:
                decoded = decode_view(view, image_scale=image_scale, fit=fit)
            except SkippedView as e:
                results.append(e)
                continue
            placed, offset = _place({"image": decoded.image, "depth": decoded.depth}, block, offset)
            results.append(replace(decoded, **placed))
    finally:
        if block is not None:
            block.close()
    return results


class _Chunk:
    """One decoding task in flight: its views, and its shared block, which goes back to the run's
    blocks once each of its views has been through the teacher (their pixels are copied into a
    batch there) or skipped."""

    def __init__(self, work: _SceneWork, views: list[View], future: Future, block: SharedMemory | None,
                 blocks: SharedBlocks):
        self.work, self.views, self.future, self.block, self.blocks = work, views, future, block, blocks
        self.left = len(views)

    def outcomes(self) -> list[DecodedView | SkippedView]:
        """The task's results, their placed arrays read in place from the block."""
        outcomes = self.future.result()
        if self.block is None:
            return outcomes
        return [replace(o, **_in_place(self.block.buf, {name: getattr(o, name) for name in ("image", "depth")
                                                        if isinstance(getattr(o, name), _Placed)}))
                if isinstance(o, DecodedView) else o for o in outcomes]

    def done(self, count: int = 1) -> None:
        self.left -= count
        if self.left == 0 and self.block is not None:
            self.blocks.give(self.block)
            self.block = None


def process_pool(workers: int) -> Executor:
    """Processes for the CPU work around the GPU: decoding views (Pillow holds the GIL for part of a
    decode) and writing scenes. Writes must not run in threads of the extracting process: zarr's
    encoding (zstd, crc32c, its event loop) holds the GIL in long stretches, and the thread that
    feeds the GPU, which re-takes the GIL after every kernel launch, then waits each time (on an
    H200: 0.77 s a batch of 64 instead of 0.16 s). A daemonic process (a default Dask worker) may
    not start children: there it is threads."""
    if workers <= 0 or multiprocessing.current_process().daemon:
        return ThreadPoolExecutor(max(1, workers))
    context = multiprocessing.get_context("forkserver")  # no fork of a process that holds CUDA and threads
    context.set_forkserver_preload(["tttkd.pipeline.extract"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with, initargs=(os.getpid(),))


def exit_with(owner: int) -> None:
    """A pool process's initializer: end this process when the pool's owner has ended. The processes
    come from the forkserver, not from their owner, and wait on their call queue for good if the owner
    ends without shutting the pool down (a Dask worker stopped by its nanny, a killed job); they would
    also keep the forkserver and the resource tracker alive, and the tracker unlinks leaked
    shared-memory blocks only when it stops."""
    try:
        handle = os.pidfd_open(owner)  # Linux 5.3+: readable once the owner has ended, whatever its pid becomes
    except (AttributeError, OSError):
        handle = None

    def watch() -> None:
        if handle is not None:
            import select

            waiting = select.poll()  # not select.select: it refuses descriptors above 1023
            waiting.register(handle, select.POLLIN)
            waiting.poll()
            os._exit(0)
        while True:  # elsewhere: poll the pid
            time.sleep(1.0)
            try:
                os.kill(owner, 0)
            except (ProcessLookupError, PermissionError):  # gone, or another user's (the pid was reused)
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def thread_on(device: torch.device):
    """A thread initializer that puts the thread on `device` (None off CUDA). A thread starts on the
    process's default device, where CUDA calls without a tensor (cudaHostRegister) would open a
    context on another GPU. "cuda" without an index is this thread's current device, resolved here."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return lambda: torch.cuda.set_device(index)


class _Run:
    """The state of one `extract_scenes` call (see there)."""

    def __init__(self, teacher: Teacher, config: PrepConfig, store: Path, split: str | None, pool: Executor,
                 writers: int | Executor, write: bool, blocks: SharedBlocks | None):
        self.teacher, self.config, self.store, self.split, self.pool = teacher, config, store, split, pool
        self.device = teacher.device
        cuda = self.device.type == "cuda"
        self.buffers: dict[tuple, list] = {}  # image shape -> [(work, decoded)] waiting for a batch
        # zarr writes behind the GPU, several scenes at once (zstd of ~130 MB of features a 150k-point
        # ViT-L scene is the cost): these threads wait for the copies to the host, then write here
        # or hand the arrays to a pool of writing processes (`process_pool`)
        self.write_processes = writers if isinstance(writers, Executor) else None
        # a thread per writing process keeps each busy; `_max_workers` is what both of
        # concurrent.futures' executors were given
        threads = min(getattr(writers, "_max_workers", 4), WRITE_THREADS) if self.write_processes else writers
        self.writer = ThreadPoolExecutor(threads, initializer=thread_on(self.device))
        self.write = write
        self.timings = {"load": 0.0, "decode": 0.0, "batches": 0.0, "finish": 0.0, "drain": 0.0, "other": 0.0}
        self.writes: deque[tuple[_SceneWork, Future]] = deque()
        self.max_pending = 2 * threads  # scenes handed to the writers and not yet written
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        # pca-int8 (a store that has its basis): scenes are projected and encoded on the device
        basis = cache.FeatureCache(store).basis if config.feature_codec == "pca-int8" else None
        self.basis = None if basis is None else to_device(basis, self.device)
        self.own_blocks = blocks is None  # else the caller's, kept across calls (a Dask worker's)
        self.blocks = SharedBlocks(pin=cuda) if blocks is None else blocks
        # decoded pixels and loaded scenes come back through these (`decode_chunk`, `load_scene`),
        # sized from the first results; a thread pool (in a daemonic Dask worker) hands its arrays over
        shared = isinstance(pool, ProcessPoolExecutor)
        self.decode_blocks, self.chunk_bytes = (SharedBlocks(pin=False) if shared else None), 0
        self.scene_blocks, self.scene_bytes = (SharedBlocks(pin=False) if shared else None), 0
        # projection on a stream of its own, high priority: its host sync waits for it alone
        self.project_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self.queued: deque[torch.cuda.Event] = deque()  # the teacher batches on the GPU, oldest first

    def projecting(self):
        return torch.cuda.stream(self.project_stream) if self.project_stream is not None else nullcontext()

    def load(self, reader: DatasetReader, scene_id: str) -> tuple[SharedMemory | None, Future]:
        block = None
        if self.scene_blocks is not None and self.scene_bytes:
            block = self.scene_blocks.take(self.scene_bytes)
        return block, self.pool.submit(load_scene, reader, scene_id, self.config,
                                       block.name if block is not None else None)

    def release_scene(self, work: _SceneWork) -> None:
        if work.scene_block is not None:
            self.scene_blocks.give(work.scene_block)
            work.scene_block = None

    def decode(self, work: _SceneWork, views: list[View]) -> _Chunk:
        block = None
        if self.decode_blocks is not None and self.chunk_bytes:
            block = self.decode_blocks.take(self.chunk_bytes)  # None if /dev/shm has no room: through the pipe
        future = self.pool.submit(decode_chunk, views, image_scale=self.config.image_scale, fit=self.teacher.spec,
                                  block_name=block.name if block is not None else None)
        return _Chunk(work, views, future, block, self.decode_blocks)

    def learn_chunk_bytes(self, outcomes: list) -> None:
        """A shared block per task holds DECODE_CHUNK views of the largest size seen so far."""
        if self.decode_blocks is None:
            return
        sizes = [_padded_nbytes((o.image, o.depth)) for o in outcomes if isinstance(o, DecodedView)]
        self.chunk_bytes = max([self.chunk_bytes] + [size * DECODE_CHUNK for size in sizes])

    def add(self, work: _SceneWork, decoded: DecodedView, chunk: _Chunk) -> None:
        buffer = self.buffers.setdefault(decoded.image.shape, [])
        buffer.append((work, decoded, chunk))
        if len(buffer) == self.config.batch_size:
            self.run_batch(self.buffers.pop(decoded.image.shape))

    def flush(self) -> None:
        for shape in list(self.buffers):
            self.run_batch(self.buffers.pop(shape))

    def run_batch(self, items: list[tuple[_SceneWork, DecodedView, _Chunk]]) -> None:
        live = [item for item in items if not item[0].failed]
        tick = time.perf_counter()
        try:
            if live:
                self._teacher_and_accumulate(live)
        except OUT_OF_MEMORY as e:
            where = "GPU" if isinstance(e, torch.cuda.OutOfMemoryError) else "host"
            for work, _, _ in live:
                work.failed = (f"{type(e).__name__}: scene {work.scene.scene_id}: out of {where} memory "
                               f"({work.scene.num_points} points, {len(work.views)} views, batch size "
                               f"{self.config.batch_size}); lower --batch-size, or split the scene into parts")
                work.feature_sum = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.timings["batches"] += time.perf_counter() - tick
        for work, _, chunk in items:
            chunk.done()  # the batch has copied its pixels and depth images: the block can be reused
            work.remaining -= 1
            self.maybe_finish(work)

    def _teacher_and_accumulate(self, items: list[tuple[_SceneWork, DecodedView, _Chunk]]) -> None:
        teacher = self.teacher
        by_scene: dict[int, list[int]] = {}
        for i, (work, _, _) in enumerate(items):
            by_scene.setdefault(id(work), []).append(i)
        # first the projections, on their stream (each syncs for its number of pairs: that waits for
        # the projection alone, while the batches queued before this one keep the GPU busy); hidden
        # pairs stay in, weighted 0: compacting them would be another sync
        projected = []
        with self.projecting():
            for rows in by_scene.values():
                work = items[rows[0]][0]
                projected.append((work, rows, project_candidates(work.coord, [items[i][1] for i in rows],
                                                                 point_major=True, config=self.config.projection)))
        if len(self.queued) >= LEAD_BATCHES:  # the host stays at most LEAD_BATCHES ahead of the GPU
            self.queued.popleft().synchronize()
        pixels = to_device(np.stack([d.image for _, d, _ in items]), self.device)  # (B, H, W, 3) uint8
        grids = teacher.features(teacher.prepare_batch(pixels))  # (B, D, h, w)
        if self.project_stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.project_stream)
            for _, _, candidates in projected:
                for tensor in candidates:  # made on the projection stream, read on this one
                    tensor.record_stream(main)
        for work, rows, (view_index, point_index, uv, visible) in projected:
            if work.feature_sum is None:
                work.feature_sum = torch.zeros(work.scene.num_points, grids.shape[1], device=self.device)
            if len(point_index):
                contiguous = rows == list(range(rows[0], rows[0] + len(rows)))  # the usual case: no index copy
                views = grids[rows[0]: rows[0] + len(rows)] if contiguous else grids[to_device(np.array(rows), self.device)]
                accumulate(work.feature_sum, views, view_index, point_index, uv, stride=teacher.stride,
                           weight=visible.float(), point_sorted=True)
                work.view_count.index_add_(0, point_index, visible.int())
            work.used += len(rows)
        if self.project_stream is not None:
            self.queued.append(torch.cuda.Event())
            self.queued[-1].record(torch.cuda.current_stream(self.device))

    def maybe_finish(self, work: _SceneWork) -> None:
        """Once all of a scene's views are through: hand it to a writer thread, which finds its seen
        points and mean features and writes them. Finding the seen points waits for the scene's last
        batch on the GPU (a host sync); in a writer thread the main thread goes on feeding the GPU."""
        if work.remaining or work.finished:
            return
        work.finished = True
        tick = time.perf_counter()
        if work.failed or work.used == 0:
            reason = work.failed or (f"SceneReadError: scene {work.scene.scene_id}: no usable views ({work.skipped}; "
                                     f"first: {next(iter(work.view_errors.values()))})")
            work.feature_sum = work.coord = work.view_count = None  # the device memory goes back now
            self.writes.append((work, _done(SceneResult(work.scene.scene_id, "failed", reason=reason,
                                                        views_skipped=work.skipped, view_errors=work.view_errors,
                                                        seconds=time.perf_counter() - work.start))))
            return
        # each scene waiting for a writer holds its (N, D) accumulator on the GPU: at most `max_pending`
        pending = [future for _, future in self.writes if not future.done()]
        if len(pending) >= self.max_pending:
            wait_for(pending, return_when=FIRST_COMPLETED)
        self.writes.append((work, self.writer.submit(self._finish_and_write, work)))
        self.timings["finish"] += time.perf_counter() - tick

    def _finish_and_write(self, work: _SceneWork) -> SceneResult:
        """In a writer thread: the scene's seen points in a seeded order, their mean features and view
        counts, then `_write`."""
        scene_id = work.scene.scene_id
        try:
            seen = torch.nonzero(work.view_count).squeeze(1)
            if len(seen) == 0:
                raise SceneReadError(f"scene {scene_id}: none of its {work.used} views sees any of its "
                                     f"{work.scene.num_points} points; check the poses and intrinsics, and that points "
                                     "and poses share a frame")
            # the same seeded order as extract_scene: any contiguous block of rows is a uniform sample
            order = np.random.default_rng([self.config.seed, zlib.crc32(scene_id.encode())]).permutation(len(seen))
            seen = seen[to_device(order, self.device)]
            counts = work.view_count[seen]
            mean = (work.feature_sum[seen] / counts[:, None].float()).half()  # fp16: what the cache stores
            feature_attrs = {}
            if self.config.feature_codec == "int8":  # encoded here: half the bytes to copy, no encoding on the host
                mean = int8_codes(mean)
            elif self.basis is not None:  # pca-int8: K bytes a point to copy; write_scene would project on the host
                mean, feature_attrs = pca_codes(mean, self.basis)
            arrays = {"seen_index": seen.int(), "feature": mean, "view_count": counts}
            if self.copy_stream is not None:  # the copies to the host wait for these on the side stream
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        except (OSError, ValueError, RuntimeError) as e:
            return SceneResult(scene_id, "failed", reason=f"{type(e).__name__}: {e}", views_skipped=work.skipped,
                               view_errors=work.view_errors, seconds=time.perf_counter() - work.start)
        finally:
            work.feature_sum = work.coord = work.view_count = None  # the device memory goes back now
        return self._write(work, arrays, work.start, feature_attrs)

    def _write(self, work: _SceneWork, arrays: dict[str, torch.Tensor], start: float,
               feature_attrs: dict) -> SceneResult:
        """In a writer thread: the scene's arrays to the host (on the side stream, so the GPU's
        work queue never waits for a copy), then into the store, here or in a writing process."""
        scene = work.scene
        block = None
        try:
            layout, nbytes = _layout(arrays)
            if self.write_processes is not None:  # with --no-write too: it must differ only by the write
                block = self.blocks.take(nbytes)  # None: /dev/shm is too small, the arrays go through a pipe
            host = {}
            with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext():
                for name, tensor in arrays.items():
                    if block is not None:  # straight into shared memory: the writing process reads it without a copy
                        offset, size = layout[name][0], tensor.numel() * tensor.element_size()
                        self.blocks.bytes(block)[offset: offset + size].view(tensor.dtype).copy_(tensor.flatten())
                    else:
                        host[name] = tensor.cpu().numpy()
            arrays.clear()  # the device memory can go
            options = dict(feature_codec=self.config.feature_codec,
                           attrs={"split": self.split, "num_views": work.used, "views_skipped": work.skipped,
                                  "view_errors": work.view_errors, **feature_attrs})
            if not self.write:
                pass
            elif block is not None:  # the scene's arrays too, from its block if they all lie there
                shared = work.scene_block is not None and len(work.scene_placed) == len(SCENE_ARRAYS)
                described = _SharedScene(scene.scene_id, work.scene_block.name, work.scene_placed) if shared else scene
                self.write_processes.submit(_write_shared, self.store, described, block.name, layout, **options).result()
            elif self.write_processes is not None:
                self.write_processes.submit(cache.write_scene, self.store, scene, **host, **options).result()
            else:
                cache.write_scene(self.store, scene, **host, **options)
        except (OSError, ValueError) as e:
            return SceneResult(scene.scene_id, "failed", reason=f"{type(e).__name__}: {e}", views_skipped=work.skipped,
                               view_errors=work.view_errors, seconds=time.perf_counter() - start)
        finally:
            if block is not None:
                self.blocks.give(block)
        num_seen = layout["seen_index"][1][0]
        return SceneResult(scene.scene_id, "done", num_points=scene.num_points, num_seen=num_seen, num_views=work.used,
                           views_skipped=work.skipped, view_errors=work.view_errors,
                           seconds=time.perf_counter() - start)

    def finished(self, *, wait: bool) -> Iterator[SceneResult]:
        """Results of written scenes, in order; with `wait`, all of them."""
        while self.writes and (wait or self.writes[0][1].done()):
            work, future = self.writes.popleft()
            if work is not None:
                self.release_scene(work)
            yield future.result()


def int8_codes(feature: torch.Tensor) -> torch.Tensor:
    """`cache.Int8Filter`'s encoding on the device: round(127 x) of float16 x, computed in float32 and
    clipped to +-127; the same bytes as the filter's (tests/test_codecs.py)."""
    return feature.half().float().mul_(127).clamp_(-127, 127).round_().to(torch.int8)


def pca_codes(feature: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """pca-int8 on the device, as `cache.write_scene` does it on the host: the (M, K) coefficients
    c = B^T f of the float16 features as int8 codes, and what the basis keeps of them,
    cos(B B^T f, f) = |c| / |f|, as the scene's `pca_cosine_mean` / `pca_cosine_min`."""
    feature = feature.half().float()
    coefficients = feature @ basis
    norm = feature.norm(dim=1)
    kept = coefficients.norm(dim=1)[norm > 0] / norm[norm > 0]
    stats = torch.stack([kept.mean(), kept.min()]).tolist() if len(kept) else [1.0, 1.0]  # in a writer thread
    return int8_codes(coefficients), {"pca_cosine_mean": stats[0], "pca_cosine_min": stats[1]}


def _layout(arrays: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[int, tuple, str]], int]:
    """Where each array sits in one shared block: name -> (byte offset, shape, dtype), and the bytes in all."""
    layout, offset = {}, 0
    for name, tensor in arrays.items():
        layout[name] = (offset, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        offset += _aligned(tensor.numel() * tensor.element_size())
    return layout, max(offset, 64)


def _shm_room(nbytes: int) -> bool:
    """Whether /dev/shm has room for a block of `nbytes` twice over (a container's default is 64 MB,
    and a full one kills the writer with SIGBUS instead of raising): else the arrays go through a pipe."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize > 2 * nbytes + (1 << 30)


class SharedBlocks:
    """The shared-memory blocks that carry finished scenes to the writing processes, reused from scene
    to scene and, on CUDA, page-locked once (cudaHostRegister), so that a scene's copy to the host is
    one DMA. Into a fresh pageable block per scene the copies ran at 1.2 GB/s (page faults and the
    driver's staging buffer): 0.45 of every 1.0 s of an H200's extraction (profiled 2026-11-26)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.lock = threading.Lock()
        self.free: list[SharedMemory] = []
        self.made: dict[str, SharedMemory] = {}  # every block not yet released, free or taken
        self.views: dict[str, torch.Tensor] = {}  # block name -> its bytes as a tensor (the pinned address)
        self.pinned: set[str] = set()

    def take(self, nbytes: int) -> SharedMemory | None:
        """A free block of at least `nbytes`, or a new one; None when /dev/shm has no room for it."""
        with self.lock:
            fitting = [b for b in self.free if b.size >= nbytes]
            if fitting:
                block = min(fitting, key=lambda b: b.size)
                self.free.remove(block)
                return block
            smaller = max(self.free, key=lambda b: b.size, default=None)
            if smaller is not None:  # a scene larger than any free block: its place goes to the new one
                self.free.remove(smaller)
                self._release(smaller)
        if not _shm_room(nbytes):
            return None
        block = SharedMemory(create=True, size=nbytes + nbytes // 4)  # room for a somewhat larger scene later
        with self.lock:
            self.made[block.name] = block  # first: `close` releases it whatever happens next
        view = torch.frombuffer(block.buf, dtype=torch.uint8)
        with self.lock:
            self.views[block.name] = view
        if self.pin:
            if _page_lock(view):
                self.pinned.add(block.name)
            else:
                self.pin = False  # warned once; the copies still work, through pageable memory
        return block

    def bytes(self, block: SharedMemory) -> torch.Tensor:
        return self.views[block.name]

    def give(self, block: SharedMemory) -> None:
        with self.lock:
            self.free.append(block)

    def close(self, *, taken: bool = True) -> None:
        """Unlinks every block, also those not given back (a run that ended early), once nothing
        reads or writes them: arrays made on a block (`np.ndarray(buffer=...)`) do not keep it
        mapped, so reading one after its block is released is a segfault. With `taken=False`, only
        the free blocks (a job ending while some task may still be using the others: those go when
        the resource tracker stops)."""
        with self.lock:
            for block in list(self.made.values()) if taken else list(self.free):
                self._release(block)
            self.free.clear()

    def _release(self, block: SharedMemory) -> None:
        del self.made[block.name]
        view = self.views.pop(block.name, None)
        if view is not None and block.name in self.pinned:
            self.pinned.discard(block.name)
            torch.cuda.cudart().cudaHostUnregister(view.data_ptr())
        del view  # torch.frombuffer's export: the block cannot close while the tensor holds it
        try:
            block.unlink()  # first: the name goes from /dev/shm even if a lingering export keeps the mapping
        except FileNotFoundError:  # already gone (unlinked by the resource tracker)
            pass
        try:
            block.close()
        except BufferError:  # still exported somewhere: the mapping goes when that does
            pass


def _page_lock(view: torch.Tensor) -> bool:
    """cudaHostRegister: CUDA copies into this host memory by DMA. False (with a warning) if it cannot."""
    portable = 1  # cudaHostRegisterPortable: page-locked for every CUDA context of the process
    error = torch.cuda.cudart().cudaHostRegister(view.data_ptr(), view.numel(), portable)
    if int(error) == 0:
        return True
    warnings.warn(f"could not page-lock a {view.numel() >> 20} MiB shared-memory block for CUDA copies "
                  f"({error}); copying through pageable memory", RuntimeWarning)
    return False


def attach_shared(name: str) -> SharedMemory:
    """A block the extracting process created and will unlink, opened in one of its writing processes.
    Those come from `process_pool`'s forkserver and share the creator's resource tracker, so they must
    not unregister the block: that drops the creator's record, and its `unlink` then makes the
    tracker print a KeyError traceback for every scene."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    return SharedMemory(name=name)  # registers it again with the shared tracker: a set, so a no-op


def _write_shared(store: Path, scene: Scene | _SharedScene, block_name: str, layout: dict[str, tuple[int, tuple, str]],
                  **options) -> bool:
    """`cache.write_scene` in a writing process, reading the arrays from one shared memory block
    (`_layout`), and the scene's from its own block if it lies in one (`load_scene`)."""
    block = attach_shared(block_name)
    scene_block = attach_shared(scene.block_name) if isinstance(scene, _SharedScene) else None
    try:
        views = {name: np.ndarray(shape, dtype=np.dtype(dtype), buffer=block.buf, offset=offset)
                 for name, (offset, shape, dtype) in layout.items()}
        if scene_block is not None:
            scene = Scene(scene.scene_id, **_in_place(scene_block.buf, scene.placed))
        written = cache.write_scene(store, scene, **views, **options)
        del views, scene
        return written
    finally:
        block.close()
        if scene_block is not None:
            scene_block.close()


def _done(result: SceneResult) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


SCENE_ARRAYS = ("coord", "color", "normal", "label")


@dataclass(frozen=True)
class _SharedScene:
    """A scene whose arrays lie in a shared block: what a writing process needs to read it there."""

    scene_id: str
    block_name: str
    placed: dict


def load_scene(reader: DatasetReader, scene_id: str, config: PrepConfig, block_name: str | None = None
               ) -> tuple[dict, list[View], dict]:
    """A scene's arrays, its selected views and the views skipped, in a decoding process (a 150k-point
    scene takes 10-25 ms of Python and numpy: in a thread of the extracting process it held the
    interpreter lock against the feeding thread, and one such thread could not keep up with a GPU
    that needs 11 ms a scene). The arrays go into the shared block where they fit (`_place`)."""
    scene = reader.read_scene(scene_id)
    check_scene(scene, tuple(reader.class_names))
    view_set = reader.read_views(scene_id)
    views = select_views(view_set.views, config.max_views, seed=config.seed, scene_id=scene_id)
    if not views:
        raise SceneReadError(f"scene {scene_id}: no usable views ({view_set.skipped or 'none found'})")
    arrays = {name: getattr(scene, name) for name in SCENE_ARRAYS}
    if block_name:
        block = attach_shared(block_name)
        try:
            arrays.update(_place(arrays, block, 0)[0])
        finally:
            block.close()
    return arrays, views, dict(view_set.skipped)


def extract_scenes(reader: DatasetReader, scene_ids: list[str], *, teacher: Teacher, config: PrepConfig, store: Path,
                   split: str | None, pool: Executor, window: int | None = None, writers: int | Executor = 4,
                   write: bool = True, timings: dict | None = None,
                   blocks: SharedBlocks | None = None) -> Iterator[SceneResult]:
    """Extract `scene_ids` into the store as one stream of teacher batches; yield each scene's result
    once it is written (or failed). The cache equals `extract_scene`'s scene by scene (same seen
    points, view counts and row order; features to float rounding).

    Args:
        pool: decodes views (see `process_pool`); the caller owns it, so it outlives one call.
        window: views decoding ahead of the teacher (default 4 batches).
        writers: threads writing finished scenes, or an executor (`process_pool`) to write them in.
        write: False skips the zarr write (everything else runs): `tttkd bench extract --no-write`
            isolates what the write costs. Nothing is marked complete then.
        blocks: shared-memory blocks to carry scenes to the writing processes, reused across calls
            (a job's worker keeps one set: page-locking a new block costs more than its copy);
            default: this call's own, unlinked when it ends.
        timings: if given, filled with seconds of this thread's wall time by what it waited on:
            "load" (a scene's points and views from the pool, and their copy to the device), "decode" (a decoded view), "batches" (teacher, projection, sampling; the GPU,
            as kernels are queued until a host sync), "finish" (seen points, mean, copies),
            "drain" (the writes still running after the last batch), and "other": the rest (its
            own Python, handing views to the decoding pool, and the interpreter lock it shares with
            this process's other threads). The bench reports them.
    """
    began = time.perf_counter()
    window = window or 4 * config.batch_size
    run = _Run(teacher, config, Path(store), split, pool, writers, write, blocks)
    # scenes load in the pool, LOADS_AHEAD of the one whose views are being handed out
    loads = deque((s, run.load(reader, s)) for s in scene_ids[:LOADS_AHEAD])
    upcoming = iter(scene_ids[LOADS_AHEAD:])
    decoding: deque[_Chunk] = deque()
    views_decoding = 0
    pending: tuple[_SceneWork, list[View]] | None = None  # a scene's views not yet handed to the pool
    try:
        while loads or pending or decoding:
            # keep `window` views decoding: take views of the next scene when this one's are all submitted
            while views_decoding < window and (pending or loads):
                if not pending:
                    scene_id, loading = loads.popleft()
                    following = next(upcoming, None)
                    if following is not None:
                        loads.append((following, run.load(reader, following)))
                    tick = time.perf_counter()
                    work = _start_scene(loading, scene_id, run)
                    run.timings["load"] += time.perf_counter() - tick
                    pending = (work, list(work.views)) if work is not None else None
                    continue
                work, views = pending
                decoding.append(run.decode(work, views[:DECODE_CHUNK]))
                views_decoding += len(decoding[-1].views)
                pending = (work, views[DECODE_CHUNK:]) if len(views) > DECODE_CHUNK else None
            if decoding:
                chunk = decoding.popleft()
                views_decoding -= len(chunk.views)
                tick = time.perf_counter()
                outcomes = chunk.outcomes()
                run.timings["decode"] += time.perf_counter() - tick
                run.learn_chunk_bytes(outcomes)
                work = chunk.work
                for outcome in outcomes:
                    if isinstance(outcome, SkippedView):  # counted by reason; the scene goes on with its other views
                        work.skipped[outcome.reason] = work.skipped.get(outcome.reason, 0) + 1
                        work.view_errors.setdefault(outcome.reason, str(outcome))
                        chunk.done()
                        work.remaining -= 1
                        run.maybe_finish(work)
                    else:
                        run.add(work, outcome, chunk)
            elif not loads and not pending:
                break
            yield from run.finished(wait=False)
        run.flush()
        tick = time.perf_counter()
        yield from run.finished(wait=True)
        run.timings["drain"] += time.perf_counter() - tick
        run.timings["other"] = max(0.0, time.perf_counter() - began - sum(run.timings.values()))
        if timings is not None:
            timings.update(run.timings)
    finally:
        for future in [f for _, (_, f) in loads] + [chunk.future for chunk in decoding]:
            future.cancel()  # a run that ended early leaves no work in a pool the caller keeps
        run.writer.shutdown(wait=True)
        if run.own_blocks:
            run.blocks.close()
        for blocks in (run.decode_blocks, run.scene_blocks):
            if blocks is not None:
                blocks.close()


def _start_scene(loading: tuple[SharedMemory | None, Future], scene_id: str, run: _Run) -> _SceneWork | None:
    """A loaded scene's work on the device, or None after recording why it failed."""
    start = time.perf_counter()
    block, future = loading
    try:
        arrays, views, skipped = future.result()
    except (OSError, ValueError) as e:  # SceneReadError, PlyError, ...
        if block is not None:
            run.scene_blocks.give(block)
        run.writes.append((None, _done(SceneResult(scene_id, "failed", reason=f"{type(e).__name__}: {e}",
                                                   seconds=time.perf_counter() - start))))
        return None
    placed = {name: a for name, a in arrays.items() if isinstance(a, _Placed)}
    if block is not None:
        arrays = {**arrays, **_in_place(block.buf, placed)}
    if run.scene_blocks is not None:
        run.scene_bytes = max(run.scene_bytes, _padded_nbytes(arrays.values()))
    scene = Scene(scene_id, **arrays)
    with run.projecting():  # the scene's points go once, on the stream that projects them
        coord = to_device(scene.coord.astype(np.float64), run.device)
    return _SceneWork(scene, views, coord, torch.zeros(scene.num_points, dtype=torch.int32, device=run.device),
                      remaining=len(views), skipped=skipped, start=start, scene_block=block, scene_placed=placed)
