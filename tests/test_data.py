"""Augmentations, voxelisation and the cache data loader: each does what it says and keeps labels
and cached-feature rows aligned with their points."""

from dataclasses import replace

import numpy as np
import torch

from tttkd import augment as A
from tttkd.augment import NO_AUGMENTATION, AugmentConfig, PointSet
from tttkd.data import CacheDataset, DataConfig, collate, voxelize
from tttkd.pipeline.cache import FeatureCache


def points(n=2000, seed=0) -> PointSet:
    """Points whose label and colour are functions of their row: alignment can be checked after any op."""
    rng = np.random.default_rng(seed)
    row = np.arange(n)
    normal = rng.normal(size=(n, 3)).astype(np.float32)
    return PointSet(coord=(rng.random((n, 3)) * [4, 3, 2.5]).astype(np.float32),
                    color=np.stack([row % 256, (row // 256) % 256, np.full(n, 100)], 1).astype(np.float32),
                    normal=normal / np.linalg.norm(normal, axis=1, keepdims=True), label=row % 20,
                    seen_row=np.where(row % 3 == 0, -1, row), source=np.zeros(n, dtype=np.int64))


def assert_aligned(p: PointSet):
    seen = p.seen_row >= 0
    assert np.array_equal(p.label[seen], p.seen_row[seen] % 20)


def pairwise(c):
    return np.linalg.norm(c[:50, None] - c[None, :50], axis=-1)


def test_mirror_flips_x_or_y_with_normals():
    p = points()
    rng = np.random.default_rng(3)
    flips = set()
    for _ in range(20):
        q = A.mirror(p, rng)
        sign = np.sign(q.coord[0] * p.coord[0])
        flips.add(tuple(sign))
        assert sign[2] == 1
        np.testing.assert_array_equal(q.normal * sign, p.normal)
        assert np.array_equal(q.label, p.label)
    assert len(flips) == 4  # all four x/y combinations occur


def test_rotation_is_about_up_and_rigid():
    p = points()
    q = A.rotate(p, np.random.default_rng(1))
    np.testing.assert_allclose(q.coord[:, 2], p.coord[:, 2], atol=1e-6)
    np.testing.assert_allclose(pairwise(q.coord), pairwise(p.coord), atol=1e-4)
    # normals turn with the points: the angle between normal and the point's direction is kept
    np.testing.assert_allclose(np.sum(q.normal * q.coord, 1), np.sum(p.normal * p.coord, 1), atol=1e-4)


def test_scale_multiplies_distances_within_range():
    p = points()
    q = A.scale(p, np.random.default_rng(2), (0.9, 1.1))
    ratio = pairwise(q.coord)[0, 1:] / pairwise(p.coord)[0, 1:]
    assert np.allclose(ratio, ratio[0], atol=1e-5) and 0.9 <= ratio[0] <= 1.1 and ratio[0] != 1


def test_elastic_distortion_is_smooth_and_bounded():
    p = points(5000)
    q = A.elastic(p, np.random.default_rng(0), ((0.2, 0.4),))
    d = q.coord - p.coord
    assert 0.005 < np.abs(d).mean() < 0.4
    # nearby points move alike, far points differently
    near = np.linalg.norm(p.coord[:, None] - p.coord[None, :200], axis=-1)[:200] < 0.05
    np.fill_diagonal(near, False)
    i, j = np.nonzero(near)
    assert np.linalg.norm(d[i] - d[j], axis=1).mean() < 0.3 * np.linalg.norm(d[:200], axis=1).mean()


def test_jitter_is_clipped():
    q = A.jitter(points(), np.random.default_rng(0), (0.005, 0.02))
    d = q.coord - points().coord
    assert np.abs(d).max() <= 0.02 + 1e-6 and d.std() > 0.003


def test_crop_keeps_a_box_and_every_array_aligned():
    p = points()
    q = A.crop(p, np.random.default_rng(5), (0.5, 0.6))
    assert 0.15 * len(p) < len(q) < 0.5 * len(p)
    assert_aligned(q)
    extent = q.coord[:, :2].max(0) - q.coord[:, :2].min(0)
    assert np.all(extent <= 0.6 * np.array([4, 3]) + 1e-3)


def test_translation_is_one_offset():
    p = points()
    q = A.translate(p, np.random.default_rng(0), 0.2)
    d = q.coord - p.coord
    assert np.allclose(d, d[0], atol=1e-6) and np.abs(d[0]).max() <= 0.2


def test_colour_augmentations_change_colour_only_within_bounds():
    p = points()
    rng = np.random.default_rng(0)
    b = A.brightness(p, rng, 0.1)
    shift = b.color - p.color
    assert np.allclose(shift[(p.color > 30) & (p.color < 220)], shift[0, 2], atol=1e-4) and abs(shift[0, 2]) <= 25.5
    c = A.contrast(p, rng, (0.8, 1.2))
    assert not np.allclose(c.color.std(0), p.color.std(0)) and np.array_equal(c.coord, p.coord)
    r = A.rgb_shift(p, rng, 0.05)
    per_channel = (r.color - p.color)[100]
    assert np.abs(per_channel).max() <= 0.05 * 255 + 1e-4 and len(set(np.round(per_channel, 4))) == 3


def test_mix3d_overlays_two_centred_scenes():
    a, b = points(100, 0), points(50, 1)
    m = A.mix3d(a, b)
    assert len(m) == 150 and m.source.tolist() == [0] * 100 + [1] * 50
    for part in (m.coord[:100], m.coord[100:]):
        np.testing.assert_allclose((part[:, :2].min(0) + part[:, :2].max(0)) / 2, 0, atol=1e-5)


def test_no_augmentation_is_the_identity_and_full_augmentation_keeps_alignment():
    p = points()
    q = A.augment(p, NO_AUGMENTATION, np.random.default_rng(0))
    for name in ("coord", "color", "normal", "label", "seen_row"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    assert_aligned(A.augment(p, AugmentConfig(), np.random.default_rng(0)))


def test_voxelize_matches_brute_force():
    rng = np.random.default_rng(0)
    coord = (rng.random((3000, 3)) * 2 - 1).astype(np.float32)
    grid, representative, point_to_voxel = voxelize(coord, 0.2, rng)
    keys = {tuple(k) for k in np.floor(coord / 0.2).astype(int)}
    assert len(grid) == len(keys)
    floor = np.floor(coord / 0.2).astype(int)
    offset = floor.min(0)
    np.testing.assert_array_equal(grid[point_to_voxel], floor - offset)  # every point is in its voxel
    np.testing.assert_array_equal(point_to_voxel[representative], np.arange(len(grid)))
    # training picks a random representative; evaluation the first point of each voxel
    _, first, _ = voxelize(coord, 0.2)
    assert not np.array_equal(np.sort(representative), np.sort(first))
    assert all(point_to_voxel[:first[v]].tolist().count(v) == 0 for v in range(0, len(grid), 97))


def test_sample_targets_are_the_cached_features_of_their_points(synth_cache):
    config = DataConfig(voxel_size_m=0.05, kd_points=300, augment=replace(AugmentConfig(), mix3d_p=1.0))
    dataset = CacheDataset(synth_cache, ["scene0000_00", "scene0001_00"], config, train=True, seed=0)
    sample = dataset[0]
    cache = FeatureCache(synth_cache)
    assert set(sample["kd_source"]) == {0, 1}  # Mix3D: targets from both scenes
    for source, scene_id in enumerate(["scene0000_00", sample_partner(dataset, 0)]):
        mine = sample["kd_source"] == source
        expected = cache.read(scene_id).feature[sample["kd_row"][mine]].astype(np.float32)
        np.testing.assert_array_equal(sample["kd_target"][mine], expected)
    assert len(sample["kd_voxel"]) == 300 and np.all(np.diff(sample["kd_voxel"]) > 0)
    # the same (seed, epoch, index) gives the same sample; another epoch another one
    np.testing.assert_array_equal(dataset[0]["grid_coord"], sample["grid_coord"])
    dataset.epoch = 1
    assert not np.array_equal(dataset[0]["grid_coord"], sample["grid_coord"])


def sample_partner(dataset, index):
    others = [s for s in dataset.scene_ids if s != dataset.scene_ids[index]]
    assert len(others) == 1
    return others[0]


def test_collate_offsets_kd_voxels_into_the_batch(synth_cache):
    config = DataConfig(voxel_size_m=0.08, kd_points=50, augment=NO_AUGMENTATION)
    dataset = CacheDataset(synth_cache, ["scene0000_00", "scene0001_00"], config, train=True)
    a, b = dataset[0], dataset[1]
    batch = collate([a, b])
    assert batch.num_scenes == 2 and len(batch.grid_coord) == len(a["grid_coord"]) + len(b["grid_coord"])
    assert torch.equal(batch.kd_voxel[50:], torch.from_numpy(b["kd_voxel"] + len(a["grid_coord"])))
    assert torch.equal(batch.batch_index[batch.kd_voxel[50:]], torch.ones(50, dtype=torch.int32))
