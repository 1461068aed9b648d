"""Cache -> voxelised, augmented `Batch` (the trainer's only view of the data; never the raw dataset
or the 2D model).

Per training sample: read a scene's points from the cache, augment (augment.py), with p = 0.5 overlay
a second scene (Mix3D), voxelise at `voxel_size_m` keeping one random point per voxel, then pick
`kd_points` voxels whose point has a cached teacher feature and read just those feature rows.
At evaluation every original point takes the prediction of its voxel (`EvalScene.point_to_voxel`).

The input path is built so that training does not wait for it: each loader worker keeps the
scenes it decoded in memory while they fit in `memory_mb` (a training split of a few hundred
scenes is read from disk once per worker), elastic distortion is vectorised, and KD targets travel
to the GPU as the cache's float16 (half the bytes through shared and pinned memory). The
reference path (`reference=True`: no memory, the original elastic loop, float32 targets) gives the
same samples and is what `tttkd bench train` compares against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tttkd.pipeline.cache import CachedScene, FeatureCache

from .augment import NO_AUGMENTATION, AugmentConfig, PointSet, augment, mix3d


@dataclass(frozen=True)
class DataConfig:
    voxel_size_m: float = 0.04
    """Paper §4.1: 4 cm."""
    kd_points: int = 2048
    """Voxels per scene that carry a KD target in training (paper C.1: 2048; TTT uses 16384)."""
    input_features: str = "color_normal"
    """"color_normal" (6 channels, indoors) or "xyz" (3 channels, LiDAR)."""
    augment: AugmentConfig = AugmentConfig()


def kd_basis(cache: FeatureCache, device) -> torch.Tensor | None:
    """A pca-int8 cache's (D, K) basis on `device`, which `kd_loss` needs with its targets (the
    coefficients); None for fp16 and int8 caches, whose targets are the features themselves."""
    return None if cache.basis is None else torch.from_numpy(cache.basis).to(device)


def in_channels(input_features: str) -> int:
    return {"color_normal": 6, "xyz": 3}[input_features]


@dataclass
class Batch:
    """Several voxelised scenes, concatenated."""

    grid_coord: torch.Tensor   # (V, 3) int32 voxel coordinates, >= 0
    batch_index: torch.Tensor  # (V,) int32 scene of each voxel within the batch
    features: torch.Tensor     # (V, F) float32 network input
    label: torch.Tensor        # (V,) int64, -1 = ignore
    kd_voxel: torch.Tensor     # (K,) int64 voxels with a KD target
    kd_target: torch.Tensor    # (K, D) float16 (float32 on the reference path) cached mean of L2-normalised
                               # teacher features; the loss computes in float32
    num_scenes: int

    def to(self, device) -> Batch:
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in vars(self).items()
                                if isinstance(v, torch.Tensor)})


def point_set(scene: CachedScene) -> PointSet:
    seen_row = np.full(len(scene.coord), -1, dtype=np.int64)
    seen_row[scene.seen_index] = np.arange(len(scene.seen_index))
    return PointSet(coord=scene.coord.astype(np.float32), color=scene.color.astype(np.float32),
                    normal=scene.normal.astype(np.float32), label=scene.label.astype(np.int64),
                    seen_row=seen_row, source=np.zeros(len(scene.coord), dtype=np.int64))


def voxelize(coord: np.ndarray, voxel_size_m: float, rng: np.random.Generator | None = None):
    """Grid-sample points -> (grid_coord (V, 3) int32, representative point (V,), voxel of each point (N,)).

    With `rng`, the representative of each voxel is a random point of it (training); without, the
    first point in input order (evaluation, deterministic).
    """
    grid = np.floor(coord / voxel_size_m).astype(np.int64)
    grid -= grid.min(0)
    extent = grid.max(0) + 1
    key = (grid[:, 0] * extent[1] + grid[:, 1]) * extent[2] + grid[:, 2]
    order = rng.permutation(len(key)) if rng is not None else np.arange(len(key))
    _, first, inverse = np.unique(key[order], return_index=True, return_inverse=True)
    representative = order[first]
    point_to_voxel = np.empty(len(key), dtype=np.int64)
    point_to_voxel[order] = inverse
    return grid[representative].astype(np.int32), representative, point_to_voxel


def input_features(points: PointSet, kind: str) -> np.ndarray:
    if kind == "xyz":
        return points.coord - points.coord.mean(0)
    return np.concatenate([points.color / 127.5 - 1.0, points.normal], axis=1).astype(np.float32)


class CacheDataset(torch.utils.data.Dataset):
    """Training samples from a feature cache, indexed by (epoch, index) (see EpochSampler); a
    sample is a function of (seed, epoch, index) only.

    `memory_mb`: each process (loader worker) keeps the scenes it has read, points and whole
    feature array, until they would exceed this many MB; later scenes are read from disk every
    time (points, plus a window of feature rows). `reference`: the original input path."""

    def __init__(self, cache_path: Path, scene_ids: list[str], config: DataConfig, *, train: bool, seed: int = 0,
                 memory_mb: float = 0, reference: bool = False):
        self.cache_path = Path(cache_path)
        self.scene_ids = list(scene_ids)
        self.config = config
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.memory_mb = 0 if reference else memory_mb
        self.reference = reference
        self._cache = None  # opened lazily: one zarr handle per worker process
        self._memory: dict[str, tuple[PointSet, np.ndarray]] = {}  # scene -> (points, whole feature array)
        self._memory_bytes = 0
        self._full = False  # the memory budget was reached: stop reading whole feature arrays

    @property
    def cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = FeatureCache(self.cache_path)
        return self._cache

    def __len__(self) -> int:
        return len(self.scene_ids)

    def points(self, scene_id: str) -> PointSet:
        if scene_id in self._memory:
            return self._memory[scene_id][0]
        if self.memory_mb > 0 and not self._full:
            scene = self.cache.read(scene_id)
            points = point_set(scene)
            size = scene.feature.nbytes + sum(a.nbytes for a in vars(points).values())
            if self._memory_bytes + size <= self.memory_mb * 2**20:
                self._memory[scene_id] = (points, scene.feature)
                self._memory_bytes += size
            else:
                self._full = True
            return points
        return point_set(self.cache.read_points(scene_id))

    def num_seen(self, scene_id: str) -> int:
        if scene_id in self._memory:
            return len(self._memory[scene_id][1])
        return self.cache.scene_attrs(scene_id)["num_seen"]

    def feature_window(self, scene_id: str, start: int, length: int) -> np.ndarray:
        """Rows start .. start + length of the scene's cached features, wrapping around the end."""
        if scene_id not in self._memory:
            return self.cache.read_feature_window(scene_id, start, length)
        feature = self._memory[scene_id][1]
        end = start + length
        return feature[start:end] if end <= len(feature) else np.concatenate([feature[start:], feature[:end - len(feature)]])

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        rng = np.random.default_rng([self.seed, epoch, index])
        aug = self.config.augment if self.train else NO_AUGMENTATION
        ids = [self.scene_ids[index]]
        points = augment(self.points(ids[0]), aug, rng, reference=self.reference)
        if self.train and len(self.scene_ids) > 1 and rng.random() < aug.mix3d_p:
            ids.append(self.scene_ids[(index + 1 + rng.integers(len(self.scene_ids) - 1)) % len(self.scene_ids)])
            points = mix3d(points, augment(self.points(ids[1]), aug, rng, reference=self.reference))
        grid, representative, _ = voxelize(points.coord, self.config.voxel_size_m, rng if self.train else None)
        voxels = points.take(representative)
        kd_voxel, kd_target = sample_kd_targets(self, ids, voxels, self.config.kd_points, rng)
        if self.reference:
            kd_target = kd_target.astype(np.float32)
        return {"grid_coord": grid, "features": input_features(voxels, self.config.input_features),
                "label": voxels.label, "kd_voxel": kd_voxel, "kd_target": kd_target,
                # where each KD target came from (scene of the pair, row of its cached features)
                "kd_source": voxels.source[kd_voxel], "kd_row": voxels.seen_row[kd_voxel]}


def sample_kd_targets(dataset: CacheDataset, ids: list[str], voxels: PointSet, kd_points: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to `kd_points` voxels with cached features -> (sorted voxel indices (K,), float16 targets (K, D)).

    The cache stores each scene's seen points in a random order, so a random window of rows is a
    uniform sample of them: read a window just large enough to hold ~1.5x the budget among this
    sample's voxels (a few chunks) instead of the scene's whole feature array.
    """
    candidates = np.flatnonzero(voxels.seen_row >= 0)
    budget = np.bincount(voxels.source[candidates], minlength=len(ids)) * min(1.0, kd_points / max(1, len(candidates)))
    chosen, targets = [], []
    for source, scene_id in enumerate(ids):
        mine = candidates[voxels.source[candidates] == source]
        want = int(round(budget[source]))
        if want == 0:
            continue
        rows = dataset.num_seen(scene_id)
        window = min(rows, int(np.ceil(1.5 * want * rows / len(mine))))
        start = int(rng.integers(rows))
        offset = (voxels.seen_row[mine] - start) % rows  # position of each candidate in the window
        inside = offset < window
        pick = rng.choice(np.flatnonzero(inside), size=min(want, int(inside.sum())), replace=False)
        block = dataset.feature_window(scene_id, start, window)
        chosen.append(mine[pick])
        targets.append(block[offset[pick]])
    if not chosen:
        return np.zeros(0, np.int64), np.zeros((0, dataset.cache.provenance.get("pca_dims") or dataset.cache.provenance["feature_dim"]), np.float16)
    kd_voxel, kd_target = np.concatenate(chosen), np.concatenate(targets)
    order = np.argsort(kd_voxel)
    return kd_voxel[order], kd_target[order]


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) pairs, so persistent workers build each sample from (seed, epoch,
    index) alone: the data do not depend on which worker runs them, and resume is exact."""

    def __init__(self, size: int, *, shuffle: bool, seed: int):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.size) if self.shuffle
                 else np.arange(self.size))
        return iter([(self.epoch, int(i)) for i in order])

    def __len__(self) -> int:
        return self.size


class ShardedBatchSampler(torch.utils.data.Sampler):
    """One process's share of each global batch, for data-parallel training: global batch k holds
    positions k·B .. (k+1)·B of the `EpochSampler`'s order, exactly the batch one process would
    train on, split into `world_size` near-equal contiguous parts. A last batch with fewer scenes
    than processes is dropped (every process must take part in every step)."""

    def __init__(self, sampler: EpochSampler, batch_size: int, *, rank: int, world_size: int):
        if batch_size < world_size:
            raise ValueError(f"a global batch of {batch_size} scenes cannot be split over {world_size} processes; "
                             f"pass --batch-size {world_size} or more")
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size

    def __iter__(self):
        items = list(self.sampler)
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            if len(batch) >= self.world_size:
                yield [batch[i] for i in np.array_split(np.arange(len(batch)), self.world_size)[self.rank]]

    def __len__(self) -> int:
        return batches_per_epoch(len(self.sampler), self.batch_size, world_size=self.world_size)


class EpochBatches(torch.utils.data.Sampler):
    """The batches of several epochs in one pass: for each epoch in `epochs`, the batches a loader
    over `EpochSampler` (or, with `world_size` > 1, `ShardedBatchSampler`) gives that epoch, the last
    one short if the scenes do not divide. One iterator for the whole run lets the workers prefetch
    across epoch boundaries; a fresh iterator per epoch makes the first batch of every epoch wait
    for one worker to build all of it (on 16 scenes at batch 8: every other step)."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, seed: int, epochs: range, rank: int = 0,
                 world_size: int = 1):
        self.sampler = EpochSampler(size, shuffle=shuffle, seed=seed)
        self.batch_size, self.epochs, self.rank, self.world_size = batch_size, epochs, rank, world_size
        self.sharded = ShardedBatchSampler(self.sampler, batch_size, rank=rank, world_size=world_size) \
            if world_size > 1 else None

    def per_epoch(self) -> int:
        return batches_per_epoch(self.sampler.size, self.batch_size, world_size=self.world_size)

    def __iter__(self):
        for epoch in self.epochs:
            self.sampler.set_epoch(epoch)
            if self.sharded is not None:
                yield from self.sharded
                continue
            items = list(self.sampler)
            for start in range(0, len(items), self.batch_size):
                yield items[start:start + self.batch_size]

    def __len__(self) -> int:
        return len(self.epochs) * self.per_epoch()


def batches_per_epoch(size: int, batch_size: int, *, world_size: int = 1) -> int:
    """Batches (steps) in one epoch of `EpochBatches`: the last one short, or, with several
    processes, dropped when it has fewer scenes than processes."""
    full, rest = divmod(size, batch_size)
    return full + (rest >= world_size if world_size > 1 else rest > 0)


def make_epoch_loader(dataset: CacheDataset, *, batch_size: int, shuffle: bool, workers: int, seed: int,
                      epochs: range, rank: int = 0, world_size: int = 1) -> tuple[torch.utils.data.DataLoader, int]:
    """A loader over every batch of `epochs` (`EpochBatches`) -> (loader, batches per epoch). The
    batches are those of `make_loader` epoch by epoch; workers prefetch 2 batches each, across
    epoch boundaries too."""
    batches = EpochBatches(len(dataset), batch_size, shuffle=shuffle, seed=seed, epochs=epochs, rank=rank,
                           world_size=world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        prefetch_factor=2 if workers > 0 else None, pin_memory=torch.cuda.is_available(),
    )
    return loader, batches.per_epoch()


def collate(samples: list[dict]) -> Batch:
    offsets = np.cumsum([0] + [len(s["grid_coord"]) for s in samples])
    cat = lambda key: torch.from_numpy(np.concatenate([s[key] for s in samples]))
    return Batch(
        grid_coord=cat("grid_coord"),
        batch_index=torch.from_numpy(np.concatenate([np.full(len(s["grid_coord"]), i, np.int32)
                                                     for i, s in enumerate(samples)])),
        features=cat("features"),
        label=cat("label"),
        kd_voxel=torch.from_numpy(np.concatenate([s["kd_voxel"] + o for s, o in zip(samples, offsets)])),
        kd_target=cat("kd_target"),
        num_scenes=len(samples),
    )


def make_loader(dataset: CacheDataset, *, batch_size: int, shuffle: bool, workers: int, seed: int,
                rank: int = 0, world_size: int = 1) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """A loader for all epochs (call `sampler.set_epoch` before each). Workers persist across
    epochs (starting one costs seconds: torch, spconv, zarr) and prefetch 2 batches each. With
    `world_size` > 1 it yields process `rank`'s part of each global batch of `batch_size` scenes."""
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    batching = (dict(batch_size=batch_size, sampler=sampler) if world_size == 1 else
                dict(batch_sampler=ShardedBatchSampler(sampler, batch_size, rank=rank, world_size=world_size)))
    loader = torch.utils.data.DataLoader(
        dataset, **batching, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler


@dataclass
class EvalScene:
    """One scene at evaluation: voxel inputs plus the map back to every original point."""

    scene_id: str
    grid_coord: np.ndarray      # (V, 3) int32
    features: np.ndarray        # (V, F) float32
    point_to_voxel: np.ndarray  # (N,) int64
    point_label: np.ndarray     # (N,) int64, -1 = ignore
    coord: np.ndarray           # (N, 3) float32, for PLY export


def eval_scene(cache: FeatureCache, scene_id: str, config: DataConfig) -> EvalScene:
    points = point_set(cache.read_points(scene_id))
    grid, representative, point_to_voxel = voxelize(points.coord, config.voxel_size_m)
    return EvalScene(scene_id, grid, input_features(points.take(representative), config.input_features),
                     point_to_voxel, points.label, points.coord)
