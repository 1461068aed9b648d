"""Verified caches: checksums on every chunk, and `tttkd-prep verify` catching each kind of damage."""

import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tttkd.cli.prep import app
from tttkd.pipeline.cache import CacheError, FeatureCache
from tttkd.pipeline.verify import verify_store

runner = CliRunner()


@pytest.fixture
def store(synth_cache, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(synth_cache, copy)
    return copy


def chunk(store, scene_id, array):
    return next(p for p in sorted((store / "scenes" / scene_id / array / "c").rglob("*")) if p.is_file())


def test_a_healthy_store_verifies_and_a_scene_recomputes_to_the_same_features(store, synth_root):
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 0, result.output
    assert "3 scenes ok, 0 with problems" in result.output
    checks = verify_store(store, recompute=1, root=synth_root, device="cpu")
    recomputed = [c for c in checks if c.min_cosine is not None]
    assert len(recomputed) == 1 and recomputed[0].ok and recomputed[0].min_cosine > 0.99


def test_flipped_bits_truncated_and_deleted_chunks_and_deleted_arrays_are_each_caught(store):
    flipped = chunk(store, "scene0000_00", "feature")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x04
    flipped.write_bytes(bytes(data))
    truncated = chunk(store, "scene0001_00", "coord")
    truncated.write_bytes(truncated.read_bytes()[:-7])
    chunk(store, "scene0001_00", "view_count").unlink()
    shutil.rmtree(store / "scenes" / "scene0002_00" / "label")

    with pytest.raises(CacheError, match="scene scene0000_00, array 'feature': corrupt chunk"):
        FeatureCache(store).read("scene0000_00")
    with pytest.raises(CacheError, match="scene scene0002_00 has no array 'label'"):
        FeatureCache(store).read("scene0002_00")
    problems = {c.scene_id: " / ".join(c.problems) for c in verify_store(store)}
    assert "array feature: corrupt chunk" in problems["scene0000_00"]
    assert "array coord: corrupt chunk" in problems["scene0001_00"]
    assert "array view_count: 1 of 1 chunks are missing" in problems["scene0001_00"]
    assert "array label is missing" in problems["scene0002_00"]
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and "0 scenes ok, 3 with problems" in result.output


def test_values_no_extraction_could_write_are_caught(store):
    scenes = zarr.open_group(store / "scenes", mode="r+")
    feature = scenes["scene0000_00"]["feature"]
    feature[0] = feature[0] * 3  # a mean of unit vectors has norm <= 1
    seen = scenes["scene0001_00"]["seen_index"]
    seen[0] = scenes["scene0001_00"].attrs["num_points"]  # one past the last point
    coord = scenes["scene0002_00"]["coord"]
    coord[5] = np.nan
    problems = {c.scene_id: " / ".join(c.problems) for c in verify_store(store)}
    assert "norm" in problems["scene0000_00"]
    assert "seen_index outside" in problems["scene0001_00"]
    assert "coord has non-finite values" in problems["scene0002_00"]


def test_an_all_zero_array_is_written_and_verifies(tmp_path):
    from tttkd.pipeline.cache import open_for_writing, write_scene
    from tttkd.pipeline.scene import Scene

    store = tmp_path / "zeros.zarr"
    open_for_writing(store, {"teacher": "t", "feature_dim": 4, "class_names": ["a"], "dataset": "scannet"})
    n = 10
    scene = Scene("s0", np.ones((n, 3), np.float32), np.zeros((n, 3), np.uint8), np.zeros((n, 3), np.float32),
                  np.zeros(n, np.int16))  # no normals: all zero
    feature = np.full((n, 4), 0.5, np.float16)
    write_scene(store, scene, seen_index=np.arange(n), feature=feature, view_count=np.ones(n, np.uint16), attrs={})
    assert [c.problems for c in verify_store(store)] == [[]]
