"""`tttkd bench extract`: images per second of the teacher alone and of the whole per-scene
extraction (decode + projection + teacher + sampling + cache write), measured in one run.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import cache
from .extract import PrepConfig, extract_scene, make_reader, provenance
from .teacher import decode_image, file_sha256, load_teacher, resolve_weights


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_extract(config: PrepConfig, *, scene_ids: list[str], device: str, repeats: int = 10,
                  warmup: int = 2) -> dict:
    """Time the teacher on batches of real images, then extract `scene_ids` end to end."""
    teacher = load_teacher(config.teacher, weights=config.weights, device=device)
    reader = make_reader(config.dataset, config.root, config.reader_options)
    views = reader.read_views(scene_ids[0]).views
    images = [teacher.prepare(decode_image(v.image_path, scale=config.image_scale))
              for v in (views * config.batch_size)[: config.batch_size]]
    batch = torch.stack(images)
    for _ in range(warmup):
        teacher.features(batch)
    sync(teacher.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        teacher.features(batch)
        sync(teacher.device)
        times.append(time.perf_counter() - start)
    model_seconds = float(np.median(times))

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        weights = resolve_weights(config.teacher, config.weights)
        record = provenance(config, feature_dim=teacher.feature_dim, stride=teacher.stride,
                            weights_sha256=file_sha256(weights), code_version="bench",
                            class_names=reader.class_names)
        cache.open_for_writing(store, record)
        extract_scene(reader, scene_ids[0], teacher=teacher, config=config, store=store, split=None)  # warm-up
        start = time.perf_counter()
        results = [extract_scene(reader, s, teacher=teacher, config=config, store=store, split=None) for s in scene_ids]
        sync(teacher.device)
        e2e_seconds = time.perf_counter() - start
    failed = {r.scene_id: r.reason for r in results if r.status != "done"}
    if failed:
        raise RuntimeError(f"benchmark scenes failed: {failed}")
    num_images = sum(r.num_views for r in results)
    return {
        "teacher": config.teacher,
        "device": torch.cuda.get_device_name(teacher.device) if teacher.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "image_size": list(batch.shape[-2:]),
        "batch_size": config.batch_size,
        "model_ms_per_batch": model_seconds * 1e3,
        "model_images_per_s": config.batch_size / model_seconds,
        "end_to_end_scenes": len(scene_ids),
        "end_to_end_images": num_images,
        "end_to_end_points": sum(r.num_points for r in results),
        "end_to_end_images_per_s": num_images / e2e_seconds,
        "end_to_end_s_per_scene": e2e_seconds / len(scene_ids),
    }


def default_bench_config(root: Path, teacher: str, **overrides) -> PrepConfig:
    return replace(PrepConfig(dataset="scannet", root=root, teacher=teacher), **overrides)
