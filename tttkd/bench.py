"""`tttkd bench train`: training step time and the share of it spent waiting on data."""

from __future__ import annotations

import time

import torch

from tttkd.pipeline.bench import sync as _sync
from tttkd.pipeline.cache import FeatureCache

from .data import CacheDataset, in_channels, make_loader
from .model import build_model, model_config
from .train import TrainConfig, batch_losses, make_optimizer


def bench_train(cache_path, config: TrainConfig, *, steps: int = 20, warmup: int = 3, device: str = "cpu") -> dict:
    """Run `warmup + steps` training steps; time the wait for each batch and the compute of each step."""
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
    dataset = CacheDataset(cache_path, scene_ids, config.data, train=True, seed=config.seed)
    waits, computes, voxels, epoch = [], [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader_all, sampler = make_loader(dataset, batch_size=config.batch_size, shuffle=True, workers=config.workers,
                                      seed=config.seed)
    while len(computes) < steps + warmup:
        sampler.set_epoch(epoch)
        loader = iter(loader_all)
        epoch += 1
        while len(computes) < steps + warmup:
            start = time.perf_counter()
            try:
                batch = next(loader).to(device)
            except StopIteration:
                break
            _sync(device)
            ready = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss, _, _ = batch_losses(model, batch, config)
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
        "voxels_per_batch": sum(voxels) / len(voxels), "ms_per_step": 1e3 * total / len(computes),
        "ms_compute_per_step": 1e3 * sum(computes) / len(computes), "data_wait_fraction": sum(waits) / total,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }




def bench_ttt(sizes: tuple[int, ...] = (25_000, 100_000, 400_000), *, model: str = "minkunet34c", kd_dim: int = 1024,
              steps: int = 10, kd_points: int = 16384, device: str = "cuda") -> list[dict]:
    """ms per TTT step (forward, KD loss, backward, SGD) and peak memory, on flat multi-storey
    'scans' of about `sizes` voxels (random features: timing does not depend on them)."""
    from .adapt import AdaptConfig, TTTKD

    device = torch.device(device)
    torch.manual_seed(0)
    net = build_model(model_config(model, kd_dim=kd_dim, num_classes=20), device=device)
    adapter = TTTKD(net, AdaptConfig(lr=1.0, kd_points=kd_points))
    rows = []
    for size in sizes:
        side = int((size / 6) ** 0.5)  # six horizontal slabs of side x side voxels, 25 voxels apart
        xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        grid = torch.cat([torch.cat([xy, torch.full((len(xy), 1), 25 * k)], 1) for k in range(6)]).int().to(device)
        from .adapt import RotatedScene
        from .model import sparse_input

        voxels = sparse_input(grid, torch.zeros(len(grid), dtype=torch.int32, device=device),
                              torch.randn(len(grid), 6, device=device), 1)
        scene = RotatedScene(voxels, torch.arange(len(grid), device=device))
        kd_voxel = torch.randint(0, len(grid), (kd_points,), device=device)
        target = torch.nn.functional.normalize(torch.randn(kd_points, kd_dim, device=device), dim=1)
        for _ in range(3):  # warm-up: the first steps tune spconv's kernels
            adapter.step(scene, kd_voxel, target)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            adapter.step(scene, kd_voxel, target)
            _sync(device)
            times.append(time.perf_counter() - start)
        adapter.reset()
        rows.append({"voxels": len(grid), "ms_per_step": 1e3 * sorted(times)[len(times) // 2],
                     "peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                     "model": model, "kd_points": kd_points, "kd_dim": kd_dim,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
    return rows
