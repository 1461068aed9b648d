"""Matterport3D v1 reader: one scene per annotated region, with the undistorted RGB-D images.

Facts from niessner/Matterport (`data_organization.md`, `metadata/`, `tasks/benchmark/`) and
OpenScene's Matterport scripts (`preprocess_3d_matterport.py`, `preprocess_2d_matterport.py`,
`fusion_util.get_matterport_camera_data`), as summarised in the brief §6.

Layout read (`<scan>` is a house id such as 17DRP5sb8fy):
    <scans>/<scan>/region_segmentations/region<k>.ply   or the same inside region_segmentations.zip
    <scans>/<scan>/undistorted_camera_parameters/<scan>.conf
    <scans>/<scan>/undistorted_color_images/<pano>_i<cam>_<yaw>.jpg    1280x1024
    <scans>/<scan>/undistorted_depth_images/<pano>_d<cam>_<yaw>.png    uint16 z, 0.25 mm units, 0 = none
    <root>/metadata/category_mapping.tsv    else the copy shipped in data_manifests/matterport/
    <root>/scenes_<split>.txt               else the official lists shipped in data_manifests/matterport/
where <scans> is the first of <root>/v1/scans, <root>/scans, <root> that holds the scan. The
official download gives `<root>/v1/scans/<scan>/<type>.zip`, and each zip holds `<scan>/<type>/...`:
unzipped in place, the folders land in `<scans>/<scan>/<scan>/<type>/`, which is read too. Region
meshes are also read straight out of an unextracted `region_segmentations.zip`.

Scene id: `<scan>_region<k>`; `scene_ids(split)` lists every region of every scan of the split on disk.

Points. A region PLY is binary little-endian: vertex float x y z nx ny nz tx ty, uchar red green
blue; face list uchar int vertex_indices, int material_id, int segment_id, int category_id. Points
are the vertices, normals their nx ny nz. `category_id` is the 1-based `index` column of
category_mapping.tsv (-1 and 0: unlabelled); its row's `nyu40id` (empty in some rows: unlabelled)
maps to our 21 classes (ScanNet's 20 nyu40 ids plus 22 = ceiling; other ids unlabelled). We map
through nyu40id, not mpcat40, which merges desk and coffee table into table and rug into floor.
A vertex takes the label most of its faces carry; unlabelled faces vote too, as "unlabelled".
Ties go to unlabelled, then to the class listed first in classes.json; a vertex in no face is
unlabelled. This is the argmax of OpenScene's per-vertex vote counts, so labels match its data.

Views. Each `intrinsics_matrix fx 0 cx 0 fy cy 0 0 1` line of the .conf applies to the `scan
<depth> <color> <16 numbers>` lines after it, up to the next one; the 16 numbers are a row-major
camera -> world matrix in OpenGL axes (the camera looks down -z, +y up). Negating its y and z
columns gives the OpenCV camera (data_organization.md says the images have their origin at the
bottom left; OpenScene flips y and z and reads the JPEGs top-down with the .conf's cy, and so do we).
Intrinsics are for 1280x1024 images and are rescaled to the actual image size; depth and colour
images share the pose and intrinsics. A region's images (OpenScene's rule) are those whose camera
centre lies strictly inside the region's bounding box grown by `bbox_margin_m` on every side; when
none does, the `max_views` cameras nearest to the box centre stand in (OpenScene does so for test
regions). Of those, views with a non-finite or non-rigid pose or a missing colour image are skipped
and counted (a missing depth image only leaves `depth_path` None, as in ScanNet); then at most
`max_views` are kept, a random subset fixed by (seed, scene id), and the others are counted as
"beyond max_views".
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .manifests import load_classes, manifest_dir
from .ply import PlyError, read_elements, vertex_normals
from .scannet import valid_pose
from .scene import IGNORE_LABEL, Camera, Scene, SceneReadError, View, ViewSet, check_scene_id

CALIBRATION_SIZE = (1280, 1024)  # width, height the undistorted intrinsics describe
DEPTH_SCALE = 4000.0  # depth units per metre: 0.25 mm
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # right-multiplied: negates the y and z columns
REGION_PLY = re.compile(r"(?:^|/)region_segmentations/region(\d+)\.ply$")

def read_region_ply(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a region PLY -> (vertices (N,) structured, faces (F, 3) int64, category_id (F,) int64).

    The face element carries material, segment and category ids after its vertex list.
    """
    try:
        arrays = read_elements(data, source)
    except PlyError as e:
        raise SceneReadError(str(e)) from e
    vertices, faces = arrays.get("vertex"), arrays.get("face")
    if vertices is None or faces is None:
        raise SceneReadError(f"{source}: a region PLY needs a vertex and a face element")
    missing = {"x", "y", "z", "red", "green", "blue"} - set(vertices.dtype.names)
    missing |= {"vertex_indices", "category_id"} - set(faces.dtype.names)
    if missing:
        raise SceneReadError(f"{source}: PLY lacks the properties {sorted(missing)}")
    corners = faces["vertex_indices"].astype(np.int64)
    if len(corners) and (corners.min() < 0 or corners.max() >= len(vertices)):
        raise SceneReadError(f"{source}: a face refers to a vertex index outside 0..{len(vertices) - 1}")
    return vertices, corners, faces["category_id"].astype(np.int64)


def read_category_mapping(path: Path) -> np.ndarray:
    """category_mapping.tsv -> (max index + 1,) int64 nyu40 id per category index, 0 where none.

    Index 0 (and -1, handled by the caller) is "unlabelled"; rows with an empty nyu40id give 0.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()  # the real file has CRLF endings
    except (OSError, UnicodeDecodeError) as e:
        raise SceneReadError(f"{path}: cannot read the category mapping ({e})") from e
    header = lines[0].split("\t") if lines else []
    if "index" not in header or "nyu40id" not in header:
        raise SceneReadError(f"{path}: header must have 'index' and 'nyu40id' columns (got {header[:6]})")
    index_col, nyu40_col = header.index("index"), header.index("nyu40id")
    table = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        try:
            nyu40 = cells[nyu40_col].strip() if nyu40_col < len(cells) else ""
            table[int(cells[index_col])] = int(nyu40) if nyu40 else 0
        except ValueError as e:
            raise SceneReadError(f"{path}: line {number}: {e}") from e
    nyu40_of = np.zeros(max(table, default=0) + 1, dtype=np.int64)
    for index, nyu40 in table.items():
        if index > 0:
            nyu40_of[index] = nyu40
    return nyu40_of


def vote_vertex_labels(faces: np.ndarray, face_label: np.ndarray, num_vertices: int, num_classes: int) -> np.ndarray:
    """Per-vertex majority of its faces' labels (IGNORE_LABEL included as a candidate) -> (N,) int16.

    Column 0 counts unlabelled faces, column c + 1 class c; argmax takes the first maximum, so
    ties go to unlabelled, then to the lower class index.
    """
    column = np.repeat(face_label.astype(np.int64) + 1, 3)  # one vote per face corner
    counts = np.bincount(faces.reshape(-1) * (num_classes + 1) + column,
                         minlength=num_vertices * (num_classes + 1)).reshape(num_vertices, num_classes + 1)
    return (counts.argmax(axis=1) - 1).astype(np.int16)


@dataclass(frozen=True)
class ConfImage:
    """One `scan` line of an undistorted_camera_parameters .conf file."""

    depth_name: str
    color_name: str
    intrinsics: np.ndarray
    """(3, 3) K of the intrinsics_matrix line above, for 1280x1024 images."""
    cam_to_world_gl: np.ndarray
    """(4, 4) camera -> world, OpenGL camera axes."""


def read_conf(path: Path) -> tuple[dict[str, str], list[ConfImage]]:
    """Parse a .conf file -> (header values such as color_directory, its images in file order)."""
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SceneReadError(f"{path}: cannot read the camera parameters ({e})") from e
    header, images, intrinsics = {}, [], None
    for number, line in enumerate(lines, start=1):
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "intrinsics_matrix":
                if len(words) != 10:
                    raise ValueError(f"intrinsics_matrix needs 9 numbers, got {len(words) - 1}")
                intrinsics = np.array(words[1:], dtype=np.float64).reshape(3, 3)
            elif words[0] == "scan":
                if intrinsics is None:
                    raise ValueError("a scan line before any intrinsics_matrix line")
                if len(words) != 19:
                    raise ValueError(f"scan needs 2 file names and 16 numbers, got {len(words) - 1} fields")
                pose = np.array(words[3:], dtype=np.float64).reshape(4, 4)
                images.append(ConfImage(words[1], words[2], intrinsics, pose))
            elif len(words) == 2:
                header[words[0]] = words[1]
            else:
                raise ValueError(f"unknown line {line.strip()[:40]!r}")
        except ValueError as e:
            raise SceneReadError(f"{path}: line {number}: {e}") from e
    return header, images


def parse_scene_id(scene_id: str) -> tuple[str, int]:
    """'<scan>_region<k>' -> (scan, k)."""
    scan, sep, region = check_scene_id(scene_id).rpartition("_region")
    if not sep or not scan or not region.isdigit():
        raise SceneReadError(f"scene id {scene_id!r}: expected '<scan>_region<k>', e.g. 17DRP5sb8fy_region0")
    return scan, int(region)


class MatterportReader:
    """Reads Matterport3D regions and their posed RGB-D images; see the module docstring."""

    name = "matterport"

    def __init__(self, root: Path, *, max_views: int | None = 50, bbox_margin_m: float = 0.0, seed: int = 0):
        self.root = Path(root)
        self.max_views = max_views
        self.bbox_margin_m = bbox_margin_m
        self.seed = seed
        classes = load_classes("matterport")
        self._class_names = tuple(classes["names"])
        self._nyu40_to_class = np.full(256, IGNORE_LABEL, dtype=np.int16)
        for index, nyu40 in enumerate(classes["nyu40_ids"]):
            self._nyu40_to_class[nyu40] = index
        self._category_to_class = None  # read on first use, then kept (readers are pickled to workers)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    # -- layout ---------------------------------------------------------------------------------

    def _scan_candidates(self, scan: str) -> list[Path]:
        return [self.root / "v1" / "scans" / scan, self.root / "scans" / scan, self.root / scan]

    def _has_scan(self, scan: str) -> bool:
        return any(candidate.is_dir() for candidate in self._scan_candidates(scan))

    def scan_dir(self, scan: str) -> Path:
        candidates = self._scan_candidates(scan)
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        raise SceneReadError(f"{candidates[1]}: scan {scan} not found "
                             f"(also looked in {candidates[0]} and {candidates[2]})")

    def _data_path(self, scan: str, relative: str) -> Path:
        """`<scan dir>/<relative>`, or `<scan dir>/<scan>/<relative>` where a zip was unpacked in place."""
        scan_dir = self.scan_dir(scan)
        nested = scan_dir / scan / relative
        return nested if not (scan_dir / relative).exists() and nested.exists() else scan_dir / relative

    def regions(self, scan: str) -> list[int]:
        """The region numbers of a scan, from the extracted folder, else from region_segmentations.zip."""
        folder = self._data_path(scan, "region_segmentations")
        if folder.is_dir():
            names = [f"region_segmentations/{p.name}" for p in folder.glob("region*.ply")]
        else:
            archive = self._data_path(scan, "region_segmentations.zip")
            if not archive.is_file():
                raise SceneReadError(f"{folder}: no region meshes for scan {scan} (nor {archive.name})")
            try:
                with zipfile.ZipFile(archive) as z:
                    names = z.namelist()
            except (OSError, zipfile.BadZipFile) as e:
                raise SceneReadError(f"{archive}: {e}") from e
        return sorted(int(m.group(1)) for m in map(REGION_PLY.search, names) if m)

    def _region_bytes(self, scan: str, region: int) -> tuple[bytes, str]:
        path = self._data_path(scan, f"region_segmentations/region{region}.ply")
        if path.is_file():
            return path.read_bytes(), str(path)
        archive = self._data_path(scan, "region_segmentations.zip")
        if not archive.is_file():
            raise SceneReadError(f"{path}: region mesh not found (nor {archive.name})")
        try:
            with zipfile.ZipFile(archive) as z:
                member = next((n for n in z.namelist() if n.endswith(f"region_segmentations/region{region}.ply")), None)
                if member is None:
                    raise SceneReadError(f"{archive}: no region_segmentations/region{region}.ply inside")
                return z.read(member), f"{archive}:{member}"
        except (OSError, zipfile.BadZipFile) as e:
            raise SceneReadError(f"{archive}: {e}") from e

    def _category_classes(self) -> np.ndarray:
        """(K,) int16 class per category_mapping index (index 0 = unlabelled)."""
        if self._category_to_class is None:
            path = self.root / "metadata" / "category_mapping.tsv"
            if not path.is_file():
                path = manifest_dir("matterport") / "category_mapping.tsv"
            nyu40 = read_category_mapping(path)
            self._category_to_class = self._nyu40_to_class[np.clip(nyu40, 0, 255)]
        return self._category_to_class

    # -- the reader interface -------------------------------------------------------------------

    def scene_ids(self, split: str) -> list[str]:
        name = f"scenes_{split}.txt"
        for path in (self.root / name, manifest_dir("matterport") / name):
            if path.is_file():
                scans = [s.strip() for s in path.read_text().splitlines() if s.strip()]
                break
        else:
            raise SceneReadError(f"{self.root / name}: no split list {name!r} here or in {manifest_dir('matterport')}")
        scans = [check_scene_id(scan) for scan in scans]
        missing = [scan for scan in scans if not self._has_scan(scan)]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise SceneReadError(f"{self.root}: {len(missing)} scans of split {split!r} not found ({shown}): "
                                 "download them or choose scenes with --scenes")
        return [check_scene_id(f"{scan}_region{k}") for scan in scans for k in self.regions(scan)]

    def read_scene(self, scene_id: str) -> Scene:
        scan, region = parse_scene_id(scene_id)
        vertices, faces, category = read_region_ply(*self._region_bytes(scan, region))
        coord = np.stack([vertices[a] for a in "xyz"], axis=1).astype(np.float32)
        color = np.stack([vertices[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
        if {"nx", "ny", "nz"} <= set(vertices.dtype.names):
            normal = np.stack([vertices[a] for a in ("nx", "ny", "nz")], axis=1).astype(np.float32)
            length = np.linalg.norm(normal, axis=1, keepdims=True)
            normal = np.where(length > 1e-6, normal / np.maximum(length, 1e-6), 0).astype(np.float32)
        else:
            normal = vertex_normals(coord, faces)
        category_to_class = self._category_classes()
        if len(category) and category.max() >= len(category_to_class):
            raise SceneReadError(f"scene {scene_id}: category_id {category.max()} is beyond category_mapping.tsv's "
                                 f"{len(category_to_class) - 1} rows")
        face_label = category_to_class[np.maximum(category, 0)]  # -1 and 0 -> index 0 -> unlabelled
        label = vote_vertex_labels(faces, face_label, len(coord), len(self._class_names))
        return Scene(scene_id, coord, color, normal, label)

    def read_views(self, scene_id: str) -> ViewSet:
        scan, region = parse_scene_id(scene_id)
        conf_path = self._data_path(scan, f"undistorted_camera_parameters/{scan}.conf")
        if not conf_path.is_file():
            raise SceneReadError(f"{conf_path}: camera parameters of scan {scan} not found")
        header, images = read_conf(conf_path)
        color_dir = self._data_path(scan, header.get("color_directory", "undistorted_color_images"))
        depth_dir = self._data_path(scan, header.get("depth_directory", "undistorted_depth_images"))
        vertices, _, _ = read_region_ply(*self._region_bytes(scan, region))
        coord = np.stack([vertices[a] for a in "xyz"], axis=1).astype(np.float64)
        members = self.region_images(images, coord.min(axis=0), coord.max(axis=0))

        skipped, usable = {}, []
        for image in members:
            if not valid_pose(image.cam_to_world_gl):
                skipped["invalid pose"] = skipped.get("invalid pose", 0) + 1
            elif not (color_dir / image.color_name).is_file():
                skipped["missing colour image"] = skipped.get("missing colour image", 0) + 1
            else:
                usable.append(image)
        if self.max_views is not None and len(usable) > self.max_views:
            skipped["beyond max_views"] = len(usable) - self.max_views
            rng = np.random.default_rng([self.seed, zlib.crc32(scene_id.encode())])
            usable = [usable[i] for i in np.sort(rng.choice(len(usable), size=self.max_views, replace=False))]
        if not usable:
            return ViewSet([], skipped)

        with Image.open(color_dir / usable[0].color_name) as first:  # reads the header only
            color_size = first.size
        depth_size = None
        views = []
        for image in usable:
            depth_path = depth_dir / image.depth_name
            if not depth_path.is_file():
                depth_path = None
            elif depth_size is None:
                with Image.open(depth_path) as depth:
                    depth_size = depth.size
            calibrated = Camera(image.intrinsics, *CALIBRATION_SIZE)
            views.append(View(
                view_id=Path(image.color_name).stem, image_path=color_dir / image.color_name,
                camera=calibrated.resized(*color_size), cam_to_world=image.cam_to_world_gl @ OPENGL_TO_OPENCV,
                depth_path=depth_path, depth_camera=calibrated.resized(*depth_size) if depth_path else None,
                depth_scale=DEPTH_SCALE,
            ))
        return ViewSet(views, skipped)

    def region_images(self, images: list[ConfImage], bbox_min: np.ndarray, bbox_max: np.ndarray) -> list[ConfImage]:
        """The images whose camera centre lies strictly inside the padded box; else the nearest ones."""
        if not images:
            return []
        centres = np.stack([image.cam_to_world_gl[:3, 3] for image in images])
        low, high = bbox_min - self.bbox_margin_m, bbox_max + self.bbox_margin_m
        inside = np.all((centres > low) & (centres < high), axis=1)  # NaN centres are never inside
        if inside.any():
            return [image for image, keep in zip(images, inside) if keep]
        distance = np.linalg.norm(centres - (bbox_min + bbox_max) / 2, axis=1)
        distance[~np.isfinite(distance)] = np.inf
        nearest = np.sort(np.argsort(distance, kind="stable")[: self.max_views])
        return [images[i] for i in nearest if np.isfinite(distance[i])]
