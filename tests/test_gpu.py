"""The GPU lane: every path whose CUDA code differs from the CPU's, checked against the CPU.

On CUDA, spconv runs implicit-GEMM kernels (autograd only in training mode), the teacher runs in
bf16 and extraction accumulates on the GPU; on CPU everything is fp32 with spconv's Native
algorithm. These tests run one thing on both devices from the same weights and inputs and compare.
They are marked `gpu` and skipped without CUDA; run them on a GPU machine with

    pytest -m gpu
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from rooms import room_scene

from tttkd.adapt import AdaptConfig, TTTKD, rotated
from tttkd.data import Batch, DataConfig, voxelize
from tttkd.model import build_model, model_config
from tttkd.train import TrainConfig, batch_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DATA = DataConfig(voxel_size_m=0.04)
KD_DIM = 32


def twin_models(variant="minkunet34c", seed=0):
    """The same weights, built for CPU (Native) and for CUDA (default algorithms)."""
    torch.manual_seed(seed)
    cpu = build_model(model_config(variant, kd_dim=KD_DIM, num_classes=20), device="cpu")
    cuda = build_model(model_config(variant, kd_dim=KD_DIM, num_classes=20), device="cuda")
    cuda.load_state_dict(cpu.state_dict())
    return cpu, cuda


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30))


def zero_mean_inputs(voxels, seed=0):
    """The room's geometry with N(0, 1) input features. A freshly initialised 38 M-parameter
    network amplifies rounding on positive-mean inputs (colours, floor normals) to ~1e-3 in fp32
    on either device; on zero-mean inputs fp32 sits near the float64 result, so a path bug shows."""
    g = torch.Generator().manual_seed(seed)
    return voxels.replace_feature(torch.randn(voxels.features.shape, generator=g).to(voxels.features))


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def ttt_gradients(model, device, dtype=torch.float32):
    """Backbone gradients of one TTT step (what SGD at lr 1.0 subtracts from the weights)."""
    scene = room_scene(30_000, kd_dim=KD_DIM, device=device)
    adapter = TTTKD(model.to(dtype), AdaptConfig(lr=1.0, kd_points=4096))
    view = rotated(scene, 0.0, DATA, device)
    view.voxels = zero_mean_inputs(view.voxels)
    view.voxels = view.voxels.replace_feature(view.voxels.features.to(dtype))
    kd_voxel, kd_target = adapter.sample_targets(scene, view, np.random.default_rng(0))
    adapter.step(view, kd_voxel, kd_target.to(dtype))
    return gradients(model)


def test_one_ttt_step_on_cuda_computes_the_cpu_gradients():
    cpu, cuda = twin_models()
    reference = ttt_gradients(copy.deepcopy(cpu), "cpu", torch.float64)
    results = {"cpu": ttt_gradients(cpu, "cpu"), "cuda": ttt_gradients(cuda, "cuda")}
    backbone = sorted(n for n in reference if n.startswith("backbone."))
    assert len(backbone) == sum(1 for n, _ in cuda.named_parameters() if n.startswith("backbone."))
    assert set(results["cuda"]) == set(backbone), "TTT-KD trains exactly the backbone"
    assert all(results["cuda"][n].abs().sum() > 0 for n in backbone), "a backbone tensor got no gradient on CUDA"
    flat = lambda grads: torch.cat([grads[n].flatten() for n in backbone])
    errors = {device: relative_error(flat(grads), flat(reference)) for device, grads in results.items()}
    assert errors["cuda"] < 1e-3, errors
    assert relative_error(flat(results["cuda"]), flat(results["cpu"])) < 1e-3, errors


def room_batch(device, *, kd_points=2048, seed=0) -> Batch:
    scene = room_scene(30_000, kd_dim=KD_DIM, seed=seed)
    grid, representative, point_to_voxel = voxelize(scene.points.coord, DATA.voxel_size_m)
    voxel_points = scene.points.take(representative)
    rows = np.random.default_rng(seed).choice(len(scene.seen_index), kd_points, replace=False)
    features = torch.randn(len(grid), 6, generator=torch.Generator().manual_seed(seed))  # see zero_mean_inputs
    batch = Batch(grid_coord=torch.from_numpy(grid), batch_index=torch.zeros(len(grid), dtype=torch.int32),
                  features=features, label=torch.from_numpy(voxel_points.label),
                  kd_voxel=torch.from_numpy(point_to_voxel[scene.seen_index[rows]]),
                  kd_target=scene.feature[torch.from_numpy(rows)], num_scenes=1)
    return batch.to(device)


def training_gradients(model, device, dtype=torch.float32):
    """Gradients of one joint-training step (BN on batch statistics), and the updated BN statistics."""
    model.to(dtype).train()
    batch = room_batch(device)
    batch.features, batch.kd_target = batch.features.to(dtype), batch.kd_target.to(dtype)
    loss, _, _ = batch_losses(model, batch, TrainConfig())
    loss.backward()
    return gradients(model), {n: b.detach().double().cpu() for n, b in model.named_buffers() if "running" in n}


def test_one_training_step_on_cuda_matches_cpu():
    """Judged against float64: training-mode BN subtracts batch means in every layer, and a fresh
    MinkUNet34C's fp32 gradients sit about 3e-3 from float64 on CPU too (measured). CUDA must be
    of the same order as CPU fp32 (within 3x of its distance), and within 1e-3 where CPU fp32 is."""
    cpu, cuda = twin_models()
    reference, reference_statistics = training_gradients(copy.deepcopy(cpu), "cpu", torch.float64)
    results = {"cpu": training_gradients(cpu, "cpu"), "cuda": training_gradients(cuda, "cuda")}
    names = [n for n, _ in cpu.named_parameters()]
    grads = results["cuda"][0]
    assert sorted(grads) == sorted(names), "every parameter trains"
    assert all(grads[n].abs().sum() > 0 for n in names), "a parameter got no gradient on CUDA"
    flat = lambda g: torch.cat([g[n].flatten() for n in names])
    errors = {device: relative_error(flat(g), flat(reference)) for device, (g, _) in results.items()}
    # 3x: CUDA's scatter-adds are unordered, so its distance to float64 varies from run to run (2.0x CPU's on
    # an H200, 2026-11-26; under 2x before)
    assert errors["cuda"] < max(1e-3, 3 * errors["cpu"]) and errors["cuda"] < 1e-2, errors
    for name, value in reference_statistics.items():
        assert relative_error(results["cuda"][1][name], value) < 1e-4, name


def test_a_cpu_checkpoint_predicts_the_same_on_cuda():
    """A checkpoint written on CPU (Native convs) loads into CUDA's algorithms and predicts the
    same labels, through both prediction paths."""
    from dataclasses import asdict

    from tttkd.checkpoint import model_from_checkpoint

    cpu, _ = twin_models()
    cuda = model_from_checkpoint({"model_config": asdict(cpu.config), "model": cpu.state_dict()}, device="cuda")
    labels = {}
    for device, model in (("cpu", cpu), ("cuda", cuda)):
        scene = room_scene(60_000, kd_dim=KD_DIM, device=device)
        view = rotated(scene, 0.7, DATA, device)
        adapter = TTTKD(model, AdaptConfig())
        labels[device, "ttt"] = adapter.predict(view).argmax(1).cpu()  # convs in training mode, BN frozen
        model.eval()
        with torch.no_grad():
            logits = model.seg_head(model.forward_features(view.voxels)).float()  # eval mode: no autograd
        labels[device, "eval"] = logits.argmax(1)[view.point_to_voxel].cpu()
    for path in ("ttt", "eval"):
        agree = (labels["cuda", path] == labels["cpu", path]).float().mean().item()
        assert agree >= 0.999, (path, agree)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_one_scene_extracted_on_cuda_matches_cpu(tmp_path, codec):
    """The whole job on both devices: on CPU the per-scene numpy path, on CUDA the fast path
    (batched.py: a group task on a non-daemon Dask worker, decoding and writing processes, batched
    projection and sparse accumulation, copies on a side stream, arrays through shared memory; for
    int8, codes made on the GPU and stored as they are)."""
    from tttkd.pipeline.cache import FeatureCache
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction
    from tttkd.pipeline.synth import generate
    from tttkd.pipeline.teacher import build_network

    generate(tmp_path / "data", domain="a", scenes=1, seed=0, views=4)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.manual_seed(0)
    torch.save(build_network("dinov2_vits14").state_dict(), weights)
    config = PrepConfig(dataset="scannet", root=tmp_path / "data", teacher="dinov2_vits14", weights=weights,
                        feature_codec=codec)
    scenes = {}
    for device in ("cpu", "cuda"):
        store = tmp_path / f"{device}.zarr"
        report = run_extraction(config, out=store, scene_ids=["scene0000_00"], workers=1, device=device,
                                progress=False)
        assert report.done == ["scene0000_00"], report.failed
        scenes[device] = FeatureCache(store).read("scene0000_00")
    cpu, cuda = scenes["cpu"], scenes["cuda"]
    assert np.array_equal(np.sort(cpu.seen_index), np.sort(cuda.seen_index))
    order_cpu, order_cuda = np.argsort(cpu.seen_index), np.argsort(cuda.seen_index)
    a = torch.from_numpy(cpu.feature[order_cpu].astype(np.float32))
    b = torch.from_numpy(cuda.feature[order_cuda].astype(np.float32))
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cosine.min() >= 0.99, float(cosine.min())
    assert np.array_equal(cpu.view_count[order_cpu], cuda.view_count[order_cuda])


def test_many_scenes_through_the_cuda_stream_match_the_per_scene_path(tmp_path, shared_block_use):
    """The fast path's CUDA ordering under load: five scenes of 6 views in batches of 4 (batches span
    scenes), projections on their own stream while up to LEAD_BATCHES teacher batches are queued,
    decoded views and scenes (one loading ahead) back through shared blocks (a window of 8 views:
    every chunk after the first three), writes in processes that read the scene from its block. Each scene as the per-scene CPU path extracts it: the same seen points and view counts,
    features with cosine >= 0.99. A tensor of one stream freed while the other still reads it, a
    block reused before its views were copied, or a missed wait between the streams shows here."""
    from tttkd.pipeline import batched, cache
    from tttkd.pipeline.extract import PrepConfig, extract_scene
    from tttkd.pipeline.scannet import ScanNetReader
    from tttkd.pipeline.synth import generate
    from tttkd.pipeline.teacher import build_network, load_teacher

    ids = generate(tmp_path / "data", domain="a", scenes=5, seed=1, views=6)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.manual_seed(0)
    torch.save(build_network("dinov2_vits14").state_dict(), weights)
    config = PrepConfig(dataset="scannet", root=tmp_path / "data", teacher="dinov2_vits14", weights=weights,
                        batch_size=4)
    reader = ScanNetReader(tmp_path / "data")
    stores = {}
    for path in ("cpu", "cuda"):
        stores[path] = tmp_path / f"{path}.zarr"
        cache.open_for_writing(stores[path], {"teacher": "dinov2_vits14", "feature_codec": "fp16"})
    cpu_teacher = load_teacher("dinov2_vits14", weights=weights, device="cpu")
    for scene_id in ids:
        assert extract_scene(reader, scene_id, teacher=cpu_teacher, config=config, store=stores["cpu"],
                             split=None).status == "done"
    teacher = load_teacher("dinov2_vits14", weights=weights, device="cuda")
    with batched.process_pool(2) as pool, batched.process_pool(1) as writers:
        results = list(batched.extract_scenes(reader, ids, teacher=teacher, config=config, store=stores["cuda"],
                                              split=None, pool=pool, writers=writers, window=8))
    assert [r.status for r in results] == ["done"] * len(ids), [r.reason for r in results]
    use = shared_block_use
    assert not any(use.chunks[:3]) and all(use.chunks[3:]), use.chunks  # 3 chunks before a result
    assert use.scenes == [False, False, True, True, True]  # scenes after the first result, written from there
    for scene_id in ids:
        cpu, cuda = cache.FeatureCache(stores["cpu"]).read(scene_id), cache.FeatureCache(stores["cuda"]).read(scene_id)
        assert np.array_equal(np.sort(cpu.seen_index), np.sort(cuda.seen_index)), scene_id
        order_cpu, order_cuda = np.argsort(cpu.seen_index), np.argsort(cuda.seen_index)
        assert np.array_equal(cpu.view_count[order_cpu], cuda.view_count[order_cuda]), scene_id
        assert np.array_equal(cpu.coord, cuda.coord) and np.array_equal(cpu.label, cuda.label), scene_id
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(cpu.feature[order_cpu].astype(np.float32)),
                                                       torch.from_numpy(cuda.feature[order_cuda].astype(np.float32)))
        assert cosine.min() >= 0.99, (scene_id, float(cosine.min()))


def test_feature_codes_made_on_cuda_are_the_cpus():
    """int8 codes bit for bit (one float32 product, clamp, round half to even); pca-int8 codes to one
    step where the GPU's matmul rounds a coefficient across a half, and the same kept-cosine stats."""
    from tttkd.pipeline.batched import int8_codes, pca_codes

    torch.manual_seed(0)
    feature = torch.nn.functional.normalize(torch.randn(20_000, 1024), dim=1).half()
    feature[0, :2] = torch.tensor([1.004, -1.004]).half()
    assert torch.equal(int8_codes(feature.cuda()).cpu(), int8_codes(feature))
    basis = torch.linalg.qr(torch.randn(1024, 256))[0]
    cpu, cpu_stats = pca_codes(feature, basis)
    cuda, cuda_stats = pca_codes(feature.cuda(), basis.cuda())
    steps = (cuda.cpu().int() - cpu.int()).abs()
    assert steps.max() <= 1 and steps.float().mean() < 1e-2
    assert cuda_stats == pytest.approx(cpu_stats, abs=1e-5)


def test_page_locked_shared_blocks_receive_the_device_arrays_across_reuse():
    """Extraction copies a finished scene from the GPU into a reused shared-memory block that CUDA
    page-locked (cudaHostRegister): the bytes arrive, also in a block reused for a second scene."""
    from tttkd.pipeline.batched import SharedBlocks, _layout

    blocks = SharedBlocks(pin=True)
    names = set()
    for seed in (0, 1):
        torch.manual_seed(seed)
        arrays = {"seen_index": torch.randperm(50_000, device="cuda", dtype=torch.int32),
                  "feature": torch.randn(50_000 - 1000 * seed, 384, device="cuda").half()}
        layout, nbytes = _layout(arrays)
        block = blocks.take(nbytes)
        names.add(block.name)
        assert block.name in blocks.pinned, "cudaHostRegister failed: the copies would go through pageable memory"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for name, tensor in arrays.items():
                offset = layout[name][0]
                blocks.bytes(block)[offset: offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).copy_(
                    tensor.flatten())
        for name, (offset, shape, dtype) in layout.items():
            host = np.ndarray(shape, dtype=np.dtype(dtype), buffer=block.buf, offset=offset)
            assert np.array_equal(host, arrays[name].cpu().numpy()), name
            del host
        blocks.give(block)
    assert len(names) == 1, "the second, smaller scene reuses the first one's block"
    blocks.close()
    assert not blocks.pinned and not blocks.views


def test_batched_projection_on_cuda_returns_the_numpy_rows():
    """project_views on the GPU (float64 there too) against project_view, depth and z-buffer views."""
    from test_extract_fast import random_views

    from tttkd.pipeline.project import ProjectionConfig, project_view, project_views

    rng = np.random.default_rng(5)
    coord = rng.uniform(-2, 2, (20_000, 3)) * [1, 1, 0.5]
    views = random_views(rng, coord, 9)
    view_index, point_index, uv = (t.cpu() for t in project_views(torch.from_numpy(coord).cuda(), views,
                                                                  config=ProjectionConfig()))
    for i, g in enumerate(views):
        reference = project_view(coord, g.cam_to_world, g.camera, config=ProjectionConfig(), image_scale=g.image_scale,
                                 depth=g.depth, depth_camera=g.depth_camera, depth_scale=g.depth_scale)
        rows = (view_index == i).numpy()
        np.testing.assert_array_equal(point_index[rows].numpy(), reference.point_index)
        np.testing.assert_allclose(uv[rows].numpy(), reference.uv, atol=1e-3)


FAST_PATHS = {"reference": dict(reuse_pairs=False, cuda_graph=False), "reuse": dict(reuse_pairs=True, cuda_graph=False),
              "graph": dict(reuse_pairs=True, cuda_graph=True)}


def test_reused_pairs_and_the_cuda_graph_step_match_the_rebuilt_path():
    """Index pairs built once (eager), and the captured step replayed, against pairs rebuilt every
    step: the same losses, parameters and predictions after 8 steps on CUDA."""
    import warnings

    from tttkd import fast_ttt

    _, cuda = twin_models()
    scene = room_scene(40_000, kd_dim=KD_DIM, device="cuda")
    source = {n: p.detach().double().cpu() for n, p in cuda.named_parameters()}
    results = {}
    for path, fields in FAST_PATHS.items():
        adapter = TTTKD(copy.deepcopy(cuda), AdaptConfig(lr=0.1, kd_points=4096, **fields))
        view = rotated(scene, 0.3, DATA, "cuda")
        view.voxels = zero_mean_inputs(view.voxels)
        kd_voxels, rows = adapter.plan_targets(scene, view, np.random.default_rng(0), steps=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            losses = torch.stack([adapter.step(view, kd_voxels[t], scene.feature[rows[t]]) for t in range(8)])
        captured = adapter.graph is not None and adapter.graph.graph is not None
        if path == "graph":  # captured, or (spconv 2.3.8) refused with a warning, and then eager
            assert captured or any("could not be captured" in str(w.message) for w in caught) or fast_ttt._capture_failed
        else:
            assert adapter.graph is None
        params = {n: p.detach().double().cpu() for n, p in adapter.model.named_parameters()}
        results[path] = losses.cpu(), params, adapter.predict(view)
    losses, params, prediction = results["reference"]
    backbone = [n for n in params if n.startswith("backbone.")]
    flat = lambda p: torch.cat([p[n].flatten() for n in backbone])
    update = lambda p: torch.cat([(p[n] - source[n]).flatten() for n in backbone])
    assert update(params).norm() > 0
    for path in ("reuse", "graph"):
        other_losses, other_params, other_prediction = results[path]
        torch.testing.assert_close(other_losses, losses, rtol=1e-4, atol=1e-6)
        errors = (relative_error(flat(other_params), flat(params)), relative_error(update(other_params), update(params)),
                  relative_error(other_prediction, prediction))
        assert errors[0] < 1e-4 and errors[1] < 1e-3 and errors[2] < 1e-4, (path, errors)


def test_offline_protocol_with_the_cuda_graph_matches_the_reference_path():
    """Two rotations: each records its own pairs and captures its own graph (a graph or pairs left
    from the other rotation would be wrong); the recorded predictions reuse the pairs."""
    from tttkd.adapt import ttt_kd_offline

    _, cuda = twin_models()
    scene = room_scene(40_000, kd_dim=KD_DIM, device="cuda")
    totals, losses = {}, {}
    for path in ("reference", "graph"):
        adapter = TTTKD(copy.deepcopy(cuda), AdaptConfig(lr=0.1, kd_points=4096, rotations=2, **FAST_PATHS[path]))
        losses[path] = []
        totals[path] = ttt_kd_offline(adapter, scene, DATA, record_steps=[0, 2, 6], kd_losses=losses[path])
    np.testing.assert_allclose(losses["graph"], losses["reference"], rtol=1e-4)
    for step in (0, 2, 6):
        assert relative_error(totals["graph"][step], totals["reference"][step]) < 1e-4, step
    assert relative_error(totals["graph"][6], totals["graph"][0]) > 1e-4  # the steps did something


def test_tf32_steps_stay_close_to_fp32_on_cuda():
    """AdaptConfig.tf32 (TF32 tensor cores for spconv's and torch's fp32 products): after 8 steps the
    losses, backbone update and predictions stay within TF32's precision of the fp32 path, and
    differ from it (the switch reaches the kernels). Whether the adapted mIoU is unchanged is for
    `tttkd adapt --tf32` on real scenes to show."""
    _, cuda = twin_models()
    scene = room_scene(40_000, kd_dim=KD_DIM, device="cuda")
    source = {n: p.detach().double().cpu() for n, p in cuda.named_parameters()}
    results = {}
    for tf32 in (False, True):
        adapter = TTTKD(copy.deepcopy(cuda), AdaptConfig(lr=0.1, kd_points=4096, tf32=tf32))
        view = rotated(scene, 0.3, DATA, "cuda")
        view.voxels = zero_mean_inputs(view.voxels)
        kd_voxels, rows = adapter.plan_targets(scene, view, np.random.default_rng(0), steps=8)
        losses = torch.stack([adapter.step(view, kd_voxels[t], scene.feature[rows[t]]) for t in range(8)])
        params = {n: p.detach().double().cpu() for n, p in adapter.model.named_parameters() if n.startswith("backbone.")}
        results[tf32] = losses.cpu(), params, adapter.predict(view)
    assert not torch.backends.cuda.matmul.allow_tf32  # restored after the steps
    update = lambda p: torch.cat([(p[n] - source[n]).flatten() for n in p])
    (l32, p32, y32), (ltf, ptf, ytf) = results[False], results[True]
    torch.testing.assert_close(ltf, l32, rtol=1e-2, atol=1e-4)
    errors = relative_error(update(ptf), update(p32)), relative_error(ytf, y32)
    assert errors[0] < 5e-2 and errors[1] < 2e-2, errors
    assert errors[0] > 0, "TF32 left every update bit-identical: the switch did not reach spconv's kernels"


def test_a_ttt_step_with_recorded_pairs_allocates_nothing_outside_torchs_allocator():
    """spconv's 5^3 stem runs Native even on CUDA, and its backward made cumm cudaMalloc and cudaFree
    a split-K workspace for every kernel offset with pairs, every step (each cudaFree a wait for
    the whole device). With the pairs recorded, the stem is a gather and a product (model.GatherStem):
    the step's only device allocations are those of torch's caching allocator."""
    from torch.profiler import ProfilerActivity, profile

    _, cuda = twin_models()
    scene = room_scene(40_000, kd_dim=KD_DIM, device="cuda")
    # the eager step: a replayed graph calls no allocator at all, and would hide the stem's calls
    adapter = TTTKD(copy.deepcopy(cuda), AdaptConfig(lr=0.1, kd_points=4096, cuda_graph=False))
    view = rotated(scene, 0.3, DATA, "cuda")
    kd_voxels, rows = adapter.plan_targets(scene, view, np.random.default_rng(0), steps=9)
    for t in range(3):  # records the pairs, gathers the stem, lets spconv tune its kernels
        adapter.step(view, kd_voxels[t], scene.feature[rows[t]])
    stem = view.pairs._stem
    assert stem is not None, "the stem was not gathered: spconv's Native stem still runs"

    def allocations(steps):
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats().get("segment.all.allocated", 0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for t in steps:
                adapter.step(view, kd_voxels[t], scene.feature[rows[t]])
            torch.cuda.synchronize()
        counts = {e.key: e.count for e in prof.key_averages() if e.key in ("cudaMalloc", "cudaFree")}
        return counts.get("cudaMalloc", 0), counts.get("cudaFree", 0), \
            torch.cuda.memory_stats().get("segment.all.allocated", 0) - before

    view.pairs._stem = None  # the control: spconv's Native stem, whose allocations the profiler must see
    malloc, free, _ = allocations(range(3, 6))
    assert malloc > 0 and free > 0, "the profiler saw no cudaMalloc/cudaFree of spconv's stem: this test proves nothing"
    view.pairs._stem = stem
    malloc, free, by_torch = allocations(range(6, 9))
    assert malloc <= by_torch and free == 0, (malloc, free, by_torch)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode, kind", [("global", "GlobalBatchNorm"), ("fused", "SyncBatchNorm")])
def test_ddp_batch_norm_on_two_gpus_equals_batch_norm_over_the_concatenated_batch(tmp_path, mode, kind):
    """NCCL on two GPUs: our GlobalBatchNorm, and torch's SyncBatchNorm (`--ddp-batch-norm fused`),
    give the outputs, gradients and running statistics of one BatchNorm1d over both processes' rows."""
    from test_ddp import check_batch_norm_over_the_concatenated_batch

    parts = check_batch_norm_over_the_concatenated_batch(tmp_path, device="cuda", mode=mode)
    assert {p["kind"] for p in parts} == {kind}
