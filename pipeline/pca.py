"""Stage 4 (cache), the `pca-int8` feature codec: a basis of K directions fitted on a store's features.

A `pca-int8` store keeps one orthonormal, *uncentred* basis B, (D, K) float32, as its root array
`pca_basis`, and per seen point the K coefficients c = B^T f of its feature f (the mean of unit view
features), stored as int8 at the fixed scale 127 exactly like the `int8` codec: |c| <= |f| <= 1, so
every coefficient lies in [-1, 1]. The decoded feature is B c = B B^T f, the orthogonal projection
of f onto span(B).

Why uncentred: the KD loss is a dot product with the raw target, -f_student/|f_student| . f
(tttkd/loss.py). Its error from replacing f by B B^T f is bounded by |f - B B^T f|, and the K
directions that minimise the mean of that squared residual are the top eigenvectors of the
uncentred second-moment matrix S = sum f f^T (centring would minimise the residual of f - mean
instead, and need the mean stored and added back). S is symmetric and positive semi-definite, so
its eigendecomposition is its SVD.

Fit: S over a seeded sample of the store's features: a window of rows of each complete scene
(a scene's rows are stored in a random order, so any window is a uniform sample of its seen
points), at most `sample_points` in all. Each column's sign is fixed (its largest-magnitude entry
positive), so refitting the same sample writes the same bytes.

`tttkd-prep extract --feature-codec pca-int8` needs features before it has a basis: the first run
into a new store extracts into an fp16 staging store beside it (`<out>.fp16-staging`), fits the
basis on it and recodes it (cache.recode) into `out`. Runs into an existing `pca-int8` store
project each new scene onto the stored basis directly. If the first run has failed scenes, `out`
still holds the recoded scenes that succeeded, and the staging store is kept (their fp16 features);
a re-run then finds the `pca-int8` store at `out` and extracts only what failed, straight into it
on the basis fitted without those scenes (see below; fp16 then `tttkd-prep recode` fits on all).
The staging store is removed by the first run, first or later, that has no failed scene. With
`--basis-scenes N` a first run stages and fits on a seeded sample of N of its scenes only, and
extracts the rest straight into the basis (`extract_pca`); its staging store (the sample's fp16
features) goes as soon as every scene of the sample is in, and scenes of the rest that fail are
redone by a re-run straight into the basis, like any later run. The option concerns a new store
only: an existing one keeps the basis it has.

A basis keeps what it was fitted on: on the embedded rooms (EfficientNet-Lite0, D = 472, K = 256)
the mean per-point cosine to the fp16 feature is 0.9987 for rooms in the fit and 0.968 for a room
left out of it (README). So fit on the whole store (one extraction run, or fp16 then one recode),
and every scene written records what the basis keeps of it (`pca_cosine_mean`, `pca_cosine_min`
in its attributes, cos(B B^T f, f) = |c| / |f|), which `tttkd-prep info` summarises.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

DEFAULT_PCA_DIMS = 256
"""K by default; see README ("Feature cache layout") for the fidelity measured at 64-384."""
SAMPLE_POINTS = 65536
"""Features in the fit's sample, spread evenly over the scenes: 64 per dimension at D = 1024; the
eigendecomposition of the (D, D) float64 moment takes seconds."""
ORTHONORMAL_TOLERANCE = 1e-4
"""max |B^T B - I| of a stored basis (float32 rounding of a float64 eigendecomposition is ~1e-7)."""


def fit_basis(cache, *, dims: int, sample_points: int = SAMPLE_POINTS, seed: int = 0, progress=None) -> np.ndarray:
    """(D, dims) float32 orthonormal basis: the top `dims` eigenvectors of the uncentred second
    moment of a seeded sample of the features of `cache` (a FeatureCache, any codec)."""
    feature_dim = cache.provenance["feature_dim"]
    if not 1 <= dims < feature_dim:
        raise ValueError(f"--pca-dims {dims}: choose 1..{feature_dim - 1} for {feature_dim}-dim features "
                         "(all of them: use --feature-codec int8)")
    scene_ids = cache.scene_ids()
    if not scene_ids:
        raise ValueError(f"{cache.path}: no complete scenes to fit a pca basis on")
    rng = np.random.default_rng(seed)
    per_scene = max(1, -(-sample_points // len(scene_ids)))
    moment = np.zeros((feature_dim, feature_dim), np.float64)
    count = 0
    for scene_id in scene_ids:
        rows = cache.scene_attrs(scene_id)["num_seen"]
        if rows:
            feature = cache.decode(cache.read_feature_window(scene_id, int(rng.integers(rows)), min(rows, per_scene)))
            moment += feature.T.astype(np.float64) @ feature.astype(np.float64)
            count += len(feature)
        if progress is not None:
            progress(scene_id)
    if count < dims:
        raise ValueError(f"{cache.path}: {count} seen points cannot fit a basis of {dims} directions")
    _, vectors = np.linalg.eigh(moment / count)  # ascending eigenvalues
    basis = vectors[:, ::-1][:, :dims]
    signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(dims)])
    return np.ascontiguousarray(basis * signs, dtype=np.float32)


def basis_problem(basis: np.ndarray, *, feature_dim: int, dims: int) -> str | None:
    """Why `basis` cannot be a store's pca basis, or None."""
    if basis.dtype != np.float32 or basis.shape != (feature_dim, dims):
        return f"pca_basis is {basis.dtype} {basis.shape}, expected float32 {(feature_dim, dims)}"
    if not np.isfinite(basis).all():
        return "pca_basis has non-finite values"
    error = np.abs(basis.T.astype(np.float64) @ basis - np.eye(dims)).max()
    if error > ORTHONORMAL_TOLERANCE:
        return f"pca_basis is not orthonormal (max |B^T B - I| = {error:.1e})"
    return None


def basis_sha256(basis: np.ndarray) -> str:
    """Checksum of the basis's little-endian float32 bytes, recorded in the provenance."""
    return hashlib.sha256(np.ascontiguousarray(basis, dtype="<f4").tobytes()).hexdigest()


def staging_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".fp16-staging")


def extract_pca(config, *, out: Path, scene_ids: list[str] | None = None, split: str | None = None,
                basis_scenes: int | None = None, **run):
    """`tttkd-prep extract --feature-codec pca-int8`: into an existing pca-int8 store, extract
    directly (each scene is projected onto its basis); into a new one, extract in fp16 into the
    staging store, fit the basis and recode (module docstring). With `basis_scenes` N, a new store
    stages only a seeded sample of N of the run's scenes, fits on them, and extracts the rest
    straight into the basis: fp16 staging for N scenes instead of all (ViT-L: ~130 MB a ScanNet
    scene), at the cost of a basis that has not seen the rest (the store's `pca_basis_scenes`
    attribute names the sample; each scene's pca_cosine attributes show what the basis keeps of
    it). Returns the extraction's report."""
    import time
    from dataclasses import replace

    from .cache import CacheError, FeatureCache, recode, set_root_attribute
    from .job import record_run, run_extraction

    start = time.perf_counter()

    assert config.feature_codec == "pca-int8" and config.pca_dims, config
    out = Path(out)
    if (out / "zarr.json").exists():
        stored = FeatureCache(out).provenance
        if (stored.get("feature_codec"), stored.get("pca_dims")) != ("pca-int8", config.pca_dims):
            raise CacheError(f"{out}: was written with feature_codec={stored.get('feature_codec')!r}, "
                             f"pca_dims={stored.get('pca_dims')!r}, this run has 'pca-int8', {config.pca_dims}; "
                             "write to another --out")
        report = run_extraction(config, out=out, scene_ids=scene_ids, split=split, **run)
        if not report.failed:  # the staging store a first run with failures kept has served its purpose
            shutil.rmtree(staging_path(out), ignore_errors=True)
        return report
    staging = staging_path(out)
    rest: list[str] = []
    if basis_scenes is not None:
        from .extract import make_reader

        ids = scene_ids if scene_ids is not None else make_reader(config.dataset, config.root,
                                                                  config.reader_options).scene_ids(split)
        if len(ids) > basis_scenes:
            picked = set(np.random.default_rng(config.seed).permutation(len(ids))[:basis_scenes].tolist())
            scene_ids = [s for i, s in enumerate(ids) if i in picked]
            rest = [s for i, s in enumerate(ids) if i not in picked]
    report = run_extraction(replace(config, feature_codec="fp16", pca_dims=None), out=staging, scene_ids=scene_ids,
                            split=split, **run)
    if report.done or report.skipped:
        recode(staging, out, feature_codec="pca-int8", pca_dims=config.pca_dims, seed=config.seed)
        staged = FeatureCache(staging)
        set_root_attribute(out, "last_run", staged.root.attrs.get("last_run"))
        if rest:
            set_root_attribute(out, "pca_basis_scenes", staged.scene_ids())
    if not report.failed:
        shutil.rmtree(staging)
    report.store = str(out)
    if rest and not (out / "zarr.json").exists():
        report.failed.update({s: "no pca basis: every scene of the basis sample failed" for s in rest})
    elif rest:  # straight into the basis (on a GPU: projected and encoded there)
        report.add(run_extraction(config, out=out, scene_ids=rest, split=split, **run))
        report.seconds = time.perf_counter() - start  # the fit and the recode between the two runs too
        record_run(out, report)  # the whole run, not only its second part
    return report
