"""The pca-int8 codec: the basis fit, the exactness of the KD loss in the basis, recode, extraction,
verify, and the refusals of a store or targets of another codec."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from tttkd.cli.prep import app
from tttkd.loss import kd_loss
from tttkd.pipeline.cache import CacheError, FeatureCache, open_for_writing, recode
from tttkd.pipeline.pca import basis_problem, fit_basis
from tttkd.pipeline.verify import verify_store

runner = CliRunner()


def cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


@pytest.fixture(scope="module")
def pca_cache(synth_cache, tmp_path_factory):
    store = tmp_path_factory.mktemp("pca") / "pca.zarr"
    recode(synth_cache, store, feature_codec="pca-int8", pca_dims=64)
    return store


def test_kd_loss_in_the_basis_equals_the_loss_against_the_expanded_target_with_the_same_gradient():
    generator = torch.Generator().manual_seed(0)
    d, k, n = 96, 24, 200
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))  # orthonormal
    target = torch.randn(n, d, generator=generator, dtype=torch.float64) * 0.1
    coefficients = target @ basis
    prediction = torch.randn(n, d, generator=generator, dtype=torch.float64, requires_grad=True)
    projected = kd_loss(prediction, coefficients, basis)
    (grad_projected,) = torch.autograd.grad(projected, prediction)
    expanded = kd_loss(prediction, coefficients @ basis.T)  # the decoded target B c
    (grad_expanded,) = torch.autograd.grad(expanded, prediction)
    assert projected.item() == pytest.approx(expanded.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad_projected, grad_expanded, rtol=1e-10, atol=1e-14)
    # the norm is over all D dims: the cosine within span(B) (|f B| as the norm) is another loss
    within = -(torch.nn.functional.normalize(prediction @ basis, dim=1) * coefficients).sum(1).mean()
    assert abs(within.item() - projected.item()) > 1e-3
    # fp32 (the trainer's precision) agrees to rounding
    p32 = prediction.detach().float()
    assert kd_loss(p32, coefficients.float(), basis.float()).item() == pytest.approx(expanded.item(), abs=1e-6)


def test_targets_of_one_codec_are_refused_by_the_loss_of_another():
    prediction, basis = torch.randn(5, 32), torch.linalg.qr(torch.randn(32, 8))[0]
    with pytest.raises(ValueError, match="targets of a pca-int8 cache are coefficients; pass the cache's basis"):
        kd_loss(prediction, torch.randn(5, 8))  # a pca-int8 target cache, the basis not passed
    with pytest.raises(ValueError, match="not coefficients of the"):
        kd_loss(prediction, torch.randn(5, 32), basis)  # an fp16 cache given a basis


class _Features:
    """Stand-in for a FeatureCache: features near a known 6-dim subspace of 40 dims."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.span = np.linalg.qr(rng.normal(size=(40, 6)))[0]
        self.rows = {f"s{i}": (rng.normal(size=(500, 6)) * [3, 2, 1, 1, .5, .5]) @ self.span.T
                     + 1e-3 * rng.normal(size=(500, 40)) for i in range(3)}
        self.provenance, self.path = {"feature_dim": 40}, "stand-in"

    def scene_ids(self):
        return sorted(self.rows)

    def scene_attrs(self, scene_id):
        return {"num_seen": 500}

    def read_feature_window(self, scene_id, start, length):
        return np.roll(self.rows[scene_id], -start, axis=0)[:length].astype(np.float16)

    def decode(self, feature):
        return feature.astype(np.float32)


def test_the_fitted_basis_spans_the_features_is_orthonormal_and_reproducible():
    cache = _Features()
    basis = fit_basis(cache, dims=6, sample_points=900, seed=0)
    assert basis_problem(basis, feature_dim=40, dims=6) is None
    features = np.concatenate(list(cache.rows.values()))
    assert cosine(features @ basis @ basis.T, features).min() > 0.999  # the subspace is recovered
    assert np.array_equal(basis, fit_basis(cache, dims=6, sample_points=900, seed=0))  # same bytes
    assert (basis[np.abs(basis).argmax(0), np.arange(6)] > 0).all()  # the sign convention
    assert cosine(features @ basis[:, :2] @ basis[:, :2].T, features).mean() < 0.99  # fewer dims lose
    with pytest.raises(ValueError, match="--pca-dims 40: choose 1..39"):
        fit_basis(cache, dims=40)


def test_pca_recode_stores_coefficients_plain_zarr_reads_and_verify_accepts(synth_cache, pca_cache, tmp_path):
    fp16, pca = FeatureCache(synth_cache), FeatureCache(pca_cache)
    assert pca.provenance["feature_codec"] == "pca-int8" and pca.provenance["pca_dims"] == 64
    assert pca.provenance["feature_dim"] == fp16.provenance["feature_dim"] == 472  # the teacher's, for kd_head
    basis = zarr.open_array(pca_cache / "pca_basis", mode="r")[...]  # what another reader does
    assert basis.shape == (472, 64) and np.array_equal(basis, pca.basis)
    for scene_id in fp16.scene_ids():
        a, b = fp16.read(scene_id), pca.read(scene_id)
        assert np.array_equal(a.seen_index, b.seen_index) and b.feature.shape == (len(a.seen_index), 64)
        raw = zarr.open_array(pca_cache / "scenes" / scene_id / "feature", mode="r")
        assert raw.metadata.to_dict()["codecs"][0]["configuration"]["astype"] == "|i1"
        decoded = b.feature.astype(np.float32) @ basis.T
        f = a.feature.astype(np.float32)
        allowed = cosine(f @ basis @ basis.T, f)
        assert (allowed - cosine(decoded, f)).max() < 0.03  # int8 costs little beyond the basis
        assert cosine(decoded, f).mean() > 0.97
    assert [c.problems for c in verify_store(pca_cache)] == [[]] * 3
    assert pca.bytes_on_disk() < 0.5 * fp16.bytes_on_disk()
    info = runner.invoke(app, ["info", str(pca_cache), "--json"])
    assert '"feature_codec": "pca-int8"' in info.output and '"pca_dims": 64' in info.output
    assert 0.9 < json.loads(info.output)["pca_cosine_mean"] <= 1.0
    # back to fp16: the decoded features; and a re-run resumes (nothing to write, same basis)
    back = tmp_path / "back.zarr"
    result = runner.invoke(app, ["recode", str(pca_cache), str(back), "--feature-codec", "fp16"])
    assert result.exit_code == 0, result.output
    scene_id = fp16.scene_ids()[0]
    np.testing.assert_allclose(FeatureCache(back).read(scene_id).feature.astype(np.float32),
                               pca.read(scene_id).feature.astype(np.float32) @ basis.T, atol=2e-3)
    assert recode(synth_cache, pca_cache, feature_codec="pca-int8", pca_dims=64) == 0


def test_a_store_of_one_codec_is_refused_where_another_is_required(synth_cache, pca_cache, tmp_path):
    provenance = FeatureCache(pca_cache).provenance
    with pytest.raises(CacheError, match="feature_codec='pca-int8', this run has 'int8'"):
        open_for_writing(pca_cache, {**provenance, "feature_codec": "int8", "pca_dims": None})
    with pytest.raises(CacheError, match="pca_dims=64, this run has 128"):
        recode(synth_cache, pca_cache, feature_codec="pca-int8", pca_dims=128)
    with pytest.raises(CacheError, match="a new pca-int8 store needs its basis"):
        open_for_writing(tmp_path / "new.zarr", provenance)  # what an extraction run without staging does
    result = runner.invoke(app, ["recode", str(synth_cache), str(tmp_path / "x.zarr"), "--feature-codec", "int8",
                                 "--pca-dims", "32"])
    assert result.exit_code == 1 and "--pca-dims applies to --feature-codec pca-int8 only" in result.output


def test_verify_refuses_a_damaged_or_replaced_basis(pca_cache, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(pca_cache, store)
    chunk = next(p for p in sorted((store / "pca_basis" / "c").rglob("*")) if p.is_file())
    original = chunk.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="pca_basis: corrupt chunk"):
        verify_store(store)
    chunk.write_bytes(original)
    array = zarr.open_array(store / "pca_basis", mode="r+")
    array[...] = array[...][:, ::-1]  # still orthonormal, but not the basis the coefficients are in
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and "differs from the one its provenance records" in result.output
    shutil.rmtree(store / "pca_basis")
    with pytest.raises(CacheError, match="without its pca_basis"):
        FeatureCache(store).basis


def test_extract_pca_stages_fp16_then_a_rerun_projects_onto_the_stored_basis(synth_root, synth_cache, tmp_path):
    out = tmp_path / "p.zarr"
    common = ["extract", "--dataset", "scannet", "--root", str(synth_root), "--model", "efficientnet_lite0",
              "--out", str(out), "--device", "cpu", "--batch-size", "4", "--feature-codec", "pca-int8",
              "--pca-dims", "16"]
    result = runner.invoke(app, common + ["--scenes", "scene0000_00"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "p.zarr.fp16-staging").exists()  # removed once every scene is in
    first = FeatureCache(out)
    assert first.root.attrs["last_run"]["done"] == ["scene0000_00"]  # the run's record follows the recode
    sha = first.provenance["pca_basis_sha256"]
    # what a first run with a failed scene leaves beside `out`: the first run without failures removes it
    (tmp_path / "p.zarr.fp16-staging" / "scenes").mkdir(parents=True)
    result = runner.invoke(app, common + ["--scenes", "scene0001_00"])  # no staging: the stored basis
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "p.zarr.fp16-staging").exists()
    cache, fp16 = FeatureCache(out), FeatureCache(synth_cache)
    assert cache.scene_ids() == ["scene0000_00", "scene0001_00"] and cache.provenance["pca_basis_sha256"] == sha
    stored, reference = cache.read("scene0001_00"), fp16.read("scene0001_00")
    assert np.array_equal(stored.seen_index, reference.seen_index)
    expected = reference.feature.astype(np.float32) @ cache.basis  # the coefficients of the fp16 feature
    assert np.abs(stored.feature.astype(np.float32) - expected).max() < 0.5 / 127 + 2e-3
    # what the basis keeps of each new scene is recorded, so a basis that does not fit them shows
    f = reference.feature.astype(np.float32)
    kept = cosine(f @ cache.basis @ cache.basis.T, f)
    attrs = cache.scene_attrs("scene0001_00")
    assert attrs["pca_cosine_mean"] == pytest.approx(kept.mean(), abs=2e-3)
    assert attrs["pca_cosine_min"] == pytest.approx(kept.min(), abs=2e-3) and kept.min() < kept.mean()
    checks = verify_store(out, recompute=1, root=synth_root, device="cpu")
    assert all(c.ok for c in checks) and sum(c.min_cosine is not None for c in checks) == 1
    with pytest.raises(CacheError, match="feature_codec='pca-int8'.*this run has 'pca-int8', 32"):
        from tttkd.pipeline.extract import PrepConfig
        from tttkd.pipeline.pca import extract_pca

        extract_pca(PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0",
                               feature_codec="pca-int8", pca_dims=32), out=out, scene_ids=["scene0002_00"])


def test_training_and_ttt_read_a_pca_cache_through_its_basis(synth_cache, pca_cache):
    from tttkd.adapt import AdaptConfig, TTTKD, load_target_scene, rotated
    from tttkd.data import CacheDataset, DataConfig, collate
    from tttkd.model import build_model, model_config

    config = DataConfig(voxel_size_m=0.1, kd_points=512)
    batches = {name: collate([CacheDataset(store, FeatureCache(store).scene_ids(), config, train=True, seed=3)[(0, 0)]])
               for name, store in (("fp16", synth_cache), ("pca", pca_cache))}
    assert torch.equal(batches["fp16"].kd_voxel, batches["pca"].kd_voxel)  # the same points are distilled
    assert batches["pca"].kd_target.shape[1] == 64
    # a student close to its targets: the loss through the basis is the loss against the fp16 targets'
    # projection onto span(B) (what the basis keeps), up to int8 rounding of the coefficients
    basis = torch.from_numpy(FeatureCache(pca_cache).basis)
    target = batches["fp16"].kd_target.float()
    prediction = target + 0.02 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    projected = kd_loss(prediction, target @ basis @ basis.T).item()
    through_basis = kd_loss(prediction, batches["pca"].kd_target, basis).item()
    assert projected < -0.5 and through_basis == pytest.approx(projected, abs=0.005)
    assert through_basis > kd_loss(prediction, target).item()  # K = 64 of 472 dims keep less than all

    # TTT on a pca-int8 target cache: refused without its basis, a finite step with it
    cache = FeatureCache(pca_cache)
    scene = load_target_scene(cache, cache.scene_ids()[0], "cpu")
    turned = rotated(scene, 0.0, config, "cpu")
    net = model_config("small", in_channels=6, num_classes=len(cache.provenance["class_names"]), kd_dim=472)
    for basis in (None, torch.from_numpy(cache.basis)):
        torch.manual_seed(0)
        adapter = TTTKD(build_model(net, device="cpu"), AdaptConfig(kd_points=256, rotations=1), basis=basis)
        targets = adapter.sample_targets(scene, turned, np.random.default_rng(0))
        if basis is None:
            with pytest.raises(ValueError, match="pass the cache's basis"):
                adapter.step(turned, *targets)
        else:
            assert torch.isfinite(adapter.step(turned, *targets))


def test_bench_codecs_reports_size_and_fidelity_of_each_codec(synth_cache, tmp_path):
    """`tttkd bench codecs`: int8 and pca-int8 recoded from the fp16 store, smaller as they should
    be, int8 nearly lossless, pca closer to fp16 with more directions, and a basis that never saw a
    scene no better on it than the store's own."""
    from typer.testing import CliRunner

    from tttkd.cli.main import app

    out = tmp_path / "codecs.json"
    result = CliRunner().invoke(app, ["bench", "codecs", "--cache", str(synth_cache), "--dims", "16,64",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["codec"], r["dims"]): r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [("fp16", None), ("int8", None), ("pca-int8", 16), ("pca-int8", 64)]
    size = {key: r["bytes_per_seen_point"] for key, r in rows.items()}
    assert all(r["write_s_per_scene"] > 0 for r in rows.values())
    assert size[("fp16", None)] > size[("int8", None)] > size[("pca-int8", 64)] > size[("pca-int8", 16)]
    assert rows[("int8", None)]["cosine"]["mean"] > 0.995
    assert rows[("pca-int8", 16)]["cosine"]["mean"] < rows[("pca-int8", 64)]["cosine"]["mean"]
    for k in (16, 64):
        assert rows[("pca-int8", k)]["cosine_held_out"]["mean"] <= rows[("pca-int8", k)]["cosine"]["mean"] + 1e-3
    assert "pca-int8 K=64" in result.output


@pytest.mark.parametrize("processes", [False, True])
def test_the_batched_path_projects_on_its_device_what_the_host_projects(synth_root, pca_cache, tmp_path, processes,
                                                                         monkeypatch):
    """A later run into a pca-int8 store: the batched path (on a GPU, here on CPU torch) hands
    write_scene (M, K) int8 codes and the scene's pca_cosine stats, where the per-scene path hands
    float features that write_scene projects; the stores agree to one code step."""
    from concurrent.futures import ThreadPoolExecutor

    from tttkd.pipeline import batched
    from tttkd.pipeline.batched import extract_scenes, process_pool
    from tttkd.pipeline.extract import PrepConfig, extract_scene
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.teacher import load_teacher

    original, projected = batched.pca_codes, []
    monkeypatch.setattr(batched, "pca_codes", lambda f, b: projected.append(b.shape) or original(f, b))
    source = FeatureCache(pca_cache)
    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4,
                        feature_codec="pca-int8", pca_dims=64)
    stores = {path: tmp_path / f"{path}.zarr" for path in ("per_scene", "batched")}
    for store in stores.values():
        open_for_writing(store, source.provenance, basis=source.basis)
    reader, teacher = ScanNetReader(synth_root), load_teacher("efficientnet_lite0", device="cpu")
    ids = ["scene0000_00", "scene0001_00"]
    for scene_id in ids:
        assert extract_scene(reader, scene_id, teacher=teacher, config=config, store=stores["per_scene"],
                             split=None).status == "done"
    pool, writers = (process_pool(1), process_pool(1)) if processes else (ThreadPoolExecutor(2), 2)
    with pool:
        results = list(extract_scenes(reader, ids, teacher=teacher, config=config, store=stores["batched"],
                                      split=None, pool=pool, writers=writers))
    if processes:
        writers.shutdown()
    assert [r.status for r in results] == ["done", "done"], [r.reason for r in results]
    assert projected == [(source.provenance["feature_dim"], 64)] * 2  # on the extracting process's device
    for scene_id in ids:
        codes = {path: np.rint(zarr.open_array(store / "scenes" / scene_id / "feature", mode="r")[...]
                               .astype(np.float32) * 127).astype(int) for path, store in stores.items()}
        assert codes["batched"].shape == codes["per_scene"].shape and codes["batched"].shape[1] == 64
        # the same codes but where the two matmuls round a coefficient to the other side of a half
        steps = np.abs(codes["batched"] - codes["per_scene"])
        assert steps.max() <= 1 and (steps > 0).mean() < 0.01, (steps.max(), (steps > 0).mean())
        attrs = {path: FeatureCache(store).scene_attrs(scene_id) for path, store in stores.items()}
        for key in ("pca_cosine_mean", "pca_cosine_min"):
            assert attrs["batched"][key] == pytest.approx(attrs["per_scene"][key], abs=1e-4)
    assert [c.problems for c in verify_store(stores["batched"])] == [[]] * 2


def test_pca_codes_without_their_stats_or_of_another_width_are_refused(pca_cache, tmp_path):
    from tttkd.pipeline.cache import write_scene
    from tttkd.pipeline.scene import Scene

    source = FeatureCache(pca_cache)
    store = tmp_path / "p.zarr"
    open_for_writing(store, source.provenance, basis=source.basis)
    n = 10
    scene = Scene("scene0000_00", np.zeros((n, 3), np.float32), np.zeros((n, 3), np.uint8),
                  np.zeros((n, 3), np.float16), np.zeros(n, np.int16))
    common = dict(seen_index=np.arange(n, dtype=np.int32), view_count=np.ones(n, np.uint16), feature_codec="pca-int8")
    stats = {"pca_cosine_mean": 0.9, "pca_cosine_min": 0.8}
    with pytest.raises(ValueError, match="pca-int8 codes need 64 coefficients a point"):
        write_scene(store, scene, feature=np.zeros((n, 64), np.int8), attrs={}, **common)
    with pytest.raises(ValueError, match=r"need 64 coefficients a point \(got 32\)"):
        write_scene(store, scene, feature=np.zeros((n, 32), np.int8), attrs=stats, **common)
    assert write_scene(store, scene, feature=np.full((n, 64), 5, np.int8), attrs=stats, **common)
    assert FeatureCache(store).scene_attrs("scene0000_00")["pca_cosine_mean"] == 0.9
    assert np.array_equal(zarr.open_array(store / "scenes" / "scene0000_00" / "feature", mode="r")[...],
                          np.full((n, 64), np.float16(5 / 127)))


def test_a_new_store_can_fit_on_a_sample_and_take_the_rest_straight_into_the_basis(synth_root, synth_cache, tmp_path):
    from tttkd.pipeline.bench import _OtherScenes

    out = tmp_path / "p.zarr"
    result = runner.invoke(app, ["extract", "--dataset", "scannet", "--root", str(synth_root), "--model",
                                 "efficientnet_lite0", "--out", str(out), "--device", "cpu", "--batch-size", "4",
                                 "--feature-codec", "pca-int8", "--pca-dims", "16", "--basis-scenes", "2",
                                 "--scenes", "scene0000_00,scene0001_00,scene0002_00"])
    assert result.exit_code == 0, result.output
    assert "3 scenes extracted" in result.output and not (tmp_path / "p.zarr.fp16-staging").exists()
    cache = FeatureCache(out)
    sample = cache.root.attrs["pca_basis_scenes"]
    assert len(sample) == 2 and cache.scene_ids() == ["scene0000_00", "scene0001_00", "scene0002_00"]
    assert sorted(cache.root.attrs["last_run"]["done"]) == cache.scene_ids()  # the whole run, both parts
    # the basis is the one fitted on the sample's fp16 features alone
    (left_out,) = set(cache.scene_ids()) - set(sample)
    alone = fit_basis(_OtherScenes(FeatureCache(synth_cache), without={left_out}), dims=16, seed=0)
    np.testing.assert_allclose(cache.basis, alone, atol=1e-5)
    # the scene the basis has not seen keeps less of itself than the ones it was fitted on, and says so
    kept = {s: cache.scene_attrs(s)["pca_cosine_mean"] for s in cache.scene_ids()}
    assert kept[left_out] < min(kept[s] for s in sample)
    assert all(c.ok for c in verify_store(out))
    assert re.search(r"pca_basis_scenes +│ 2 \(the basis was fitted on these only\)", result.output)  # info
    refused = runner.invoke(app, ["extract", "--dataset", "scannet", "--root", str(synth_root), "--out",
                                  str(tmp_path / "x.zarr"), "--scenes", "scene0000_00", "--basis-scenes", "2"])
    assert refused.exit_code != 0 and "--basis-scenes 2: a number of scenes (1 or more) for --feature-codec pca-int8" \
        in refused.output
