"""Feature codecs: what each stores, that plain zarr reads it back as floats, and `recode`."""

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tttkd.cli.prep import app
from tttkd.pipeline.cache import CacheError, FeatureCache, open_for_writing, recode
from tttkd.pipeline.verify import verify_store

runner = CliRunner()


def cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def test_int8_recode_keeps_every_direction_and_plain_zarr_reads_floats(synth_cache, tmp_path):
    small = tmp_path / "int8.zarr"
    result = runner.invoke(app, ["recode", str(synth_cache), str(small), "--feature-codec", "int8"])
    assert result.exit_code == 0, result.output
    fp16, int8 = FeatureCache(synth_cache), FeatureCache(small)
    assert int8.provenance["feature_codec"] == "int8" and int8.scene_ids() == fp16.scene_ids()
    for scene_id in fp16.scene_ids():
        a, b = fp16.read(scene_id), int8.read(scene_id)
        assert np.array_equal(a.seen_index, b.seen_index) and np.array_equal(a.coord, b.coord)
        assert b.feature.dtype == np.float16  # decoded by the codec, not raw int8
        c = cosine(a.feature, b.feature)
        assert c.min() > 0.97 and c.mean() > 0.995, (c.min(), c.mean())
        # what other readers do: the stored bytes are round(127 x) as int8
        raw = zarr.open_array(small / "scenes" / scene_id / "feature", mode="r")
        assert raw.metadata.to_dict()["codecs"][0]["name"] == "numcodecs.fixedscaleoffset"
    assert [c.problems for c in verify_store(small)] == [[]] * 3
    sizes = {p: FeatureCache(p).bytes_on_disk() for p in (synth_cache, small)}
    assert sizes[small] < 0.75 * sizes[synth_cache]
    info = runner.invoke(app, ["info", str(small), "--json"])
    assert '"feature_codec": "int8"' in info.output


def test_a_store_of_one_codec_is_refused_for_another(synth_cache, tmp_path):
    small = tmp_path / "int8.zarr"
    recode(synth_cache, small, feature_codec="int8")
    with pytest.raises(CacheError, match="feature_codec='int8', this run has 'fp16'"):
        open_for_writing(small, {**FeatureCache(synth_cache).provenance, "feature_codec": "fp16"})
    with pytest.raises(ValueError, match="unknown feature codec 'int4'"):
        recode(synth_cache, tmp_path / "x.zarr", feature_codec="int4")
    assert not (tmp_path / "x.zarr").exists()


def test_extraction_writes_the_codec_it_is_asked_for(synth_root, tmp_path):
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction

    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4,
                        feature_codec="int8")
    report = run_extraction(config, out=tmp_path / "s.zarr", scene_ids=["scene0000_00"], workers=1, device="cpu",
                            progress=False)
    assert report.done == ["scene0000_00"]
    cache = FeatureCache(tmp_path / "s.zarr")
    assert cache.provenance["feature_codec"] == "int8"
    raw = zarr.open_array(tmp_path / "s.zarr" / "scenes" / "scene0000_00" / "feature", mode="r")
    assert raw.metadata.to_dict()["codecs"][0]["configuration"]["astype"] == "|i1"


def test_the_int8_writer_stores_what_numcodecs_would_and_clips_instead_of_wrapping(tmp_path):
    # our encoder computes in float32 (numcodecs' own in emulated float16): same metadata, same decoding
    import warnings

    from tttkd.pipeline.cache import feature_filters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from zarr.codecs.numcodecs import FixedScaleOffset
        numcodecs_filter = FixedScaleOffset(offset=0, scale=127, dtype="<f2", astype="|i1")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0, :4] = [1.004, -1.004, 1.0, -1.0]  # a float16 mean of unit vectors can pass 1
    x = x.astype(np.float16)
    stored = {}
    for name, filters in (("ours", feature_filters("int8")), ("numcodecs", [numcodecs_filter])):
        array = zarr.create_array(tmp_path / f"{name}.zarr", shape=x.shape, dtype=np.float16, chunks=(1000, 64),
                                  filters=filters, compressors=None)
        array[...] = x
        # the stored bytes, as a reader without numcodecs sees them
        stored[name] = np.concatenate([np.fromfile(tmp_path / f"{name}.zarr" / "c" / str(i) / "0", dtype=np.int8)
                                       .reshape(1000, 64) for i in range(4)])
    metadata = {name: zarr.open_array(tmp_path / f"{name}.zarr", mode="r").metadata.to_dict() for name in stored}
    assert metadata["ours"] == metadata["numcodecs"]
    assert metadata["ours"]["codecs"][0]["name"] == "numcodecs.fixedscaleoffset"
    ours, theirs = stored["ours"], stored["numcodecs"]
    assert ours[0, :4].tolist() == [127, -127, 127, -127]
    assert theirs[0, :2].tolist() == [-128, -128]  # 1.004 x 127 rounds to 128, which wraps around to -128
    rest = np.ones(x.shape, bool)
    rest[0, :2] = False
    # ours is round(127 x) of the float16 value exactly; numcodecs' float16 product is off by one at times
    assert np.array_equal(ours, np.rint(np.clip(x.astype(np.float32) * 127, -127, 127)).astype(np.int8))
    assert np.abs(ours[rest].astype(int) - theirs[rest]).max() <= 1 and (ours[rest] != theirs[rest]).mean() < 1e-2
    # a plain zarr reader decodes q / 127 (to float16)
    read = zarr.open_array(tmp_path / "ours.zarr", mode="r")[...]
    assert read.dtype == np.float16 and np.array_equal(read, (ours / 127).astype(np.float16))


def test_int8_codes_made_on_the_device_are_stored_byte_for_byte_as_the_floats_would_be(tmp_path):
    # extraction on a GPU hands write_scene the codes (batched.int8_codes), not the float16 means
    import torch

    from tttkd.pipeline.batched import int8_codes
    from tttkd.pipeline.cache import _write_int8_codes, write_scene
    from tttkd.pipeline.scene import Scene

    rng = np.random.default_rng(1)
    n, d = 40_000, 64  # two feature chunks of 32,768 rows, the second a partial one
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0, :4] = [1.004, -1.004, 1.0, -1.0]
    x[1, :3] = [0.5 / 127, 1.5 / 127, -2.5 / 127]  # halves: both round to even
    x = x.astype(np.float16)
    codes = int8_codes(torch.from_numpy(x)).numpy()
    assert codes.dtype == np.int8 and codes[0, :4].tolist() == [127, -127, 127, -127]
    scene = Scene("scene0000_00", rng.random((n, 3), dtype=np.float32), rng.integers(0, 255, (n, 3), dtype=np.uint8),
                  np.zeros((n, 3), np.float16), np.zeros(n, np.int16))
    stores = {}
    for name, feature in (("floats", x), ("codes", codes)):
        stores[name] = tmp_path / f"{name}.zarr"
        open_for_writing(stores[name], {"teacher": "t", "feature_codec": "int8"})
        assert write_scene(stores[name], scene, seen_index=np.arange(n, dtype=np.int32), feature=feature,
                           view_count=np.ones(n, np.uint16), attrs={}, feature_codec="int8")
    stored = {name: {p.relative_to(store): p.read_bytes() for p in (store / "scenes" / "scene0000_00" / "feature")
                     .rglob("*") if p.is_file()} for name, store in stores.items()}
    assert len(stored["codes"]) == 3  # zarr.json and two chunks
    assert stored["codes"] == stored["floats"]
    read = FeatureCache(stores["codes"]).read("scene0000_00").feature
    assert read.dtype == np.float16 and np.array_equal(read, (codes / 127).astype(np.float16))
    plain = zarr.create_array(tmp_path / "plain.zarr", shape=codes.shape, dtype=np.float16, chunks=(1000, d))
    with pytest.raises(ValueError, match="int8 codes need the int8 filter"):
        _write_int8_codes(plain, codes)  # codes under another decoding would be read as other numbers
    with pytest.raises(ValueError, match="int8 feature codes given for the 'fp16' codec"):
        write_scene(stores["codes"], Scene("scene0001_00", *[getattr(scene, k) for k in ("coord", "color", "normal",
                                                                                          "label")]),
                    seen_index=np.arange(n, dtype=np.int32), feature=codes, view_count=np.ones(n, np.uint16),
                    attrs={}, feature_codec="fp16")
