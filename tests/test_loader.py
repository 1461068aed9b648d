"""The fast input path (scene memory per worker, vectorised elastic distortion, float16 targets)
gives the samples of the reference path for the same (seed, epoch, index)."""

from dataclasses import replace

import numpy as np
import pytest

from tttkd import augment as A
from tttkd.augment import AugmentConfig, PointSet
from tttkd.data import CacheDataset, DataConfig

SCENES = ["scene0000_00", "scene0001_00", "scene0002_00"]


def test_vectorised_elastic_equals_the_reference_loop_bit_for_bit():
    rng = np.random.default_rng(0)
    n = 4000
    p = PointSet(coord=(rng.random((n, 3)) * [5, 4, 2.5]).astype(np.float32), color=np.zeros((n, 3), np.float32),
                 normal=np.zeros((n, 3), np.float32), label=np.zeros(n, np.int64), seen_row=np.arange(n),
                 source=np.zeros(n, np.int64))
    for params in (((0.2, 0.4), (0.8, 1.6)), ((0.05, 0.1),)):
        fast = A.elastic(p, np.random.default_rng(7), params)
        reference = A.elastic_reference(p, np.random.default_rng(7), params)
        np.testing.assert_array_equal(fast.coord, reference.coord)
        assert np.abs(fast.coord - p.coord).max() > 0.01  # it did distort


def _assert_same_sample(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if key == "kd_target":  # float16 on the fast path, float32 on the reference one: equal values
            assert a[key].dtype == np.float16 and b[key].dtype in (np.float16, np.float32)
            np.testing.assert_array_equal(a[key].astype(np.float32), b[key].astype(np.float32))
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_fast_path_gives_the_reference_samples_from_memory_and_from_disk(synth_cache):
    config = DataConfig(voxel_size_m=0.06, kd_points=300, augment=replace(AugmentConfig(), mix3d_p=0.5))
    reference = CacheDataset(synth_cache, SCENES, config, train=True, seed=3, reference=True)
    in_memory = CacheDataset(synth_cache, SCENES, config, train=True, seed=3, memory_mb=256)
    no_room = CacheDataset(synth_cache, SCENES, config, train=True, seed=3, memory_mb=0.5)  # smaller than a scene
    for epoch in (0, 1):
        for index in range(len(SCENES)):
            expected = reference[(epoch, index)]
            assert expected["kd_target"].dtype == np.float32
            _assert_same_sample(in_memory[(epoch, index)], expected)
            _assert_same_sample(no_room[(epoch, index)], expected)
    # the memory holds every scene once (read from disk once), the small budget none
    assert set(in_memory._memory) == set(SCENES) and not no_room._memory and no_room._full
    assert 0 < in_memory._memory_bytes <= 256 * 2**20
    # cached point sets are not modified by the augmentations that read them
    again = CacheDataset(synth_cache, SCENES, config, train=True, seed=3, memory_mb=256)
    _assert_same_sample(in_memory[(0, 0)], again[(0, 0)])


def test_memory_feature_windows_wrap_like_the_cache(synth_cache):
    dataset = CacheDataset(synth_cache, SCENES, DataConfig(), train=True, memory_mb=256)
    dataset.points(SCENES[0])
    rows = dataset.num_seen(SCENES[0])
    assert rows == dataset.cache.scene_attrs(SCENES[0])["num_seen"]
    for start, length in ((0, 10), (rows - 5, 12), (rows // 2, rows)):
        np.testing.assert_array_equal(dataset.feature_window(SCENES[0], start, length),
                                      dataset.cache.read_feature_window(SCENES[0], start, length))
