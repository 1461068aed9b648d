"""`tttkd bench train`: training step time and the share of it spent waiting on data."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from tttkd.pipeline.cache import FeatureCache

from .data import CacheDataset, in_channels, make_loader
from .model import build_model, model_config
from .train import TrainConfig, batch_losses, make_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


