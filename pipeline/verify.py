"""`tttkd-prep verify`: check that a feature cache is whole and sane before a lab trusts it.

For every complete scene: each array is present with its dtype and a shape that agrees with the
others and with the scene's attributes; every chunk exists (zarr would silently read a deleted
chunk as zeros) and passes its crc32c checksum; `seen_index` holds distinct in-range point
indices; coordinates and features are finite; each feature, a mean of unit vectors, has norm
≤ 1; view counts are ≥ 1; labels lie in the class list. A pca-int8 store's `pca_basis` must be
present, intact, orthonormal and the one its provenance's sha256 names. With `recompute`, K random
scenes are extracted again from the dataset and compared point by point, each codec at its own
precision (`MIN_COSINE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import ARRAY_NAMES, CacheError, FeatureCache

DTYPES = {"coord": "float32", "color": "uint8", "normal": "float16", "label": "int16", "seen_index": "int32",
          "feature": "float16", "view_count": "uint16"}
NORM_TOLERANCE = 1e-2  # float16 rounding of a mean of unit vectors
MIN_COSINE = {"fp16": 0.99, "int8": 0.97, "pca-int8": 0.97}
"""Lowest per-point cosine of a stored feature to a fresh extraction, by codec (int8 quantises each
component to 1/254; a mean of disagreeing views is shorter, so its direction loses more). pca-int8:
the decoded B c may fall short of what the basis allows, cos(B B^T f, f), by at most 1 - 0.97
(its coefficients are int8 like int8's components); the basis's own loss is reported, not judged."""


@dataclass
class SceneCheck:
    scene_id: str
    problems: list[str] = field(default_factory=list)
    min_cosine: float | None = None
    """Lowest per-point cosine against a fresh extraction (recomputed scenes only)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def norm_tolerance(provenance: dict) -> float:
    """How far above 1 a stored mean of unit vectors may read: fp16 rounding, or for int8 the worst
    case of D components each rounded by up to half a step of 1/127."""
    if provenance.get("feature_codec", "fp16") == "int8":
        return float(np.sqrt(provenance["feature_dim"]) * 0.5 / 127)
    if provenance.get("feature_codec") == "pca-int8":  # |c| = |B^T f| <= |f|, then int8 rounding
        return float(np.sqrt(provenance["pca_dims"]) * 0.5 / 127)
    return NORM_TOLERANCE


def check_scene(cache: FeatureCache, scene_id: str) -> SceneCheck:
    """Every check of the module docstring on one complete scene; problems are plain sentences."""
    result = SceneCheck(scene_id)
    group = cache.root["scenes"][scene_id]
    attrs = dict(group.attrs)
    arrays = {}
    for name in ARRAY_NAMES:
        try:
            array = group[name]
        except KeyError:
            result.problems.append(f"array {name} is missing")
            continue
        if str(array.dtype) != DTYPES[name]:
            result.problems.append(f"array {name} has dtype {array.dtype}, expected {DTYPES[name]}")
        if array.nchunks_initialized != array.nchunks:
            result.problems.append(f"array {name}: {array.nchunks - array.nchunks_initialized} of "
                                   f"{array.nchunks} chunks are missing")
        try:
            arrays[name] = array[...]
        except (ValueError, RuntimeError, OSError) as e:  # checksum mismatch, truncated or undecodable chunk
            result.problems.append(f"array {name}: corrupt chunk ({e})")
    if result.problems:
        return result
    n, m = attrs.get("num_points"), attrs.get("num_seen")
    shapes = {"coord": (n, 3), "color": (n, 3), "normal": (n, 3), "label": (n,), "seen_index": (m,),
              "view_count": (m,)}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            result.problems.append(f"array {name} has shape {arrays[name].shape}, expected {shape}")
    feature_dim = cache.provenance.get("pca_dims") or cache.provenance.get("feature_dim")  # pca-int8: K coefficients
    if arrays["feature"].shape != (m, feature_dim):
        result.problems.append(f"array feature has shape {arrays['feature'].shape}, expected {(m, feature_dim)}")
    if result.problems:
        return result
    seen = arrays["seen_index"]
    if len(seen) and (seen.min() < 0 or seen.max() >= n):
        result.problems.append(f"seen_index outside 0..{n - 1}")
    elif len(np.unique(seen)) != len(seen):
        result.problems.append("seen_index repeats a point")
    if not np.isfinite(arrays["coord"]).all():
        result.problems.append("coord has non-finite values")
    feature = arrays["feature"].astype(np.float32)
    if not np.isfinite(feature).all():
        result.problems.append("feature has non-finite values")
    elif len(feature) and (norm := np.linalg.norm(feature, axis=1).max()) > 1 + norm_tolerance(cache.provenance):
        result.problems.append(f"a feature has norm {norm:.3f} > 1 (a mean of unit vectors cannot)")
    if len(seen) and arrays["view_count"].min() < 1:
        result.problems.append("a seen point has view_count 0")
    classes = len(cache.provenance.get("class_names") or [])
    label = arrays["label"]
    if len(label) and classes and (label.min() < -1 or label.max() >= classes):
        result.problems.append(f"labels outside -1..{classes - 1}")
    return result


def recompare(cache: FeatureCache, scene_id: str, *, root: Path, weights: Path | None, device: str,
              scratch: Path) -> SceneCheck:
    """Extract the scene again into `scratch` with the store's own provenance and compare."""
    from .extract import PrepConfig, extract_scene, make_reader, provenance
    from .project import ProjectionConfig
    from .teacher import TEACHERS, feature_dim_of, file_sha256, load_teacher, resolve_weights
    from . import cache as cache_module

    stored = cache.provenance
    codec = stored.get("feature_codec", "fp16")
    config = PrepConfig(dataset=stored["dataset"], root=Path(root), teacher=stored["teacher"], weights=weights,
                        image_scale=stored["image_scale"], max_views=stored.get("max_views"),
                        projection=ProjectionConfig(**stored["projection"]), seed=stored.get("seed", 0),
                        reader_options=stored.get("reader_options") or {},
                        # pca-int8 is compared against fresh fp16 features (the scratch store has no basis)
                        feature_codec="fp16" if codec == "pca-int8" else codec)
    result = SceneCheck(scene_id)
    weights_path = resolve_weights(config.teacher, weights)
    if file_sha256(weights_path) != stored["weights_sha256"]:
        result.problems.append(f"{weights_path} is not the store's teacher weights (sha256 differs)")
        return result
    reader = make_reader(config.dataset, config.root, config.reader_options)
    cache_module.open_for_writing(scratch, provenance(
        config, feature_dim=feature_dim_of(config.teacher), stride=TEACHERS[config.teacher].stride,
        weights_sha256=stored["weights_sha256"], code_version=stored.get("code_version", ""),
        class_names=reader.class_names))
    teacher = load_teacher(config.teacher, weights=weights_path, device=device)
    done = extract_scene(reader, scene_id, teacher=teacher, config=config, store=scratch, split=None)
    if done.status != "done":
        result.problems.append(f"re-extraction failed: {done.reason}")
        return result
    stored_scene, fresh = cache.read(scene_id), FeatureCache(scratch).read(scene_id)
    if not np.array_equal(np.sort(stored_scene.seen_index), np.sort(fresh.seen_index)):
        result.problems.append("re-extraction sees other points")
        return result
    a = cache.decode(stored_scene.feature[np.argsort(stored_scene.seen_index)])
    b = fresh.feature[np.argsort(fresh.seen_index)].astype(np.float32)
    cosine = _cosine(a, b)
    result.min_cosine = float(cosine.min()) if len(cosine) else 1.0
    floor = MIN_COSINE[codec]
    if codec == "pca-int8" and len(cosine):
        basis = cache.basis
        allowed = _cosine(b @ basis @ basis.T, b)  # the best any coefficients in this basis can do
        shortfall = allowed - cosine
        if shortfall.max() > 1 - floor:
            worst = int(shortfall.argmax())
            result.problems.append(f"re-extracted features differ: a point's cosine {cosine[worst]:.3f} is "
                                   f"{shortfall[worst]:.3f} below the {allowed[worst]:.3f} its basis allows "
                                   f"(more than {1 - floor:.2f})")
    elif result.min_cosine < floor:
        result.problems.append(f"re-extracted features differ: lowest cosine {result.min_cosine:.3f} < {floor}")
    return result


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def verify_store(path: Path, *, recompute: int = 0, root: Path | None = None, weights: Path | None = None,
                 device: str = "cpu", seed: int = 0, scratch: Path | None = None, progress=None) -> list[SceneCheck]:
    """Check every complete scene of the store at `path`; re-extract `recompute` random ones."""
    import tempfile

    cache = FeatureCache(path)
    cache.basis  # a pca-int8 store's basis: missing, damaged or not the recorded one is a CacheError
    checks = []
    for scene_id in cache.scene_ids():
        checks.append(check_scene(cache, scene_id))
        if progress is not None:
            progress(scene_id)
    if recompute:
        if root is None:
            raise CacheError(f"{path}: --recompute needs the dataset root (--root) to extract scenes again")
        healthy = [c for c in checks if c.ok]
        picked = np.random.default_rng(seed).choice(len(healthy), size=min(recompute, len(healthy)), replace=False)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            for i in sorted(picked):
                again = recompare(cache, healthy[i].scene_id, root=root, weights=weights, device=device,
                                  scratch=Path(tmp) / "again.zarr")
                healthy[i].problems += again.problems
                healthy[i].min_cosine = again.min_cosine
    return checks


