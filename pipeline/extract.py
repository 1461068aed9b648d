"""One scene end to end: read -> project every view -> teacher on every image -> mean feature per
point -> cache. `job.py` runs this over many scenes with Dask; this module knows nothing of Dask.

Per scene:
  1. read the points and the posed views (a reader of scene.py's interface);
  2. decode each image at `image_scale` (JPEG draft mode) and project the points into it;
  3. run the teacher on batches of images; while one batch runs, a thread decodes and projects
     the next (torch releases the GIL), so CPU work overlaps the model;
  4. accumulate L2-normalised features per point and divide by the number of views that saw it
     (the exact multi-view objective, see cache.py);
  5. write the scene's arrays and mark it complete.

Bad input never stops the job: a view whose pose, intrinsics, image or depth image is unusable is
skipped and counted by reason in the scene's `views_skipped` (the first message per reason, naming
the file, in `view_errors`); a scene with no points, labels outside its class list, no usable view,
no point any view sees, or that runs out of memory comes back failed with one line naming it.
"""

from __future__ import annotations

import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import cache
from .a2d2 import A2D2Reader
from .project import Projection, ProjectionConfig, project_view
from .custom import CustomReader
from .matterport import MatterportReader
from .s3dis import S3DISReader
from .scannet import ScanNetReader, valid_pose
from .semantickitti import SemanticKITTIReader
from .scene import IGNORE_LABEL, Camera, DatasetReader, Scene, SceneReadError, View
from .teacher import ImageReadError, Teacher, TeacherSpec, decode_image, reading_image, sample_features


@dataclass(frozen=True)
class PrepConfig:
    """Everything that decides what the cache holds (and so goes into its provenance)."""

    dataset: str = "scannet"
    root: Path = Path("data/scannet")
    teacher: str = "dinov2_vitl14"
    weights: Path | None = None
    image_scale: float = 0.25
    """Images are downsampled 4x before the 2D model (paper, appendix A.3)."""
    max_views: int | None = None
    """Views per scene, drawn at random with a per-scene seed (paper: at most 50 for S3DIS and
    Matterport3D; every 25k-subset frame for ScanNet)."""
    batch_size: int = 16
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    seed: int = 0
    feature_codec: str = "fp16"
    """How `feature` is stored: "fp16", or "int8" (1 byte a component, cosine >= 0.99 to fp16; see cache.py)."""
    pca_dims: int | None = None
    """feature_codec "pca-int8": coefficients kept per point, in the store's basis (pipeline/pca.py)."""
    reader_options: dict = field(default_factory=dict)
    """Keyword options of the dataset's reader (e.g. ScanNet's frames_source="sens" or
    points="pointcept"), JSON-serialisable: they travel to the workers and into the provenance."""


@dataclass
class SceneResult:
    scene_id: str
    status: str  # "done" or "failed"
    reason: str = ""
    num_points: int = 0
    num_seen: int = 0
    num_views: int = 0
    views_skipped: dict = field(default_factory=dict)
    view_errors: dict = field(default_factory=dict)
    """The first message (naming the file) of each reason in views_skipped that extraction found."""
    seconds: float = 0.0


READERS = {"scannet": ScanNetReader, "s3dis": S3DISReader, "matterport": MatterportReader, "custom": CustomReader,
           "semantickitti": SemanticKITTIReader, "a2d2": A2D2Reader}
ALIASES = {"matterport3d": "matterport"}


def make_reader(dataset: str, root: Path, options: dict | None = None) -> DatasetReader:
    dataset = ALIASES.get(dataset, dataset)
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: no such folder (the {dataset} dataset root, given with --root)")
    try:
        return READERS[dataset](root, **(options or {}))
    except TypeError as e:  # an option this reader does not take
        raise ValueError(f"reader options {sorted(options or {})} do not all apply to {dataset} ({e})") from e


@dataclass
class SceneSurvey:
    """What a dry run finds for one scene, without running the teacher."""

    scene_id: str
    num_points: int = 0
    labelled_fraction: float = 0.0
    num_views: int = 0
    """Views that extraction would use (after `max_views`)."""
    views_skipped: dict = field(default_factory=dict)
    error: str = ""


def survey_scene(reader: DatasetReader, scene_id: str, config: PrepConfig) -> SceneSurvey:
    """Read one scene's points and views as extraction would; a bad scene comes back with its error."""
    try:
        scene = reader.read_scene(scene_id)
        check_scene(scene, tuple(reader.class_names))
        view_set = reader.read_views(scene_id)
    except (OSError, SceneReadError, ValueError) as e:
        return SceneSurvey(scene_id, error=str(e))
    views = select_views(view_set.views, config.max_views, seed=config.seed, scene_id=scene_id)
    labelled = float((scene.label >= 0).mean()) if scene.num_points else 0.0
    return SceneSurvey(scene_id, scene.num_points, labelled, len(views), dict(view_set.skipped),
                       "" if views else f"scene {scene_id}: no usable views ({view_set.skipped or 'none found'})")


def select_views(views: list[View], max_views: int | None, *, seed: int, scene_id: str) -> list[View]:
    """At most `max_views` views, a random subset that depends only on (seed, scene id)."""
    if max_views is None or len(views) <= max_views:
        return views
    rng = np.random.default_rng([seed, zlib.crc32(scene_id.encode())])
    keep = np.sort(rng.choice(len(views), size=max_views, replace=False))
    return [views[i] for i in keep]


class SkippedView(Exception):
    """A view extraction cannot use; `reason` is its key in views_skipped, the message names the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # raised in a decoding process, re-raised here: pickle both arguments
        return SkippedView, (self.reason, str(self))


def _camera_problem(camera: Camera) -> str:
    """What is wrong with a camera's intrinsics ("" if nothing)."""
    k = np.asarray(camera.intrinsics, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all():
        return f"intrinsics of shape {k.shape} or not finite"
    if not (k[0, 0] > 0 and k[1, 1] > 0) or not np.allclose(k[2], [0, 0, 1]):
        return f"intrinsics not invertible (fx={k[0, 0]:g}, fy={k[1, 1]:g}, last row {k[2].tolist()})"
    if camera.width < 1 or camera.height < 1:
        return f"image size {camera.width}x{camera.height}"
    return ""


def check_view(view: View) -> None:
    """Raise SkippedView for a pose or intrinsics no reader should have let through."""
    if not valid_pose(np.asarray(view.cam_to_world, dtype=np.float64)):
        raise SkippedView("invalid pose", f"{view.image_path}: the pose is not a finite rigid 4x4 transform")
    for name, camera in (("", view.camera), ("depth ", view.depth_camera)):
        problem = camera and _camera_problem(camera)
        if problem:
            raise SkippedView("invalid intrinsics", f"{view.image_path}: {name}{problem}")


def _same_shape(width: int, height: int, camera: Camera) -> bool:
    """Whether a width x height image is `camera`'s image rescaled (aspect ratio within 1% and a pixel)."""
    return abs(height - width * camera.height / camera.width) <= 1 + 0.01 * height


def _read_depth(view: View) -> tuple[np.ndarray, Camera]:
    """A view's raw depth image and its camera at the image's own size; SkippedView if unreadable."""
    try:
        with reading_image(view.depth_path), Image.open(view.depth_path) as depth_image:
            depth = np.asarray(depth_image)
    except ImageReadError as e:
        raise SkippedView("missing depth" if e.missing else "unreadable depth", str(e)) from e
    if depth.ndim != 2:
        raise SkippedView("unreadable depth", f"{view.depth_path}: shape {depth.shape}, expected a single-channel depth image")
    height, width = depth.shape
    camera = view.depth_camera or view.camera  # no depth camera: registered to the colour image
    if (width, height) != (camera.width, camera.height):
        if not _same_shape(width, height, camera):
            raise SkippedView("depth size mismatch", f"{view.depth_path}: {width}x{height} pixels, but its intrinsics "
                              f"describe a {camera.width}x{camera.height} image (another aspect ratio)")
        camera = camera.resized(width, height)
    return depth, camera


@dataclass(frozen=True)
class DecodedView:
    """One view decoded at teacher scale, with what projecting points into it needs. Plain arrays
    and frozen dataclasses only: it travels back from a decoding process by pickle."""

    image: np.ndarray
    """(H, W, 3) uint8 at `image_scale` of the file's size, not yet cropped or padded."""
    camera: Camera
    """The camera of the teacher's image (scaled, then cropped to the part that has features)."""
    cam_to_world: np.ndarray
    image_scale: float
    """Teacher image width over the full-resolution width (scales the border margin)."""
    depth: np.ndarray | None = None
    depth_camera: Camera | None = None
    depth_scale: float = 1000.0


def decode_view(view: View, *, image_scale: float, fit: Teacher | TeacherSpec) -> DecodedView:
    """Decode one view's image (and depth image) for a teacher (`fit.visible_size` says which part
    of an image has features); SkippedView if the view's pose, intrinsics, image or depth image is
    unusable. A module-level function of picklable arguments (pass the TeacherSpec), so a process
    pool can run it."""
    check_view(view)
    try:
        image = decode_image(view.image_path, scale=image_scale)
    except ImageReadError as e:
        raise SkippedView("missing image" if e.missing else "unreadable image", str(e)) from e
    height, width = image.shape[:2]
    if not _same_shape(width, height, view.camera):
        raise SkippedView("image size mismatch", f"{view.image_path}: decoded at {width}x{height} (scale "
                          f"{image_scale}), but its intrinsics describe a {view.camera.width}x"
                          f"{view.camera.height} image (another aspect ratio)")
    camera = view.camera.resized(width, height).cropped(*fit.visible_size(width, height))
    depth, depth_camera = _read_depth(view) if view.depth_path is not None else (None, None)
    return DecodedView(image, camera, np.asarray(view.cam_to_world, dtype=np.float64), width / view.camera.width,
                       depth, depth_camera, view.depth_scale)


def project_decoded(coord: np.ndarray, decoded: DecodedView, config: ProjectionConfig) -> Projection:
    return project_view(coord, decoded.cam_to_world, decoded.camera, config=config, image_scale=decoded.image_scale,
                        depth=decoded.depth, depth_camera=decoded.depth_camera, depth_scale=decoded.depth_scale)


def _prepare_view(view: View, coord: np.ndarray, teacher: Teacher, config: PrepConfig):
    """Decode one image at teacher scale and find the points it sees -> (image tensor, projection).
    SkippedView if the view's pose, intrinsics, image or depth image is unusable."""
    decoded = decode_view(view, image_scale=config.image_scale, fit=teacher)
    return teacher.prepare(decoded.image), project_decoded(coord, decoded, config.projection)


def check_scene(scene: Scene, class_names: tuple[str, ...]) -> None:
    """Raise SceneReadError for points or labels no reader should have let through."""
    if scene.num_points == 0:
        raise SceneReadError(f"scene {scene.scene_id}: no points (an empty point cloud)")
    if not np.isfinite(scene.coord).all():
        raise SceneReadError(f"scene {scene.scene_id}: points with non-finite coordinates")
    outside = (scene.label < IGNORE_LABEL) | (scene.label >= len(class_names))
    if outside.any():
        raise SceneReadError(f"scene {scene.scene_id}: label {scene.label[outside][0]} ({int(outside.sum())} points) "
                             f"is not a class index 0..{len(class_names) - 1} of the reader's {len(class_names)} "
                             f"classes or {IGNORE_LABEL} (ignore)")


OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)


def extract_scene(reader: DatasetReader, scene_id: str, *, teacher: Teacher, config: PrepConfig,
                  store: Path, split: str | None) -> SceneResult:
    """Extract one scene into the store. User-caused problems come back as a failed result whose
    reason is one line naming the scene or file: a bad scene (no points, labels outside the class
    list, no usable view, no point seen, out of memory) fails; a bad view (pose, intrinsics, missing
    or undecodable image or depth, image of another shape) is skipped and counted in views_skipped,
    with the first message per reason in view_errors."""
    start = time.perf_counter()
    skipped: dict[str, int] = {}
    view_errors: dict[str, str] = {}
    scene = views = None
    feature_sum = view_count = None
    try:
        scene = reader.read_scene(scene_id)
        check_scene(scene, tuple(reader.class_names))
        view_set = reader.read_views(scene_id)
        skipped.update(view_set.skipped)
        views = select_views(view_set.views, config.max_views, seed=config.seed, scene_id=scene_id)
        if not views:
            raise SceneReadError(f"scene {scene_id}: no usable views ({view_set.skipped or 'none found'})")
        device = teacher.device
        coord = scene.coord
        # (N, D) float32 on the teacher's device, allocated on the first batch: 0.6 GB for a
        # 150k-point ScanNet scene with ViT-L; index_add_ keeps the accumulation on the GPU
        view_count = torch.zeros(scene.num_points, dtype=torch.int32, device=device)
        used = 0
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [pool.submit(_prepare_view, v, coord, teacher, config) for v in views[: config.batch_size]]
            for first in range(0, len(views), config.batch_size):
                prepared = []
                for future in pending:
                    try:
                        prepared.append(future.result())
                    except SkippedView as e:  # counted by reason; the scene goes on with its other views
                        skipped[e.reason] = skipped.get(e.reason, 0) + 1
                        view_errors.setdefault(e.reason, str(e))
                upcoming = views[first + config.batch_size: first + 2 * config.batch_size]
                pending = [pool.submit(_prepare_view, v, coord, teacher, config) for v in upcoming]
                used += len(prepared)
                for size in {tuple(t.shape) for t, _ in prepared}:  # images of one scene share a size
                    group = [(t, p) for t, p in prepared if tuple(t.shape) == size]
                    grids = teacher.features(torch.stack([t for t, _ in group]))
                    if feature_sum is None:
                        feature_sum = torch.zeros(scene.num_points, grids.shape[1], device=device)
                    for grid, (_, projection) in zip(grids, group):
                        if len(projection.point_index) == 0:
                            continue
                        index = torch.from_numpy(projection.point_index).to(device)
                        uv = torch.from_numpy(projection.uv).to(device)
                        feature_sum.index_add_(0, index, sample_features(grid, uv, stride=teacher.stride))
                        view_count[index] += 1
        if used == 0:
            raise SceneReadError(f"scene {scene_id}: no usable views ({skipped}; first: "
                                 f"{next(iter(view_errors.values()))})")
        # seen points in a random (seeded) order: any contiguous block of rows is then a uniform
        # sample of the scene, so a trainer sampling KD targets reads a few chunks, not all of them
        seen = torch.nonzero(view_count).squeeze(1).cpu()
        if len(seen) == 0:
            raise SceneReadError(f"scene {scene_id}: none of its {used} views sees any of its {scene.num_points} "
                                 "points; check the poses and intrinsics, and that points and poses share a frame")
        order = np.random.default_rng([config.seed, zlib.crc32(scene_id.encode())]).permutation(len(seen))
        seen = seen[torch.from_numpy(order)].to(device)
        counts = view_count[seen]
        mean = feature_sum[seen] / counts[:, None].float()
        cache.write_scene(
            store, scene, seen_index=seen.cpu().numpy(), feature=mean.cpu().numpy(),
            view_count=counts.cpu().numpy(),
            attrs={"split": split, "num_views": used, "views_skipped": skipped, "view_errors": view_errors},
            feature_codec=config.feature_codec,
        )
        return SceneResult(scene_id, "done", num_points=scene.num_points, num_seen=int(len(seen)),
                           num_views=used, views_skipped=skipped, view_errors=view_errors,
                           seconds=time.perf_counter() - start)
    except OUT_OF_MEMORY as e:
        feature_sum = view_count = None  # free what this scene holds before the next one
        if teacher.device.type == "cuda":
            torch.cuda.empty_cache()
        size = "while reading it" if scene is None else f"{scene.num_points} points, {len(views or [])} views"
        where = "GPU" if isinstance(e, torch.cuda.OutOfMemoryError) else "host"
        return SceneResult(scene_id, "failed", views_skipped=skipped, view_errors=view_errors,
                           reason=f"{type(e).__name__}: scene {scene_id}: out of {where} memory ({size}, batch size "
                                  f"{config.batch_size}); lower --batch-size, or split the scene into parts",
                           seconds=time.perf_counter() - start)
    except (OSError, ValueError) as e:  # SceneReadError, PlyError, CacheError, ...
        return SceneResult(scene_id, "failed", reason=f"{type(e).__name__}: {e}", views_skipped=skipped,
                           view_errors=view_errors, seconds=time.perf_counter() - start)


def provenance(config: PrepConfig, *, feature_dim: int, stride: int, weights_sha256: str, code_version: str,
               class_names: tuple[str, ...] = ()) -> dict:
    """The store-level record of how the cache was made (JSON-serialisable)."""
    return {
        "teacher": config.teacher,
        "weights_sha256": weights_sha256,
        "image_scale": config.image_scale,
        "stride": stride,
        "feature_dim": feature_dim,
        "feature_dtype": "float16",
        "feature_codec": config.feature_codec,
        "pca_dims": config.pca_dims if config.feature_codec == "pca-int8" else None,
        "feature": "mean over views of L2-normalised teacher features (not re-normalised)",
        "projection": asdict(config.projection),
        "max_views": config.max_views,
        "seed": config.seed,
        "dataset": ALIASES.get(config.dataset, config.dataset),
        "reader_options": dict(config.reader_options),
        "class_names": list(class_names),
        "ignore_label": -1,
        "code_version": code_version,
    }
