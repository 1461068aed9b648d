"""S3DIS reader: Stanford3dDataset_v1.2 points with the posed images of 2D-3D-S (brief §6).

Layout read (`root` either holds `Stanford3dDataset_v1.2/` or is that folder itself):
    Stanford3dDataset_v1.2/Area_N/<room>/Annotations/<class>_<k>.txt     lines "x y z r g b"
    <images>/area_{1,2,3,4,5a,5b,6}/data/rgb/camera_<uuid>_<roomType>_<roomNum>_frame_<j>_domain_rgb.png
    <images>/area_.../data/depth/..._domain_depth.png     uint16 z-depth, 1/512 m, 65535 = missing
    <images>/area_.../data/pose/..._domain_pose.json      camera_k_matrix, camera_rt_matrix, ...
`<images>` is `images_root` when given, else `root` or `root/Stanford2d3dDataset_noXYZ` (the first
that holds the area folder). The 2D-3D-S README writes the file names with double underscores
(`camera_{uuid}__{room}_...domain__rgb.png`); the files have single ones. Both are accepted.

Scene ids are `Area_N_<room>`, e.g. `Area_1_office_1`. Splits (`data_manifests/s3dis/splits.json`):
train = Areas 1, 2, 3, 4, 6; val = test = Area 5 (the paper's protocol has no separate validation
area); the rooms of each area are listed from disk.

Points (source: S3DIS layout, Pointcept `preprocess_s3dis.py`): a room's points are the
concatenation of its Annotations files in sorted order (together they are `<room>.txt`). A point's
class is its file's name before the first `_` (`wall_3 (1).txt`, a duplicate file in
Area_5/office_36, is `wall`), indexed in the 13 classes of `data_manifests/s3dis/classes.json`;
an unknown class (`stairs`) counts as clutter. Real files have defects, all tolerated: a control
byte 0x10 in place of a separator (any byte that cannot be part of a number is read as a
separator), colours written as floats (`106.000000`, rounded and clipped to uint8), blank or short
lines (skipped, counted and reported with a warning naming the file). S3DIS has no normals: they
are estimated (pipeline/normals.py, 10 cm voxels) and oriented towards the room's bounding-box
centre (floors up, ceilings down, walls inwards).

Views (source: 2D-3D-S README and `assets/utils.py`, DeepViewAgg, Pointcept): a room's images are
those whose file name carries its `<roomType>_<roomNum>` (an area folder also holds the other
rooms' images). `camera_k_matrix` is K for the 1080x1080 image (rescaled if the file has another
size); `camera_rt_matrix` is the 3x4 world -> camera transform in OpenCV axes, inverted into
`cam_to_world`. Area 5 is split in 2D-3D-S: its rooms' images are looked up in `area_5a` and
`area_5b`, and `area_5b` poses are brought into the S3DIS frame by p = M p' + o (AREA_5B_TO_S3DIS).
At most `max_views` images per room are kept, drawn at random from the valid ones with a seed per
(seed, scene id). Frames without a pose JSON, with an unreadable one, or with a non-rigid pose are
skipped and counted in `ViewSet.skipped`.

Frames: the non-aligned v1.2 points share the 2D-3D-S pose frame, so no rotation is applied; the
per-room angles of `Area_N/Area_N_alignmentAngle.txt` are not used. The `_Aligned_Version` of the
points rotates each room about its centre by that angle, so the 2D-3D-S poses would no longer fit:
it is not supported and refused with a message (use the non-aligned Stanford3dDataset_v1.2).
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .manifests import load_classes, manifest_dir
from .normals import estimate_normals
from .scannet import camera_for_image
from .scene import Camera, Scene, SceneReadError, View, ViewSet, check_scene_id

POINTS_DIR = "Stanford3dDataset_v1.2"
IMAGES_SUBDIR = "Stanford2d3dDataset_noXYZ"
IMAGE_SIZE = (1080, 1080)
"""Every 2D-3D-S image is 1080x1080; `camera_k_matrix` is calibrated for that size."""
DEPTH_SCALE = 512.0
"""2D-3D-S depth PNGs: uint16 z-depth in 1/512 m (max 128 m); 65535 marks a missing value."""
DEPTH_MISSING = 65535

# area_5b poses -> the S3DIS (and area_5a) frame: p = M p' + o (Pointcept's preprocess_s3dis.py;
# DeepViewAgg rounds o to (-4.10, 6.25, 0)).
AREA_5B_TO_S3DIS = np.array([
    [0.0, 1.0, 0.0, -4.09703582],
    [-1.0, 0.0, 0.0, 6.22617759],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
])

NORMAL_RADIUS_M = 0.1

_SCENE_ID = re.compile(r"^Area_(?P<area>\d+)_(?P<room>[A-Za-z]+_\d+)$")
# camera_<uuid>_<roomType>_<roomNum>_frame_<j>_domain_rgb.png, one or two underscores before the
# room and after "domain" (the README's spelling)
_FRAME = re.compile(r"^camera_(?P<uuid>[^_]+)__?(?P<room>[A-Za-z]+_\d+)_frame_(?P<frame>\d+)_domain__?rgb\.png$")

# bytes that can be part of a number; every other byte (0x10, tabs, CR, ...) separates fields
_NUMBER_BYTES = b"0123456789.+-eE"
_AS_SEPARATOR = bytes(c if (c in _NUMBER_BYTES or c == ord("\n")) else ord(" ") for c in range(256))


def image_areas(area: int) -> list[str]:
    """The 2D-3D-S area folders holding the images of S3DIS `Area_<area>`."""
    return ["area_5a", "area_5b"] if area == 5 else [f"area_{area}"]


def read_annotation_file(path: Path) -> tuple[np.ndarray, dict[str, int]]:
    """(M, 6) float64 "x y z r g b" rows of one Annotations file, and the lines skipped by reason.

    Vectorised over bytes: every line is split into fields, lines of exactly 6 fields are parsed in
    one np.fromstring call; blank lines and lines with another number of fields are counted.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SceneReadError(f"{path}: {e}") from e
    if not data:
        return np.empty((0, 6)), {}
    data = data.translate(_AS_SEPARATOR)
    if not data.endswith(b"\n"):
        data += b"\n"
    text = np.frombuffer(data, dtype=np.uint8)
    is_newline = text == ord("\n")
    in_field = (text != ord(" ")) & ~is_newline
    field_start = in_field & ~np.concatenate([[False], in_field[:-1]])
    line_of_byte = np.cumsum(is_newline) - is_newline  # a newline belongs to the line it ends
    num_lines = int(is_newline.sum())
    fields_per_line = np.bincount(line_of_byte[field_start], minlength=num_lines)
    good = fields_per_line == 6
    skipped = {}
    if (fields_per_line == 0).any():
        skipped["blank lines"] = int((fields_per_line == 0).sum())
    if (~good & (fields_per_line > 0)).any():
        skipped["lines without 6 fields"] = int((~good & (fields_per_line > 0)).sum())
    kept = text[good[line_of_byte]].tobytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older numpy warns and stops at a field that is no number
            values = np.fromstring(kept.decode("ascii"), sep=" ")
    except ValueError:  # newer numpy raises there
        values = np.empty(0)
    if values.size == 6 * good.sum():
        return values.reshape(-1, 6), skipped
    # a field such as "1.2.3" or "-": parse line by line and drop the lines that fail
    rows, bad = [], 0
    for line in kept.split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append([float(field) for field in line.split()])
        except ValueError:
            bad += 1
    if bad:
        skipped["lines with a field that is no number"] = bad
    return np.array(rows, dtype=np.float64).reshape(-1, 6), skipped


def read_pose(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), cam_to_world (4, 4)) of a 2D-3D-S pose JSON; ValueError/KeyError if malformed."""
    pose = json.loads(path.read_text())
    intrinsics = np.asarray(pose["camera_k_matrix"], dtype=np.float64)
    world_to_camera = np.asarray(pose["camera_rt_matrix"], dtype=np.float64)
    if intrinsics.shape != (3, 3) or world_to_camera.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"camera_k_matrix {intrinsics.shape}, camera_rt_matrix {world_to_camera.shape}")
    rotation, translation = world_to_camera[:3, :3], world_to_camera[:3, 3]
    cam_to_world = np.eye(4)
    cam_to_world[:3, :3] = rotation.T
    cam_to_world[:3, 3] = -rotation.T @ translation
    return intrinsics, cam_to_world


def rigid(pose: np.ndarray) -> bool:
    rotation = pose[:3, :3]
    return bool(np.isfinite(pose).all() and np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3)
                and np.linalg.det(rotation) > 0)


class S3DISReader:
    """Reads S3DIS rooms and their 2D-3D-S views; see the module docstring for the layout."""

    name = "s3dis"

    def __init__(self, root: Path, *, images_root: Path | None = None, max_views: int | None = 50, seed: int = 0):
        self.root = Path(root)
        self.images_root = Path(images_root) if images_root is not None else None
        self.max_views = max_views
        self.seed = seed
        classes = load_classes("s3dis")
        self._class_names = tuple(classes["names"])
        self._unknown_class = self._class_names.index(classes["unknown_as"])
        self._areas = json.loads((manifest_dir("s3dis") / "splits.json").read_text())["areas"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    @property
    def points_root(self) -> Path:
        """`root/Stanford3dDataset_v1.2` if it exists, else `root` itself."""
        nested = self.root / POINTS_DIR
        return nested if nested.is_dir() else self.root

    def scene_ids(self, split: str) -> list[str]:
        if split not in self._areas:
            raise ValueError(f"unknown S3DIS split {split!r}; choose one of {', '.join(self._areas)}")
        self._refuse_aligned_version()
        scene_ids = []
        for area in self._areas[split]:
            area_dir = self.points_root / f"Area_{area}"
            if not area_dir.is_dir():
                raise SceneReadError(f"{area_dir}: missing; the {split!r} split needs Areas {self._areas[split]}")
            rooms = sorted(p.name for p in area_dir.iterdir() if p.is_dir())
            ignored = [r for r in rooms if not _SCENE_ID.match(f"Area_{area}_{r}")]
            if ignored:  # not a room (S3DIS names rooms <roomType>_<roomNum>): say so rather than drop it silently
                warnings.warn(f"{area_dir}: ignored folders that are not <roomType>_<roomNum> rooms: {ignored}", stacklevel=2)
            rooms = [r for r in rooms if r not in ignored]
            scene_ids += [check_scene_id(f"Area_{area}_{room}") for room in rooms]
        return scene_ids

    def _parse_scene_id(self, scene_id: str) -> tuple[int, str]:
        match = _SCENE_ID.match(check_scene_id(scene_id))
        if not match:
            raise SceneReadError(f"{self.points_root}: scene id {scene_id!r} is not Area_<N>_<roomType>_<roomNum>")
        return int(match["area"]), match["room"]

    def _refuse_aligned_version(self):
        if "aligned_version" in self.points_root.name.lower():
            raise SceneReadError(
                f"{self.points_root}: the Aligned_Version rotates each room, so the 2D-3D-S poses no longer "
                f"fit its points; use the non-aligned {POINTS_DIR}"
            )

    def read_scene(self, scene_id: str) -> Scene:
        area, room = self._parse_scene_id(scene_id)
        self._refuse_aligned_version()
        annotations = self.points_root / f"Area_{area}" / room / "Annotations"
        if not annotations.is_dir():
            raise SceneReadError(f"{annotations}: no Annotations folder for scene {scene_id}")
        files = sorted(annotations.glob("*.txt"))
        blocks, labels = [], []
        for path in files:
            rows, skipped = read_annotation_file(path)
            if skipped:
                warnings.warn(f"{path}: skipped {skipped}", stacklevel=2)
            class_name = path.name.split("_")[0]
            if class_name in self._class_names:
                label = self._class_names.index(class_name)
            else:  # e.g. stairs (Pointcept counts them as clutter too)
                label = self._unknown_class
            blocks.append(rows)
            labels.append(np.full(len(rows), label, dtype=np.int16))
        if not files or sum(len(b) for b in blocks) == 0:
            raise SceneReadError(f"{annotations}: no points in the Annotations files of scene {scene_id}")
        points = np.concatenate(blocks)
        coord = points[:, :3].astype(np.float32)
        color = np.clip(np.rint(points[:, 3:6]), 0, 255).astype(np.uint8)
        centre = (coord.min(axis=0) + coord.max(axis=0)) / 2
        normal = estimate_normals(coord, radius_m=NORMAL_RADIUS_M, towards=centre)
        return Scene(scene_id, coord, color, normal, np.concatenate(labels))

    def _area_folders(self, area: int) -> list[Path]:
        """The existing 2D-3D-S folders of an S3DIS area; SceneReadError if there is none."""
        bases = [self.images_root] if self.images_root is not None else [self.root, self.root / IMAGES_SUBDIR]
        folders = []
        for name in image_areas(area):
            candidates = [base / name for base in bases]
            folders += [c for c in candidates if (c / "data" / "rgb").is_dir()][:1]
        if not folders:
            looked = ", ".join(str(base / name / "data" / "rgb") for base in bases for name in image_areas(area))
            raise SceneReadError(f"no 2D-3D-S images for Area_{area}: looked for {looked}")
        return folders

    def read_views(self, scene_id: str) -> ViewSet:
        area, room = self._parse_scene_id(scene_id)
        skipped: dict[str, int] = {}
        frames = []  # (view id, area folder, rgb path, K, cam_to_world) of every valid frame of the room
        for folder in self._area_folders(area):
            names = sorted(p.name for p in (folder / "data" / "rgb").iterdir())
            for name in names:
                match = _FRAME.match(name)
                if not match or match["room"] != room:
                    continue
                pose_path = folder / "data" / "pose" / (name[: -len("rgb.png")] + "pose.json")
                if not pose_path.is_file():
                    skipped["missing pose"] = skipped.get("missing pose", 0) + 1
                    continue
                try:
                    intrinsics, cam_to_world = read_pose(pose_path)
                except (OSError, ValueError, KeyError, TypeError):
                    skipped["unreadable pose JSON"] = skipped.get("unreadable pose JSON", 0) + 1
                    continue
                if not rigid(cam_to_world) or not np.isfinite(intrinsics).all():
                    skipped["invalid pose"] = skipped.get("invalid pose", 0) + 1
                    continue
                if folder.name == "area_5b":
                    cam_to_world = AREA_5B_TO_S3DIS @ cam_to_world
                view_id = f"camera_{match['uuid']}_{room}_frame_{match['frame']}"
                frames.append((view_id, folder, folder / "data" / "rgb" / name, intrinsics, cam_to_world))
        if self.max_views is not None and len(frames) > self.max_views:
            rng = np.random.default_rng([self.seed, zlib.crc32(scene_id.encode())])
            frames = [frames[i] for i in np.sort(rng.choice(len(frames), size=self.max_views, replace=False))]
        views = []
        for view_id, folder, image_path, intrinsics, cam_to_world in frames:
            with Image.open(image_path) as image:  # reads the header only
                camera = camera_for_image(intrinsics, *image.size, (IMAGE_SIZE,))
            depth_path = folder / "data" / "depth" / (image_path.name[: -len("rgb.png")] + "depth.png")
            depth_camera: Camera | None = None
            if depth_path.is_file():
                with Image.open(depth_path) as depth:
                    depth_camera = camera_for_image(intrinsics, *depth.size, (IMAGE_SIZE,))
            else:
                depth_path = None
            views.append(View(
                view_id=view_id, image_path=image_path,
                camera=camera, cam_to_world=cam_to_world, depth_path=depth_path, depth_camera=depth_camera,
                depth_scale=DEPTH_SCALE,
            ))
        return ViewSet(views, skipped)
