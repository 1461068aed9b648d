"""`tttkd bench extract`: images per second of the teacher alone and of the whole extraction
(decode + projection + teacher + sampling + cache write, the fast path of `batched.py`), measured in
one run at the same batch size, on ScanNet-sized embedded scenes.

A workload is (views per scene, points per scene, colour image size). The embedded generator writes
`unique` rooms of it (1296x968 or 640x480 colour JPEGs, 640x480 uint16 depth PNGs) in parallel,
ray-casting `rendered` frames per room; further views of a room are links to those frames (the same
poses again), and each room is listed `copies` times under other scene ids (its files linked, not
rewritten). Ray casting a frame costs about a second of CPU; this keeps a long enough timed run to
minutes of generation. Linked views and copies are decoded, projected, run and written again, so
they cost extraction what distinct ones would.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import cache, synth
from .batched import extract_scenes, process_pool
from .extract import PrepConfig, decode_view, make_reader, provenance
from .scene import Scene
from .teacher import file_sha256, load_teacher, resolve_weights


@dataclass(frozen=True)
class Workload:
    views: int
    """Views per scene."""
    points: int
    """About this many points per scene."""
    image_size: tuple[int, int] = (1296, 968)
    """(width, height) of the colour JPEGs; depth PNGs are 640x480."""

    @property
    def name(self) -> str:
        return f"{self.views}v-{self.points // 1000}k-{self.image_size[0]}x{self.image_size[1]}"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CALL_GROUPS = {"malloc": "Malloc", "free": "Free", "syncs": "Synchronize", "copies": "Memcpy", "launches": "Launch",
               "memsets": "Memset"}
"""CUDA API calls a profile counts, by what their names hold: allocations (a cudaFree waits for the
device), synchronisations and copies stop the host from running ahead; launches are its per-kernel cost."""


def grouped_calls(calls: dict[str, float]) -> dict[str, float]:
    """{CUDA API call: count} -> {group of CALL_GROUPS: count}."""
    return {group: sum(n for key, n in calls.items() if part in key) for group, part in CALL_GROUPS.items()}


def profile_run(work, device: torch.device, *, top: int = 8) -> dict:
    """work() under torch.profiler -> wall seconds, GPU kernel ms in all (None on CPU), the CUDA
    API calls counted (`CALL_GROUPS`) and the `top` kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        work()
        sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    calls = {e.key: e.count for e in events  # runtime (cuda*) and driver (cu*) API calls
             if e.key.startswith("cu") and any(part in e.key for part in CALL_GROUPS.values())}
    if cuda and calls.get("cudaDeviceSynchronize"):  # the profile's own closing sync is not the work's
        calls["cudaDeviceSynchronize"] -= 1
    return {"wall_s": wall,
            "kernel_ms": sum(e.device_time_total for e in kernels) / 1e3 if cuda else None,
            "runtime_calls": {key: n for key, n in calls.items() if n},
            "top_kernels_ms": {e.key[:80]: e.device_time_total / 1e3
                               for e in sorted(kernels, key=lambda e: -e.device_time_total)[:top]}}


def _write_room(root: Path, scene_id: str, workload: Workload, rendered: int, seed: int) -> None:
    rng = np.random.default_rng([seed, int(scene_id[5:9])])
    synth.write_scene(root, scene_id, domain=synth.DOMAINS["a"], rng=rng, views=min(rendered, workload.views),
                      invalid_pose=False, image_size=workload.image_size, depth_size=(640, 480), points=workload.points)
    frames = root / "scannet_frames_25k" / scene_id
    for view in range(rendered, workload.views):  # more views: links to the rendered frames
        source, target = f"{(view % rendered) * 100:06d}", f"{view * 100:06d}"
        for sub, ext in (("color", "jpg"), ("depth", "png"), ("pose", "txt")):
            (frames / sub / f"{target}.{ext}").symlink_to(frames / sub / f"{source}.{ext}")


def make_workload(root: Path, workload: Workload, *, unique: int, copies: int, rendered: int = 8,
                  seed: int = 0) -> list[str]:
    """Write `unique` rooms of `workload` under `root` (ScanNet layout), each with `rendered` frames
    ray-cast, and list each room `copies` times; return the scene ids. A finished workload folder
    (its `ids.txt`) is reused."""
    listing = root / "ids.txt"
    if listing.is_file():
        return listing.read_text().split()
    ids = [f"scene{i:04d}_00" for i in range(unique)]
    with ProcessPoolExecutor(min(unique, os.cpu_count() or 1)) as pool:  # ray casting is CPU-bound numpy
        list(pool.map(_write_room, [root] * unique, ids, [workload] * unique, [rendered] * unique, [seed] * unique))
    scene_ids = list(ids)
    for copy in range(1, copies):
        for i, source in enumerate(ids):
            target = f"scene{i:04d}_{copy:02d}"
            scan = root / "scans" / target
            scan.mkdir(parents=True, exist_ok=True)
            for suffix in ("_vh_clean_2.ply", "_vh_clean_2.labels.ply"):
                (scan / f"{target}{suffix}").symlink_to((root / "scans" / source / f"{source}{suffix}").resolve())
            (root / "scannet_frames_25k" / target).symlink_to((root / "scannet_frames_25k" / source).resolve())
            scene_ids.append(target)
    listing.write_text("\n".join(scene_ids))
    return scene_ids


def time_teacher(teacher, pixels: torch.Tensor, *, repeats: int, warmup: int) -> float:
    """Median seconds of the network on one batch already on the device (the teacher alone)."""
    batch = teacher.prepare_batch(pixels.to(teacher.device))
    for _ in range(warmup):
        teacher.features(batch)
    sync(teacher.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        teacher.features(batch)
        sync(teacher.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def host_costs(reader, scene_id: str, *, config: PrepConfig, teacher, store: Path, scratch: Path,
               views: int = 16, basis: np.ndarray | None = None) -> dict:
    """The host's own work per image, timed serially on one core after the run: decoding a view
    (the colour image at teacher scale and the depth image) and writing one scene as the run's
    writing processes store it (int8 and pca-int8: codes, as a GPU run hands them over), per view
    of that scene. `host_bound_images_per_s` is what all of the process's cores could sustain doing only
    this, with nothing left for the process that feeds the GPU: an upper bound on end to end."""
    scene_views = reader.read_views(scene_id).views
    timed = [scene_views[i % len(scene_views)] for i in range(views)]
    decode_view(timed[0], image_scale=config.image_scale, fit=teacher.spec)  # imports and caches warm
    start = time.perf_counter()
    for view in timed:
        decode_view(view, image_scale=config.image_scale, fit=teacher.spec)
    decode_s = (time.perf_counter() - start) / len(timed)
    stored = cache.FeatureCache(store)
    written, scene_attrs = stored.read(scene_id), stored.scene_attrs(scene_id)
    num_views = scene_attrs["num_views"]
    feature, attrs = written.feature, {}
    if config.feature_codec in ("int8", "pca-int8"):  # q / 127 as read (pca-int8: coefficients): the codes exactly
        feature = np.rint(feature.astype(np.float32) * 127).astype(np.int8)
        attrs = {k: v for k, v in scene_attrs.items() if k.startswith("pca_cosine")}
    scene = Scene(scene_id, written.coord, written.color, written.normal, written.label)
    cache.open_for_writing(scratch, stored.provenance, basis=basis)
    write_s = []
    for copy in range(2):  # the faster of two: the first one also creates the store's scene folders
        start = time.perf_counter()
        cache.write_scene(scratch, replace(scene, scene_id=f"{scene_id}_{copy}"), seen_index=written.seen_index,
                          feature=feature, view_count=written.view_count, attrs=attrs,
                          feature_codec=config.feature_codec)
        write_s.append(time.perf_counter() - start)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_image = decode_s + min(write_s) / num_views
    return {"decode_ms_per_image": decode_s * 1e3, "write_s_per_scene": min(write_s), "views_per_scene": num_views,
            "seen_points": len(written.seen_index), "host_core_ms_per_image": per_image * 1e3, "host_cores": cores,
            "host_bound_images_per_s": cores / per_image}


def bench_extract(config: PrepConfig, *, scene_ids: list[str], device: str, decoders: int, repeats: int = 10,
                  warmup: int = 3, store_dir: Path, write: bool = True, writers: int = 4,
                  profile_scenes: int = 0) -> dict:
    """Time the teacher alone on one batch of the workload's images, then extract `scene_ids` end to
    end with the fast path into a fresh store (after a warm-up scene in another store). With
    `profile_scenes` > 0, extract that many more (the first ones again, into a third store) under
    torch.profiler: `profile` holds its wall time, GPU kernel time, CUDA runtime calls and top kernels."""
    start = time.perf_counter()
    teacher = load_teacher(config.teacher, weights=config.weights, device=device)
    load_seconds = time.perf_counter() - start
    reader = make_reader(config.dataset, config.root, config.reader_options)
    views = reader.read_views(scene_ids[0]).views
    images = [decode_view(v, image_scale=config.image_scale, fit=teacher.spec).image
              for v in (views * config.batch_size)[: config.batch_size]]
    pixels = torch.from_numpy(np.stack(images))
    model_seconds = time_teacher(teacher, pixels, repeats=repeats, warmup=warmup)

    weights = resolve_weights(config.teacher, config.weights)
    start = time.perf_counter()
    digest = file_sha256(weights)
    hash_seconds = time.perf_counter() - start
    record = provenance(config, feature_dim=teacher.feature_dim, stride=teacher.stride, weights_sha256=digest,
                        code_version="bench", class_names=reader.class_names)
    with process_pool(decoders) as pool, process_pool(writers) as writing:
        basis = None
        if config.feature_codec == "pca-int8":  # a basis for timing: fitted on the first scene's fp16 features
            from .pca import fit_basis

            fitted = store_dir / "basis.zarr"
            cache.open_for_writing(fitted, {**record, "feature_codec": "fp16", "pca_dims": None})
            first = list(extract_scenes(reader, scene_ids[:1], teacher=teacher, store=fitted, split=None, pool=pool,
                                        config=replace(config, feature_codec="fp16"), writers=writing))
            if first[0].status != "done":
                raise RuntimeError(f"the scene to fit a pca basis on failed: {first[0].scene_id}: {first[0].reason}")
            basis = fit_basis(cache.FeatureCache(fitted), dims=config.pca_dims)
        warm = store_dir / "warmup.zarr"
        cache.open_for_writing(warm, record, basis=basis)
        list(extract_scenes(reader, scene_ids[:1], teacher=teacher, config=config, store=warm, split=None, pool=pool,
                            writers=writing))
        store = store_dir / "bench.zarr"
        cache.open_for_writing(store, record, basis=basis)
        sync(teacher.device)
        timings: dict = {}
        start = time.perf_counter()
        results = list(extract_scenes(reader, scene_ids, teacher=teacher, config=config, store=store, split=None,
                                      pool=pool, writers=writing, write=write, timings=timings))
        e2e_seconds = time.perf_counter() - start
        profiled, again_results = None, []
        if profile_scenes > 0:
            again = store_dir / "profile.zarr"
            cache.open_for_writing(again, record, basis=basis)
            profiled = profile_run(lambda: again_results.extend(extract_scenes(
                reader, scene_ids[:profile_scenes], teacher=teacher, config=config, store=again, split=None,
                pool=pool, writers=writing, write=write)), teacher.device)
            profiled["scenes"] = len(scene_ids[:profile_scenes])
    failed = {r.scene_id: r.reason for r in results + again_results if r.status != "done"}
    if failed:
        raise RuntimeError(f"benchmark scenes failed: {failed}")
    host = host_costs(reader, scene_ids[0], config=config, teacher=teacher, store=warm, scratch=store_dir / "host.zarr",
                      basis=basis)
    num_images = sum(r.num_views for r in results)
    model_rate = config.batch_size / model_seconds
    e2e_rate = num_images / e2e_seconds
    return {
        "teacher": config.teacher,
        "device": torch.cuda.get_device_name(teacher.device) if teacher.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(teacher.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_cores": os.cpu_count(),
        "decode_processes": decoders,
        "write_processes": writers,
        "image_size": list(pixels.shape[1:3]),
        "teacher_input": list(teacher.prepare_batch(pixels[:1]).shape[-2:]),
        "batch_size": config.batch_size,
        "feature_codec": config.feature_codec,
        "cache_write": write,
        "model_ms_per_batch": model_seconds * 1e3,
        "model_images_per_s": model_rate,
        "end_to_end_scenes": len(scene_ids),
        "end_to_end_images": num_images,
        "end_to_end_points": sum(r.num_points for r in results),
        "end_to_end_seen_points": sum(r.num_seen for r in results),
        "end_to_end_images_per_s": e2e_rate,
        "end_to_end_s_per_scene": e2e_seconds / len(scene_ids),
        "end_to_end_seconds": e2e_seconds,
        "ratio": e2e_rate / model_rate,
        "main_thread_s": timings,
        "host": host,
        "store_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()),
        "teacher_load_s": load_seconds,
        "weights_hash_s": hash_seconds,
        "profile": profiled,
    }


def default_bench_config(root: Path, teacher: str, **overrides) -> PrepConfig:
    return replace(PrepConfig(dataset="scannet", root=root, teacher=teacher), **overrides)


class _OtherScenes:
    """A store seen without some of its scenes: what `pca.fit_basis` reads, to fit a basis that has
    not seen the held-out scenes."""

    def __init__(self, cache: cache.FeatureCache, without: set[str]):
        self.cache, self.without = cache, without
        self.path, self.provenance = cache.path, cache.provenance

    def scene_ids(self) -> list[str]:
        return [s for s in self.cache.scene_ids() if s not in self.without]

    def __getattr__(self, name):  # scene_attrs, read_feature_window, decode
        return getattr(self.cache, name)


def _cosine_stats(decoded: np.ndarray, reference: np.ndarray) -> dict:
    norms = np.maximum(np.linalg.norm(decoded, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
    cosine = (decoded * reference).sum(1) / norms
    return {"mean": float(cosine.mean()), "p1": float(np.percentile(cosine, 1)), "min": float(cosine.min())}


def bench_codecs(store: Path, *, dims: tuple[int, ...] = (64, 128, 256, 384), work: Path) -> dict:
    """What each feature codec costs and keeps, on an fp16 store: for int8 and pca-int8 at each K,
    the store recoded under `work` (bytes per seen point, all arrays; seconds a scene's write takes
    in this process, fp16 too) and the cosine of each decoded
    feature to the fp16 one (mean, 1st percentile, min); and for pca-int8, the same cosine on each
    scene with a basis fitted on the store's other scenes (a basis meeting content it never saw),
    its coefficients through the store's int8 filter."""
    import numcodecs

    from .cache import feature_filters, recode
    from .pca import fit_basis

    fp16 = cache.FeatureCache(store)
    if fp16.provenance.get("feature_codec", "fp16") != "fp16":
        raise ValueError(f"{store}: a {fp16.provenance['feature_codec']} store; bench codecs compares against "
                         "an fp16 one")
    scene_ids = fp16.scene_ids()
    if len(scene_ids) < 2:
        raise ValueError(f"{store}: {len(scene_ids)} complete scene(s); the held-out basis needs at least 2")
    reference = {s: fp16.read(s).feature.astype(np.float32) for s in scene_ids}
    seen = sum(len(f) for f in reference.values())
    feature_dim = fp16.provenance["feature_dim"]
    everything = np.concatenate([reference[s] for s in scene_ids])
    rewritten = []  # the fp16 store written again: what its scenes' writes cost here
    recode(store, Path(work) / "fp16.zarr", feature_codec="fp16", write_seconds=rewritten)
    rows = [{"codec": "fp16", "dims": None, "bytes_per_seen_point": fp16.bytes_on_disk() / seen,
             "write_s_per_scene": float(np.mean(rewritten))}]
    int8_filter = numcodecs.get_codec(feature_filters("int8")[0].codec_config)  # the store's filter, synchronously
    for codec, k in [("int8", None)] + [("pca-int8", k) for k in dims if k < feature_dim]:
        recoded = Path(work) / f"{codec}{k or ''}.zarr"
        writes = []
        recode(store, recoded, feature_codec=codec, pca_dims=k, write_seconds=writes)
        decoded_cache = cache.FeatureCache(recoded)
        decoded = np.concatenate([decoded_cache.decode(decoded_cache.read(s).feature) for s in scene_ids])
        row = {"codec": codec, "dims": k, "bytes_per_seen_point": decoded_cache.bytes_on_disk() / seen,
               "write_s_per_scene": float(np.mean(writes)), "cosine": _cosine_stats(decoded, everything)}
        if k is not None:  # each scene with the basis of the others
            held_out = []
            for s in scene_ids:
                basis = fit_basis(_OtherScenes(fp16, {s}), dims=k)
                coefficients = reference[s] @ basis
                stored = int8_filter.decode(int8_filter.encode(coefficients.astype(np.float16))).astype(np.float32)
                held_out.append(stored.reshape(coefficients.shape) @ basis.T)
            row["cosine_held_out"] = _cosine_stats(np.concatenate(held_out), everything)
        rows.append(row)
    return {"store": str(store), "teacher": fp16.provenance.get("teacher"), "feature_dim": feature_dim,
            "scenes": len(scene_ids), "seen_points": seen, "date": time.strftime("%Y-%m-%d"), "rows": rows}
