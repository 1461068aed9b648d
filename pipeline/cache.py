"""Stage 4: the feature cache, a self-contained Zarr v3 store per dataset x teacher configuration.

Layout (read it with plain `zarr`; nothing here is pickled):

    <store>/                      group; attrs: tttkd_cache (format version), provenance
    <store>/scenes/               group
    <store>/scenes/<scene_id>/    group; attrs: complete, split (null: extracted with --scenes and
                                  no --split), num_points, num_seen, num_views, views_skipped
        coord       (N, 3)  float32   metres, world frame
        color       (N, 3)  uint8     RGB
        normal      (N, 3)  float16   unit normals (zero where unknown)
        label       (N,)    int16     class index, -1 = ignore
        seen_index  (M,)    int32     indices of the points seen by at least one view, in a random
                                      order: any contiguous block of rows is a uniform sample
        feature     (M, D)  float16   mean over views of the L2-normalised teacher features
                                      (pca-int8: (M, K) coefficients in the store's basis)
        view_count  (M,)    uint16    number of views that saw each point
    <store>/pca_basis  (D, K) float32  pca-int8 stores only: the orthonormal basis (pipeline/pca.py)

`feature` holds mean_i(g_i / |g_i|) per point, deliberately not re-normalised: for a unit student
vector f, E_i[f . g_i/|g_i|] = f . mean_i(g_i/|g_i|), so the cosine KD loss against this mean is
exactly the paper's expectation over images (§3.2) at the cost of one vector per point.

`provenance` names the teacher, its weights' sha256, the image scale, stride, feature dim and
dtype, the projection parameters, dataset, splits and code version; a trainer refuses a cache whose
teacher differs from its checkpoint's.

Feature codecs (`provenance.feature_codec`; see `feature_filters`): "fp16"; "int8", each component
as round(127 x) in one byte; "pca-int8", the K = `provenance.pca_dims` coefficients c = B^T f of
each feature in the store's basis B, as int8 like "int8". plain zarr-python decodes both int8
codecs to float16 (for pca-int8: the coefficients; B c is the feature). `FeatureCache.decode`
expands coefficients; the KD loss never needs to (tttkd/loss.py).

Integrity: every chunk carries a crc32c checksum (zarr's `crc32c` codec after zstd), so a flipped
bit or a truncated chunk fails on read with an error naming the scene and the array;
`tttkd-prep verify` checks a whole store.

Faults and concurrency (several workers, several `extract` runs into one store, kills at any moment):
  - zarr's LocalStore writes every file, `zarr.json` included, to a temporary name and renames it
    (zarr-python PR #3412, Aug 2025; 3.1.6 here), so a killed process leaves the old or the new
    file, never a torn one (at worst a stray *.partial);
  - a scene's arrays are written first and `complete: true` last, in one metadata write: a scene
    without it is never read, and the next run redoes it from scratch;
  - `<store>/.scene-locks/<scene_id>`: an OS lock (fcntl.flock) held for the whole write of that
    scene. Under it the writer looks again: a scene another run completed meanwhile is kept, never
    overwritten, so two runs on one scene end with the first one's whole scene;
  - `<store>/.lock`: an OS lock held around every read-modify-write of the root attributes
    (creating the store, the provenance's `splits`, `last_run`), so concurrent runs lose none.
  The kernel drops a killed process's locks. The lock files stay (empty); the locks need a file
  system with working flock (local disks; NFS v4).
Metadata is not consolidated: consolidated metadata would hide scenes added by a later run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs.numcodecs import FixedScaleOffset
from zarr.core.array import Array, AsyncArray
from zarr.core.dtype import parse_dtype

from .scene import Scene, check_scene_id

FORMAT_VERSION = 1
ARRAY_NAMES = ("coord", "color", "normal", "label", "seen_index", "feature", "view_count")
POINT_CHUNK = 1 << 17  # rows per chunk of per-point arrays: ~1.5 MB of coord
FEATURE_CHUNK_BYTES = 4 << 20  # 2048 rows of ViT-L features: a KD window touches few chunks
# provenance keys that must agree for two runs to write into one store
IDENTITY_KEYS = ("teacher", "weights_sha256", "image_scale", "feature_dim", "feature_dtype", "feature_codec",
                 "pca_dims", "stride", "projection", "dataset", "reader_options")
BASIS_ARRAY = "pca_basis"  # root array of a pca-int8 store: (D, K) float32 (pipeline/pca.py)


class CacheError(ValueError):
    """A feature cache is missing, incomplete or does not match what the caller needs."""


@dataclass(frozen=True)
class CachedScene:
    """One complete scene read back from the cache."""

    scene_id: str
    coord: np.ndarray       # (N, 3) float32
    color: np.ndarray       # (N, 3) uint8
    normal: np.ndarray      # (N, 3) float16
    label: np.ndarray       # (N,) int16
    seen_index: np.ndarray  # (M,) int32
    feature: np.ndarray     # (M, D) float16
    view_count: np.ndarray  # (M,) uint16


def open_for_writing(path: Path, provenance: dict, *, split: str | None = None, scene_ids: list[str] = (),
                     basis: np.ndarray | None = None) -> set[str]:
    """Create the store, or reopen one whose provenance matches; return the ids of complete scenes.

    `split` (None: no split) is recorded for this run's `scene_ids`: complete ones, which the run
    skips, get it here (see `assign_split`). Called once per run, by the job's client, before its
    workers write; runs started at the same time are serialised by the store's root lock.
    A new pca-int8 store needs its `basis` (pca.fit_basis); an existing one keeps the basis it has.
    """
    path = Path(path)
    pca = provenance.get("feature_codec") == "pca-int8"
    if pca and basis is not None:
        from .pca import basis_problem, basis_sha256

        problem = basis_problem(basis, feature_dim=provenance.get("feature_dim"), dims=provenance.get("pca_dims"))
        if problem:
            raise CacheError(f"{path}: {problem}")
        provenance = {**provenance, "pca_basis_sha256": basis_sha256(basis)}
    with root_lock(path):
        if (path / "zarr.json").exists():
            root = zarr.open_group(path, mode="r+", zarr_format=3)
            stored = root.attrs.get("provenance")
            if root.attrs.get("tttkd_cache") != FORMAT_VERSION or stored is None:
                raise CacheError(f"{path}: exists but is not a tttkd feature cache (format {FORMAT_VERSION})")
            for key in IDENTITY_KEYS:
                if stored.get(key) != provenance.get(key):
                    raise CacheError(
                        f"{path}: was written with {key}={stored.get(key)!r}, this run has {provenance.get(key)!r}; "
                        "write to another --out"
                    )
            if split is not None and "scenes" in root:
                complete = complete_scene_ids(path)
                assign_split(path, [s for s in scene_ids if s in complete], split)
            splits = sorted(set(stored.get("splits", [])) | ({split} if split else set()))
            root.attrs["provenance"] = {**stored, "splits": splits}
        else:  # one metadata write: a kill leaves no store, or a whole root
            if pca and basis is None:
                raise CacheError(f"{path}: a new pca-int8 store needs its basis before any feature: run "
                                 "`tttkd-prep extract --feature-codec pca-int8` (it stages fp16 features and fits "
                                 "one) or `tttkd-prep recode` an fp16 store")
            root = zarr.create_group(path, zarr_format=3, attributes={
                "tttkd_cache": FORMAT_VERSION, "provenance": {**provenance, "splits": [split] if split else []}})
        if pca and BASIS_ARRAY not in root:
            if basis is None:  # a kill between the root and its basis; the basis is never rewritten otherwise
                raise CacheError(f"{path}: pca-int8 store without its {BASIS_ARRAY} (an interrupted creation): "
                                 "remove it and run again")
            array = root.create_array(BASIS_ARRAY, shape=basis.shape, dtype=np.float32, chunks=basis.shape,
                                      compressors=chunk_compressors())
            array[...] = basis
        if "scenes" not in root:
            root.create_group("scenes")
        return complete_scene_ids(path)


def set_root_attribute(path: Path, key: str, value) -> None:
    """Set one root attribute (e.g. `last_run`) under the store's root lock."""
    with root_lock(path):
        zarr.open_group(path, mode="r+", zarr_format=3).attrs[key] = value


@contextmanager
def _flock(lock_file: Path):
    """Hold an exclusive fcntl.flock on `lock_file` (created if absent); closing the file, or the
    death of the process, releases it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def root_lock(path: Path):
    """The lock around every read-modify-write of the store's root attributes: `<store>/.lock`."""
    return _flock(Path(path) / ".lock")


def scene_lock(path: Path, scene_id: str):
    """The lock held while one scene is written: `<store>/.scene-locks/<scene_id>`."""
    return _flock(Path(path) / ".scene-locks" / check_scene_id(scene_id))


def complete_scene_ids(path: Path) -> set[str]:
    scenes = zarr.open_group(Path(path) / "scenes", mode="r", zarr_format=3)
    return {name for name, group in scenes.groups() if group.attrs.get("complete") is True}


def assign_split(path: Path, scene_ids: list[str], split: str) -> None:
    """Record `split` on complete scenes that a rerun skips: a scene extracted without a split (with
    --scenes) joins `split`; a scene already in another split is refused, never moved silently.

    Called by the job's client before its workers start; workers never write skipped scenes."""
    scenes = zarr.open_group(Path(path) / "scenes", mode="r+", zarr_format=3)
    groups = [scenes[check_scene_id(s)] for s in scene_ids]
    conflicts = sorted(f"{g.basename} ({g.attrs['split']})" for g in groups if g.attrs.get("split") not in (None, split))
    if conflicts:
        raise CacheError(f"{path}: {', '.join(conflicts)} already complete in another split than {split!r}; "
                         "a scene belongs to one split: extract it into another --out")
    for group in groups:
        if group.attrs.get("split") is None:
            with scene_lock(path, group.basename):  # a losing writer of this scene may set it too
                _join_split(path, scenes[group.basename], split)


def _join_split(path: Path, group, split: str | None) -> None:
    """A complete scene found again by a run of `split`: a scene of no split joins it; a scene of
    another split is refused. Call under the scene's lock."""
    stored = group.attrs.get("split")
    if split is None or stored == split:
        return
    if stored is not None:
        raise CacheError(f"{path}: {group.basename} ({stored}) already complete in another split than {split!r}; "
                         "a scene belongs to one split: extract it into another --out")
    group.attrs["split"] = split


FEATURE_CODECS = ("fp16", "int8", "pca-int8")


ZSTD_LEVEL = 1
"""zstd level of every chunk (decoding does not depend on it). Level 1 rather than the default 3:
it encodes 1024-d int8 features 4.8x faster (0.09 vs 0.41 s for a 62k-point scene on one core) and
smaller (51% vs 54% of the int8 bytes); fp16 features, nearly incompressible, cost the same at
either level."""


def chunk_compressors() -> tuple:
    """zstd, then a crc32c checksum of each compressed chunk."""
    return (zarr.codecs.ZstdCodec(level=ZSTD_LEVEL), zarr.codecs.Crc32cCodec())


def feature_filters(codec: str) -> list:
    """Zarr filters of the `feature` array. "int8": each component of the mean unit vector (in
    [-1, 1]) stored as round(127 x) in one byte by numcodecs' `fixedscaleoffset` filter (offset 0,
    scale 127, dtype <f2, astype |i1): plain zarr-python with numcodecs decodes it to float16, and
    any other reader divides the int8 values by 127. "pca-int8": the same filter on the K
    coefficients c = B^T f (|c| <= |f| <= 1, so they lie in [-1, 1] too). The filter written here
    is `Int8Filter`: that metadata and decoding, a faster encoder."""
    if codec not in FEATURE_CODECS:
        raise ValueError(f"unknown feature codec {codec!r}; choose one of {', '.join(FEATURE_CODECS)}")
    if codec == "fp16":
        return []
    import warnings

    with warnings.catch_warnings():  # "numcodecs codecs are not in the Zarr v3 spec": README documents the bytes
        warnings.simplefilter("ignore", UserWarning)
        return [Int8Filter(offset=0, scale=127, dtype="<f2", astype="|i1")]


class Int8Filter(FixedScaleOffset):
    """numcodecs' fixedscaleoffset (offset 0, scale 127, float16 -> int8) with the same metadata and
    decoding, encoded in float32: numcodecs' own encoder computes in numpy float16, which is emulated
    and made writing an int8 scene 5x slower than an fp16 one. A component whose 127 x lies within
    float16 rounding of a half may round the other way than numcodecs would; either byte decodes as
    q / 127 (tests/test_codecs.py). Components beyond [-1, 1] (a mean of unit vectors in float16 can
    reach 1.004) are clipped, where numcodecs would wrap 128 around to -128."""

    async def _encode_single(self, chunk_data, chunk_spec):
        values = chunk_data.as_ndarray_like().astype(np.float32) * np.float32(127)
        quantised = np.rint(np.clip(values, -127, 127, out=values), out=values).astype(np.int8)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(quantised)


def _write_int8_codes(array: zarr.Array, codes: np.ndarray) -> None:
    """Store int8 codes (round(127 x) of float16 x, `Int8Filter`'s output) in an int8-codec feature
    array as they are: through a view of the array whose codecs start after the filter, so its chunk
    files are byte for byte what writing the floats would give (tests/test_codecs.py), without the
    encoding. Extraction on a GPU quantises there: a scene's int8 write then costs zstd alone
    (0.14 vs 0.34 s for 62k points of 1024-d features on one core) and half the copies of fp16."""
    metadata = array.metadata
    if not (isinstance(metadata.codecs[0], FixedScaleOffset)
            and metadata.codecs[0].codec_config == feature_filters("int8")[0].codec_config):
        raise ValueError(f"{array.path}: int8 codes need the int8 filter, this array has {metadata.codecs[0]}")
    codes_metadata = dataclasses.replace(metadata, data_type=parse_dtype(np.int8, zarr_format=3),
                                         fill_value=np.int8(0), codecs=metadata.codecs[1:])
    view = AsyncArray(metadata=codes_metadata, store_path=array.store_path, config={"write_empty_chunks": True})
    Array(view)[...] = codes


def write_scene(path: Path, scene: Scene, *, seen_index: np.ndarray, feature: np.ndarray,
                view_count: np.ndarray, attrs: dict, feature_codec: str = "fp16") -> bool:
    """Write one scene's arrays, then mark it complete, under the scene's lock.

    Overwrites an incomplete earlier attempt; a scene that another run completed meanwhile is kept
    (it joins `attrs["split"]` if it had none) and False is returned. `feature` is (M, D) whatever
    the codec: pca-int8 projects it onto the store's basis here. An int8 `feature` holds the codes
    already (see `_write_int8_codes`): for int8, of the features; for pca-int8, (M, K) of their
    coefficients, with `attrs` giving the scene's pca_cosine_mean and pca_cosine_min
    (batched.pca_codes makes both on the GPU)."""
    assert feature.shape[0] == seen_index.shape[0] == view_count.shape[0]
    codes = feature.dtype == np.int8
    if codes and feature_codec == "fp16":
        raise ValueError(f"int8 feature codes given for the {feature_codec!r} codec")
    scene_id = check_scene_id(scene.scene_id)
    if feature_codec == "pca-int8" and codes:
        dims = _read_basis(path).shape[1]
        if feature.shape[1] != dims or not {"pca_cosine_mean", "pca_cosine_min"} <= attrs.keys():
            raise ValueError(f"scene {scene_id}: pca-int8 codes need {dims} coefficients a point (got "
                             f"{feature.shape[1]}) and the scene's pca_cosine_mean and pca_cosine_min")
    elif feature_codec == "pca-int8":
        basis = _read_basis(path)  # (D, K)
        assert feature.shape[1] == basis.shape[0], (feature.shape, basis.shape)
        norm = np.linalg.norm(feature.astype(np.float32), axis=1)
        feature = feature.astype(np.float32) @ basis
        # cos(B B^T f, f) = |B^T f| / |f|: how much of each feature the basis keeps, recorded per scene
        # so that a basis which does not fit scenes added later shows (`tttkd-prep info`)
        kept = np.linalg.norm(feature, axis=1)[norm > 0] / norm[norm > 0]
        attrs = {**attrs, "pca_cosine_mean": float(kept.mean()) if len(kept) else 1.0,
                 "pca_cosine_min": float(kept.min()) if len(kept) else 1.0}
    with scene_lock(path, scene_id):
        scenes = zarr.open_group(Path(path) / "scenes", mode="r+", zarr_format=3)
        existing = scenes.get(scene_id)
        if existing is not None and existing.attrs.get("complete") is True:
            _join_split(path, existing, attrs.get("split"))
            return False
        group = scenes.create_group(scene_id, overwrite=True, attributes={"complete": False})
        feature_rows = max(1, FEATURE_CHUNK_BYTES // max(1, feature.shape[1] * 2))
        # copy=False: extraction hands the arrays over in these dtypes (a fp16 scene's features are ~130 MB)
        arrays = {
            "coord": (scene.coord.astype(np.float32, copy=False), (POINT_CHUNK, 3)),
            "color": (scene.color.astype(np.uint8, copy=False), (POINT_CHUNK, 3)),
            "normal": (scene.normal.astype(np.float16, copy=False), (POINT_CHUNK, 3)),
            "label": (scene.label.astype(np.int16, copy=False), (POINT_CHUNK,)),
            "seen_index": (seen_index.astype(np.int32, copy=False), (POINT_CHUNK,)),
            "feature": (feature if codes else feature.astype(np.float16, copy=False), (feature_rows, feature.shape[1])),
            "view_count": (view_count.astype(np.uint16, copy=False), (POINT_CHUNK,)),
        }
        for name, (data, chunks) in arrays.items():
            chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, data.shape))
            # every chunk is written, zeros too: a missing chunk file then always means damage
            array = group.create_array(name, shape=data.shape, dtype=np.float16 if name == "feature" else data.dtype,
                                       chunks=chunks, filters=feature_filters(feature_codec) if name == "feature" else None,
                                       compressors=chunk_compressors(),
                                       config={"write_empty_chunks": True})
            if data.size and name == "feature" and codes:
                _write_int8_codes(array, data)
            elif data.size:
                array[...] = data
        # the flag goes last: a scene interrupted before this line reads as incomplete and is redone
        group.attrs.update({**attrs, "num_points": scene.num_points, "num_seen": int(len(seen_index)),
                            "complete": True})
        return True


class FeatureCache:
    """Read access to a feature cache: provenance, complete scene ids, scenes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise CacheError(f"{self.path}: no feature cache here (run `tttkd-prep extract` first)")
        self.root = zarr.open_group(self.path, mode="r", zarr_format=3)
        self._basis = None  # read and checked on first use (`basis`)
        if self.root.attrs.get("tttkd_cache") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: not a tttkd feature cache of format {FORMAT_VERSION}")

    @property
    def provenance(self) -> dict:
        return dict(self.root.attrs["provenance"])

    def scene_ids(self, *, split: str | None = None) -> list[str]:
        """Sorted ids of the complete scenes (of one split, if given)."""
        return sorted(
            name for name, group in self.root["scenes"].groups()
            if group.attrs.get("complete") is True and (split is None or group.attrs.get("split") == split)
        )

    def split_counts(self) -> dict[str | None, int]:
        """Number of complete scenes per split (None: scenes extracted without a split)."""
        counts: dict[str | None, int] = {}
        for _, group in self.root["scenes"].groups():
            if group.attrs.get("complete") is True:
                split = group.attrs.get("split")
                counts[split] = counts.get(split, 0) + 1
        return counts

    def incomplete_scene_ids(self) -> list[str]:
        return sorted(name for name, group in self.root["scenes"].groups() if group.attrs.get("complete") is not True)

    def scene_attrs(self, scene_id: str) -> dict:
        return dict(self.root["scenes"][check_scene_id(scene_id)].attrs)

    @property
    def basis(self) -> np.ndarray | None:
        """(D, K) float32 basis of a pca-int8 store (checked against the provenance), else None."""
        if self.provenance.get("feature_codec") != "pca-int8":
            return None
        if self._basis is None:
            from .pca import basis_problem, basis_sha256

            basis = _read_basis(self.path)
            provenance = self.provenance
            problem = basis_problem(basis, feature_dim=provenance["feature_dim"], dims=provenance["pca_dims"])
            if problem is None and basis_sha256(basis) != provenance.get("pca_basis_sha256"):
                problem = "pca_basis differs from the one its provenance records (sha256)"
            if problem:
                raise CacheError(f"{self.path}: {problem}; the store's coefficients cannot be decoded")
            self._basis = basis
        return self._basis

    def decode(self, feature: np.ndarray) -> np.ndarray:
        """Stored rows of `feature` -> (n, D) float32 features (pca-int8: B c)."""
        basis = self.basis
        feature = feature.astype(np.float32)
        return feature if basis is None else feature @ basis.T

    def read(self, scene_id: str) -> CachedScene:
        group = self._complete_group(scene_id)
        return CachedScene(scene_id, *(self._array(group, scene_id, name, ...) for name in ARRAY_NAMES))

    def read_points(self, scene_id: str) -> CachedScene:
        """A scene without its features (`feature` is an empty (0, D) array): what a data loader
        needs before it knows which points it will distil."""
        group = self._complete_group(scene_id)
        points = (self._array(group, scene_id, name, ...) for name in ("coord", "color", "normal", "label", "seen_index"))
        return CachedScene(scene_id, *points, feature=np.zeros((0, group["feature"].shape[1]), np.float16),
                           view_count=self._array(group, scene_id, "view_count", ...))

    def read_features(self, scene_id: str, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float16 features of the given rows of `seen_index` (any order)."""
        group = self._complete_group(scene_id)
        order = np.argsort(rows)
        out = np.empty((len(rows), group["feature"].shape[1]), np.float16)
        if len(rows):
            with _reading(self.path, scene_id, "feature"):
                out[order] = group["feature"].get_orthogonal_selection((rows[order], slice(None)))
        return out

    def read_feature_window(self, scene_id: str, start: int, length: int) -> np.ndarray:
        """Rows start .. start + length of `feature`, wrapping around the end: (length, D) float16."""
        group = self._complete_group(scene_id)
        rows = group["feature"].shape[0]
        assert 0 <= start < rows and 0 < length <= rows
        end = start + length
        if end <= rows:
            return self._array(group, scene_id, "feature", slice(start, end))
        return np.concatenate([self._array(group, scene_id, "feature", slice(start, None)),
                               self._array(group, scene_id, "feature", slice(None, end - rows))])

    def _array(self, group, scene_id: str, name: str, selection) -> np.ndarray:
        with _reading(self.path, scene_id, name):
            return group[name][selection]

    def _complete_group(self, scene_id: str):
        group = self.root["scenes"].get(check_scene_id(scene_id))
        if group is None or group.attrs.get("complete") is not True:
            raise CacheError(f"{self.path}: scene {scene_id} is missing or incomplete")
        return group

    def bytes_on_disk(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.path) for f in files)


def _read_basis(path: Path) -> np.ndarray:
    """The root `pca_basis` array as written, with a CacheError naming the store when missing or damaged."""
    try:
        return zarr.open_array(Path(path) / BASIS_ARRAY, mode="r", zarr_format=3)[...]
    except (KeyError, FileNotFoundError) as e:  # zarr's NodeNotFoundError is a FileNotFoundError
        raise CacheError(f"{path}: pca-int8 store without its {BASIS_ARRAY} array; recode it again") from e
    except (ValueError, RuntimeError, OSError) as e:
        raise CacheError(f"{path}: {BASIS_ARRAY}: corrupt chunk ({e}); recode the store again") from e


@contextmanager
def _reading(path: Path, scene_id: str, name: str):
    """Turn a missing array or a chunk that fails its checksum or decoding into a CacheError that
    names the scene and the array."""
    try:
        yield
    except KeyError as e:
        raise CacheError(f"{path}: scene {scene_id} has no array {name!r} (run `tttkd-prep verify {path}`)") from e
    except (ValueError, RuntimeError, OSError) as e:
        raise CacheError(f"{path}: scene {scene_id}, array {name!r}: corrupt chunk ({e}); "
                         f"run `tttkd-prep verify {path}` and re-extract the scene") from e


def summarize(path: Path) -> dict:
    """What `tttkd-prep info` shows: counts, sizes and provenance of a store."""
    cache = FeatureCache(path)
    ids = cache.scene_ids()
    points = seen = views = 0
    kept = []  # pca-int8: (seen points, mean and lowest cosine the basis keeps) per scene
    for scene_id in ids:
        attrs = cache.scene_attrs(scene_id)
        if "pca_cosine_mean" in attrs:
            kept.append((attrs["num_seen"], attrs["pca_cosine_mean"], attrs["pca_cosine_min"]))
        points += attrs["num_points"]
        seen += attrs["num_seen"]
        views += int(cache.root["scenes"][scene_id]["view_count"][...].astype(np.int64).sum())
    size = cache.bytes_on_disk()
    provenance = cache.provenance
    return {
        "store": str(path), "scenes": len(ids), "incomplete": len(cache.incomplete_scene_ids()),
        "points": points, "seen_points": seen, "seen_fraction": seen / points if points else 0.0,
        "mean_views_per_point": views / seen if seen else 0.0, "bytes_on_disk": size,
        "bytes_per_point": size / points if points else 0.0, "bytes_per_seen_point": size / seen if seen else 0.0, "teacher": provenance.get("teacher"),
        "feature_dim": provenance.get("feature_dim"), "feature_codec": provenance.get("feature_codec", "fp16"),
        "pca_dims": provenance.get("pca_dims"),
        "pca_cosine_mean": sum(n * m for n, m, _ in kept) / max(1, sum(n for n, _, _ in kept)) if kept else None,
        "pca_cosine_min": min(low for _, _, low in kept) if kept else None,
        "pca_basis_scenes": cache.root.attrs.get("pca_basis_scenes"),  # None: fitted on every scene of its first run
        "provenance": provenance,
        "last_run": cache.root.attrs.get("last_run"),
    }


def recode(source: Path, destination: Path, *, feature_codec: str, pca_dims: int | None = None, seed: int = 0,
           progress=None, write_seconds: list[float] | None = None) -> int:
    """Copy every complete scene of the store at `source` into a new store with another feature
    codec, without running the teacher again; return the number of scenes written. Re-running
    resumes: scenes already complete in `destination` are kept. pca-int8 fits its basis of
    `pca_dims` directions (default pca.DEFAULT_PCA_DIMS) on `source` (seeded by `seed`), or keeps the
    basis of an existing `destination`. Any codec converts to any other (coefficients are decoded).
    `write_seconds` (a list) gets the time of each scene's `write_scene` (`tttkd bench codecs`)."""
    from .pca import DEFAULT_PCA_DIMS, fit_basis

    feature_filters(feature_codec)  # refuses an unknown codec before anything is written
    cache = FeatureCache(source)
    provenance = {k: v for k, v in cache.provenance.items() if k != "pca_basis_sha256"}
    provenance.update(feature_codec=feature_codec, recoded_from=str(source), pca_dims=None)
    basis = None
    if feature_codec == "pca-int8":
        provenance["pca_dims"] = pca_dims = pca_dims or DEFAULT_PCA_DIMS
        existing = (Path(destination) / "zarr.json").exists()
        basis = None if existing else fit_basis(cache, dims=pca_dims, seed=seed)
    elif pca_dims is not None:
        raise ValueError(f"--pca-dims applies to --feature-codec pca-int8 only, not {feature_codec}")
    done = open_for_writing(destination, provenance, basis=basis)
    written = 0
    for scene_id in cache.scene_ids():
        if scene_id not in done:
            scene = cache.read(scene_id)
            attrs = {k: v for k, v in cache.scene_attrs(scene_id).items()
                     if k not in ("complete", "num_points", "num_seen", "pca_cosine_mean", "pca_cosine_min")}
            points = Scene(scene_id, scene.coord, scene.color, scene.normal.astype(np.float32), scene.label)
            feature = cache.decode(scene.feature)
            began = time.perf_counter()
            written += write_scene(destination, points, seen_index=scene.seen_index, feature=feature,
                                   view_count=scene.view_count, attrs=attrs, feature_codec=feature_codec)
            if write_seconds is not None:
                write_seconds.append(time.perf_counter() - began)
        if progress is not None:
            progress(scene_id)
    with root_lock(destination):  # the source's split names, which open_for_writing does not carry over
        root = zarr.open_group(destination, mode="r+", zarr_format=3)
        stored = root.attrs["provenance"]
        root.attrs["provenance"] = {**stored, "splits": sorted(set(stored.get("splits", []))
                                                                | set(cache.provenance.get("splits", [])))}
    return written
