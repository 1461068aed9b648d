"""`tttkd bench train`: training step time and the share of it spent waiting on data.
`tttkd bench ttt`: TTT step time and memory, the reference path beside the fast one."""

from __future__ import annotations

import time

import numpy as np
import torch

from tttkd.pipeline.bench import profile_run, sync as _sync
from tttkd.pipeline.cache import FeatureCache

from .data import CacheDataset, batches_per_epoch, in_channels, kd_basis, make_epoch_loader, make_loader
from .model import build_model, model_config
from .train import TrainConfig, batch_losses, make_optimizer


def bench_train(cache_path, config: TrainConfig, *, steps: int = 20, warmup: int = 3, device: str = "cpu",
                span_epochs: bool = True) -> dict:
    """Run `warmup + steps` training steps; time the wait for each batch and the compute of each step.
    `config.reference_input` selects the original input path, `config.memory_mb` the loader's scene
    memory, `span_epochs` the trainer's loader (one iterator over all epochs) or the earlier one (a
    fresh iterator every epoch, persistent workers)."""
    device = torch.device(device)
    cache = FeatureCache(cache_path)
    provenance = cache.provenance
    scene_ids = cache.scene_ids()
    mconfig = model_config(config.model, in_channels=in_channels(config.data.input_features),
                           num_classes=len(provenance["class_names"]),
                           kd_dim=provenance["feature_dim"] if config.use_kd else None)
    model = build_model(mconfig, device=device).train()
    optimizer, _ = make_optimizer(model, config, total_steps=steps + warmup)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    dataset = CacheDataset(cache_path, scene_ids, config.data, train=True, seed=config.seed,
                           memory_mb=config.memory_mb, reference=config.reference_input)
    basis = kd_basis(cache, device)
    waits, computes, voxels = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epochs = range(-(-(steps + warmup) // batches_per_epoch(len(dataset), config.batch_size)))
    if span_epochs:  # the trainer's loader: one pass over as many epochs as the steps need
        batches = iter(make_epoch_loader(dataset, batch_size=config.batch_size, shuffle=True, workers=config.workers,
                                         seed=config.seed, epochs=epochs)[0])
    else:
        loader, sampler = make_loader(dataset, batch_size=config.batch_size, shuffle=True, workers=config.workers,
                                      seed=config.seed)

        def per_epoch_iterators():
            for epoch in epochs:
                sampler.set_epoch(epoch)
                yield from loader  # a fresh iterator each epoch: its first batch starts from nothing

        batches = per_epoch_iterators()
    while len(computes) < steps + warmup:
        start = time.perf_counter()
        batch = next(batches).to(device)
        _sync(device)
        ready = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss, _, _ = batch_losses(model, batch, config, basis)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(device)
        waits.append(ready - start)
        computes.append(time.perf_counter() - ready)
        voxels.append(len(batch.grid_coord))
    waits, computes, voxels = waits[warmup:], computes[warmup:], voxels[warmup:]
    total = sum(waits) + sum(computes)
    return {
        "model": config.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": use_amp, "batch_size": config.batch_size, "workers": config.workers, "steps": steps,
        "input_path": "reference" if config.reference_input else "fast", "memory_mb": config.memory_mb,
        "loader": "one iterator over all epochs" if span_epochs else "an iterator per epoch",
        "scenes": len(scene_ids), "scenes_per_s": config.batch_size * len(computes) / total,
        "voxels_per_batch": sum(voxels) / len(voxels), "ms_per_step": 1e3 * total / len(computes),
        "ms_compute_per_step": 1e3 * sum(computes) / len(computes), "data_wait_fraction": sum(waits) / total,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }




def _slab_scene(size: int, *, kd_dim: int, voxel_size_m: float, device):
    """A flat multi-storey 'scan' of about `size` voxels: six horizontal slabs of side x side
    voxels, 25 voxels apart, one point per voxel, random features and unit teacher targets
    (timing does not depend on the values)."""
    from .adapt import TargetScene
    from .augment import PointSet

    side = int((size / 6) ** 0.5)
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    grid = np.concatenate([np.concatenate([xy, np.full((len(xy), 1), 25 * k)], 1) for k in range(6)])
    rng = np.random.default_rng(0)
    n = len(grid)
    points = PointSet(coord=((grid + 0.5) * voxel_size_m).astype(np.float32),
                      color=rng.uniform(0, 255, (n, 3)).astype(np.float32),
                      normal=np.tile(np.float32([0, 0, 1]), (n, 1)), label=np.zeros(n, np.int64),
                      seen_row=np.arange(n), source=np.zeros(n, np.int64))
    generator = torch.Generator(device).manual_seed(0)
    feature = torch.nn.functional.normalize(torch.randn(n, kd_dim, device=device, generator=generator), dim=1)
    return TargetScene(f"slabs{n}", points, np.arange(n), feature)


PATHS = {"reference": dict(reuse_pairs=False, cuda_graph=False), "fast": dict(reuse_pairs=True, cuda_graph=False)}
"""The reference path rebuilds spconv's index pairs at every forward (what TTT did before issue 9);
the fast path builds them once per rotation and reads nothing back inside the step loop, eagerly;
`graph=True` times it as a CUDA graph too, a third path: what `tttkd adapt` runs on CUDA
(AdaptConfig.cuda_graph)."""


def _profile_steps(step, count: int, device: torch.device) -> tuple[float | None, dict[str, float]]:
    """`count` calls of step(i) under torch.profiler -> (GPU kernel ms per step or None on CPU,
    {CUDA runtime call: calls per step})."""
    profiled = profile_run(lambda: [step(i) for i in range(count)], device)
    kernel_ms = None if profiled["kernel_ms"] is None else profiled["kernel_ms"] / count
    return kernel_ms, {key: n / count for key, n in profiled["runtime_calls"].items()}


def bench_ttt(sizes: tuple[int, ...] = (25_000, 100_000, 400_000), *, model: str = "minkunet34c", kd_dim: int = 1024,
              steps: int = 10, kd_points: int = 16384, device: str = "cuda", protocol_rotations: int = 0,
              protocol_steps: int = 100, tf32: bool = False, graph: bool = False, profile_steps: int = 0) -> list[dict]:
    """One row per scene size: ms per TTT step (forward, KD loss, backward, SGD) and peak memory of
    the reference and the fast path, timed in the same run (the peak includes the scene's teacher
    features on the device, `scene_feature_gb`); with `protocol_rotations` > 0, also
    the offline protocol of one scene (voxelise, `protocol_steps` steps and the predictions that
    `tttkd adapt` records, per rotation), timed over that many rotations and scaled to 8.

    ms per step is the wall time of `steps` consecutive steps over `steps`, after warm-up steps
    (on CUDA 3: spconv tunes its kernels on the first ones; the fast path records the pairs on the
    first): what the step loop of the protocol sees. With `tf32`, another path, "tf32": the fast
    path with its fp32 products on TF32 tensor cores (AdaptConfig.tf32). With `graph`, "graph": the
    fast path replayed as a CUDA graph from its third step (AdaptConfig.cuda_graph); `graph_captured`
    says whether the capture succeeded (else that path ran eagerly). With `profile_steps` > 0, that
    many more steps of each path run under torch.profiler: `kernel_ms_per_step_<path>` (CUDA) and
    `runtime_calls_per_step_<path>` (cudaMalloc, cudaFree, synchronisations, copies, launches).
    """
    from dataclasses import replace

    from .adapt import TTTKD, AdaptConfig, rotated, ttt_kd_offline
    from .data import DataConfig
    from .experiment import record_steps_for

    device = torch.device(device)
    data = DataConfig(voxel_size_m=0.04)
    torch.manual_seed(0)
    net = build_model(model_config(model, kd_dim=kd_dim, num_classes=20), device=device)
    gpu = device.type == "cuda"
    warmup = 3 if gpu else 1  # CPU: nothing to tune; one step records the pairs
    rows = []
    for size in sizes:
        scene = _slab_scene(size, kd_dim=kd_dim, voxel_size_m=data.voxel_size_m, device=device)
        row = {"voxels": None, "model": model, "kd_points": kd_points, "kd_dim": kd_dim, "steps": steps,
               "device": torch.cuda.get_device_name(device) if gpu else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        paths = {**PATHS, **({"tf32": {**PATHS["fast"], "tf32": True}} if tf32 else {}),
                 **({"graph": {**PATHS["fast"], "cuda_graph": True}} if graph else {})}
        for path, fields in paths.items():
            config = AdaptConfig(lr=1.0, kd_points=kd_points, steps=protocol_steps, **fields)
            adapter = TTTKD(net, config)
            view = rotated(scene, 0.0, data, device)
            row["voxels"] = len(view.voxels.indices)
            kd_voxels, target_rows = adapter.plan_targets(scene, view, np.random.default_rng(0),
                                                          steps=steps + warmup + profile_steps)
            if gpu:  # from before the warm-up: a graph allocates its step's memory when it is captured
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            for t in range(warmup):
                adapter.step(view, kd_voxels[t], scene.feature[target_rows[t]])
            _sync(device)
            start = time.perf_counter()
            for t in range(warmup, steps + warmup):
                adapter.step(view, kd_voxels[t], scene.feature[target_rows[t]])
            _sync(device)
            row[f"ms_per_step_{path}"] = 1e3 * (time.perf_counter() - start) / steps
            row[f"peak_gpu_mem_gb_{path}"] = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None
            row[f"reserved_gpu_mem_gb_{path}"] = torch.cuda.memory_reserved(device) / 2**30 if gpu else None
            if path == "graph":
                row["graph_captured"] = adapter.graph is not None and adapter.graph.graph is not None
            if profile_steps > 0:
                first = steps + warmup
                row[f"kernel_ms_per_step_{path}"], row[f"runtime_calls_per_step_{path}"] = _profile_steps(
                    lambda i: adapter.step(view, kd_voxels[first + i], scene.feature[target_rows[first + i]]),
                    profile_steps, device)
            adapter.reset()
            if protocol_rotations > 0:
                adapter.config = replace(config, rotations=protocol_rotations)
                _sync(device)
                start = time.perf_counter()
                ttt_kd_offline(adapter, scene, data, record_steps=record_steps_for(protocol_steps))
                _sync(device)
                row[f"protocol_s_{path}"] = (time.perf_counter() - start) * 8 / protocol_rotations
            adapter.graph = None
        row.update(ms_per_step=row["ms_per_step_fast"], peak_gpu_mem_gb=row["peak_gpu_mem_gb_fast"],
                   scene_feature_gb=scene.feature.numel() * scene.feature.element_size() / 2**30,
                   protocol_rotations_timed=protocol_rotations, protocol_steps=protocol_steps)
        rows.append(row)
        del scene
    return rows
