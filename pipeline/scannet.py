"""ScanNet reader: raw scans plus the 25k-frame subset, as described in the brief §6.

Layout read:
    <root>/scans/<scene>/<scene>_vh_clean_2.ply           mesh vertices = points, RGB
    <root>/scans/<scene>/<scene>_vh_clean_2.labels.ply    nyu40 `label` per vertex
    <root>/scannet_frames_25k/<scene>/color/NNNNNN.jpg
    <root>/scannet_frames_25k/<scene>/depth/NNNNNN.png    uint16 millimetres
    <root>/scannet_frames_25k/<scene>/pose/NNNNNN.txt     4x4 camera-to-world (some are -inf/NaN)
    <root>/scannet_frames_25k/<scene>/intrinsics_color.txt, intrinsics_depth.txt   4x4

nyu40 ids map to the 20 benchmark classes of `data_manifests/scannet/classes.json`; other ids
become IGNORE_LABEL, and a value outside 0..40 (another class map's labels) is an error. An empty
mesh, non-finite vertices and an intrinsics file that is no camera matrix (not 3x3 or 4x4,
non-finite, fx or fy <= 0, last row not 0 0 1) are errors naming the file. Frames with a
non-finite or non-rigid pose are skipped and counted; so is a frame whose colour or depth image
cannot be decoded, later, by extraction.

Two options replace one side of that layout (keyword arguments of `ScanNetReader`):

frames_source="sens": the frames come from the full streams `<root>/scans/<scene>/<scene>.sens`
    (see sens.py). A `View` names image and depth files, so every `frame_skip`-th frame is exported
    once, on first use, into `<sens_cache>/skip<frame_skip>/<scene>/` in the 25k layout above, and
    read from there. The export goes to a temporary sibling folder that is renamed when complete,
    so an interrupted or concurrent export never leaves a half-written scene. `sens_cache`
    defaults to `<root>/sens_frames` and must be writable (and shared by Dask workers).

points="pointcept": the points come from Pointcept's preprocessed scenes
    (Pointcept `pointcept/datasets/preprocessing/scannet/preprocess_scannet.py`):
        <points_root>/{train,val,test}/<scene>/coord.npy      (N, 3) float32 metres, mesh vertices
        <points_root>/{train,val,test}/<scene>/color.npy      (N, 3) uint8
        <points_root>/{train,val,test}/<scene>/normal.npy     (N, 3) float32 area-weighted vertex normals
        <points_root>/{train,val,test}/<scene>/segment20.npy  (N,) int, index into the 20 classes
                                                              (same order as ours), -1 ignore; absent for test
    The points are the `_vh_clean_2` vertices in the raw scan frame (Pointcept does not apply the
    axis alignment), so the frames' poses apply unchanged. `scene_ids(split)` lists
    `<points_root>/<split>/` when that folder exists. Without normal.npy, normals are estimated.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .manifests import load_classes, read_split
from .ply import PlyError, read_ply, vertex_normals
from .scene import IGNORE_LABEL, Camera, Scene, SceneReadError, View, ViewSet, check_scene_id
from .sens import EXPORT_MARKER, export_frames

# Sizes ScanNet's cameras were calibrated at; intrinsics files do not say which one applies.
COLOR_CALIBRATION_SIZES = ((1296, 968), (640, 480))
DEPTH_CALIBRATION_SIZES = ((640, 480),)
NYU40_MAX = 40  # labels PLYs hold nyu40 ids 1..40, 0 = unannotated


def camera_for_image(intrinsics: np.ndarray, width: int, height: int, calibration_sizes) -> Camera:
    """The camera of an image of `width` x `height`, whatever size its intrinsics were calibrated for.

    Users report 25k-subset colour JPEGs at 640x480 while `intrinsics_color.txt` describes the
    1296x968 sensor. The principal point sits near the image centre, so the calibration size is
    the candidate closest to (2 cx, 2 cy); the intrinsics are then rescaled to the actual image.
    """
    k = np.asarray(intrinsics, dtype=np.float64)[:3, :3]
    candidates = list(calibration_sizes) + [(width, height)]
    centre = np.array([2 * k[0, 2], 2 * k[1, 2]])
    calib_w, calib_h = min(candidates, key=lambda wh: np.abs(centre - wh).sum())
    return Camera(k, calib_w, calib_h).resized(width, height)


def valid_pose(pose: np.ndarray) -> bool:
    """A finite rigid transform (ScanNet marks lost tracking with -inf / NaN poses)."""
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        return False
    rotation = pose[:3, :3]
    return bool(np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3) and np.allclose(pose[3], [0, 0, 0, 1]))


def read_intrinsics(path: Path) -> np.ndarray:
    """The 3x3 K of a ScanNet intrinsics file (4x4, or 3x3); SceneReadError if it is no camera matrix."""
    try:
        matrix = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as e:
        raise SceneReadError(f"{path}: {e}") from e
    if matrix.shape not in ((3, 3), (4, 4)):
        raise SceneReadError(f"{path}: a {matrix.shape[0]}x{matrix.shape[1]} matrix, expected 4x4 (or 3x3) intrinsics")
    k = matrix[:3, :3]
    if not np.isfinite(k).all() or not (k[0, 0] > 0 and k[1, 1] > 0) or not np.allclose(k[2], [0, 0, 1]):
        raise SceneReadError(f"{path}: not a camera matrix (fx={k[0, 0]:g}, fy={k[1, 1]:g}, last row "
                             f"{' '.join(f'{v:g}' for v in k[2])}); expected fx, fy > 0 and last row 0 0 1")
    return k


def _first_image_size(paths: list[Path]) -> tuple[int, int] | None:
    """(width, height) from the header of the first of `paths` that opens, or None."""
    for path in paths:
        try:
            with Image.open(path) as image:
                return image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
    return None


class ScanNetReader:
    """Reads ScanNet scans and their posed frames; see the module docstring for the layout.

    Args:
        root: the dataset root (holds `scans/` and the frames folder).
        frames_dir: the folder of exported frames under `root` (frames_source="folder").
        frames_source: "folder" (the 25k subset or any export in its layout) or "sens" (the
            `.sens` streams, exported on first use).
        frame_skip: with frames_source="sens", every how many stream frames a view is taken.
        sens_cache: where .sens frames are exported (default `<root>/sens_frames`).
        points: "mesh" (the `_vh_clean_2` PLYs) or "pointcept" (Pointcept's .npy scenes).
        points_root: the Pointcept output folder (default `root`).
    """

    name = "scannet"

    def __init__(self, root: Path, *, frames_dir: str = "scannet_frames_25k", frames_source: str = "folder",
                 frame_skip: int = 20, sens_cache: Path | None = None, points: str = "mesh",
                 points_root: Path | None = None):
        if frames_source not in ("folder", "sens"):
            raise ValueError(f"frames_source must be 'folder' or 'sens', got {frames_source!r}")
        if points not in ("mesh", "pointcept"):
            raise ValueError(f"points must be 'mesh' or 'pointcept', got {points!r}")
        if frame_skip < 1:
            raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
        self.root = Path(root)
        self.frames_dir = frames_dir
        self.frames_source = frames_source
        self.frame_skip = frame_skip
        self.sens_cache = Path(sens_cache) if sens_cache is not None else self.root / "sens_frames"
        self.points = points
        self.points_root = Path(points_root) if points_root is not None else self.root
        classes = load_classes("scannet")
        self._class_names = tuple(classes["names"])
        self._nyu40_to_class = np.full(NYU40_MAX + 1, IGNORE_LABEL, dtype=np.int16)
        for index, nyu40 in enumerate(classes["nyu40_ids"]):
            self._nyu40_to_class[nyu40] = index

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    def scene_ids(self, split: str) -> list[str]:
        split_dir = self.points_root / split
        if self.points == "pointcept" and split_dir.is_dir():
            return sorted(check_scene_id(p.name) for p in split_dir.iterdir() if (p / "coord.npy").is_file())
        return [check_scene_id(s) for s in read_split("scannet", split, root=self.root)]

    def read_scene(self, scene_id: str) -> Scene:
        if self.points == "pointcept":
            return self._read_pointcept_scene(scene_id)
        scan = self.root / "scans" / check_scene_id(scene_id)
        mesh_path = scan / f"{scene_id}_vh_clean_2.ply"
        labels_path = scan / f"{scene_id}_vh_clean_2.labels.ply"
        try:
            vertices, faces = read_ply(mesh_path)
            coord = np.stack([vertices[a] for a in "xyz"], axis=1).astype(np.float32)
            color = np.stack([vertices[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
        except (OSError, PlyError, ValueError) as e:
            raise SceneReadError(f"{mesh_path}: {e}") from e
        if len(coord) == 0:
            raise SceneReadError(f"{mesh_path}: no vertices (an empty scan)")
        if not np.isfinite(coord).all():
            bad = int((~np.isfinite(coord).all(axis=1)).sum())
            raise SceneReadError(f"{mesh_path}: {bad} of {len(coord)} vertices have a non-finite coordinate")
        if {"nx", "ny", "nz"} <= set(vertices.dtype.names):
            normal = np.stack([vertices[a] for a in ("nx", "ny", "nz")], axis=1).astype(np.float32)
        elif faces is not None:
            normal = vertex_normals(coord, faces)
        else:
            normal = np.zeros_like(coord)
        if labels_path.exists():
            try:
                label_vertices, _ = read_ply(labels_path)
            except (OSError, PlyError) as e:
                raise SceneReadError(f"{labels_path}: {e}") from e
            if len(label_vertices) != len(coord):
                raise SceneReadError(f"{labels_path}: {len(label_vertices)} labels for {len(coord)} vertices")
            nyu40 = label_vertices["label"].astype(np.int64)
            outside = (nyu40 < 0) | (nyu40 > NYU40_MAX)
            if outside.any():
                raise SceneReadError(f"{labels_path}: label {nyu40[outside][0]} ({int(outside.sum())} vertices) is not "
                                     f"a nyu40 id 0..{NYU40_MAX}; is this a labels file of another class map?")
            label = self._nyu40_to_class[nyu40]
        else:  # test scans come without labels
            label = np.full(len(coord), IGNORE_LABEL, dtype=np.int16)
        return Scene(scene_id, coord, color, normal, label)

    def _read_pointcept_scene(self, scene_id: str) -> Scene:
        check_scene_id(scene_id)
        folders = [self.points_root / split / scene_id for split in ("train", "val", "test")]
        folder = next((f for f in folders if (f / "coord.npy").is_file()), None)
        if folder is None:
            raise SceneReadError(f"{self.points_root}: no {{train,val,test}}/{scene_id}/coord.npy (Pointcept layout)")

        def load(name: str) -> np.ndarray | None:
            path = folder / f"{name}.npy"
            if not path.is_file():
                return None
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise SceneReadError(f"{path}: {e}") from e

        def check(name: str, array: np.ndarray, shape: tuple) -> np.ndarray:
            if array.shape != shape:
                raise SceneReadError(f"{folder / name}.npy: shape {array.shape}, expected {shape} (N from coord.npy)")
            return array

        coord = load("coord")
        if coord.ndim != 2 or coord.shape[1] != 3 or len(coord) == 0 or not np.isfinite(coord).all():
            raise SceneReadError(f"{folder / 'coord.npy'}: shape {coord.shape}, expected finite (N, 3) with N > 0")
        coord = coord.astype(np.float32)
        n = len(coord)
        color = load("color")
        if color is None:
            raise SceneReadError(f"{folder / 'color.npy'}: missing (Pointcept writes coord.npy and color.npy)")
        # uint8 from Pointcept; other tools store 0..255 floats
        color = np.clip(np.rint(check("color", color, (n, 3))), 0, 255).astype(np.uint8)
        normal = load("normal")
        if normal is None:
            from .normals import estimate_normals  # lazy: only scenes without normal.npy need it

            normal = estimate_normals(coord)
        normal = check("normal", normal, (n, 3)).astype(np.float32)
        length = np.linalg.norm(normal, axis=1, keepdims=True)
        normal = np.where(length > 1e-6, normal / np.maximum(length, 1e-6), 0).astype(np.float32)
        segment = load("segment20")
        if segment is None:  # Pointcept writes no labels for test scenes
            label = np.full(len(coord), IGNORE_LABEL, dtype=np.int16)
        else:
            segment = check("segment20", segment.reshape(-1) if segment.shape == (n, 1) else segment, (n,)).astype(np.int64)
            known = (segment >= 0) & (segment < len(self._class_names))
            bad = ~known & (segment != -1) & (segment != 255)  # -1 ignore (255 in older tools)
            if bad.any():
                raise SceneReadError(f"{folder / 'segment20.npy'}: value {segment[bad][0]} is not a class index "
                                     f"0..{len(self._class_names) - 1} or -1 (ignore)")
            label = np.where(known, segment, IGNORE_LABEL).astype(np.int16)
        return Scene(scene_id, coord, color, normal, label)

    def read_views(self, scene_id: str) -> ViewSet:
        if self.frames_source == "sens":
            frames = self._exported_sens_frames(check_scene_id(scene_id))
            depth_scale = float(json.loads((frames / EXPORT_MARKER).read_text()).get("depth_shift", 1000.0))
        else:
            frames = self.root / self.frames_dir / check_scene_id(scene_id)
            depth_scale = 1000.0
        return self._read_frame_folder(frames, scene_id, depth_scale)

    def _exported_sens_frames(self, scene_id: str) -> Path:
        """`<sens_cache>/skip<N>/<scene>/`, exported from the scene's .sens file unless already there."""
        target = self.sens_cache / f"skip{self.frame_skip}" / scene_id
        if (target / EXPORT_MARKER).is_file():
            return target
        if target.exists():
            raise SceneReadError(f"{target}: a frame export without {EXPORT_MARKER} (interrupted by hand?): delete the folder")
        sens_path = self.root / "scans" / scene_id / f"{scene_id}.sens"
        if not sens_path.is_file():
            raise SceneReadError(f"{sens_path}: no .sens stream for scene {scene_id} (frames_source='sens')")
        # export beside the target and rename: readers never see a partial folder, and of two
        # workers exporting the same scene the second rename fails and its copy is dropped
        partial = target.parent / f".{scene_id}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            export_frames(sens_path, partial, frame_skip=self.frame_skip)
            try:
                os.rename(partial, target)
            except OSError:
                if not (target / EXPORT_MARKER).is_file():
                    raise
        except OSError as e:
            raise SceneReadError(f"{target}: cannot export the frames of {sens_path} ({e})") from e
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target

    def _read_frame_folder(self, frames: Path, scene_id: str, depth_scale: float) -> ViewSet:
        color_dir = frames / "color"
        if not color_dir.is_dir():
            raise SceneReadError(f"{color_dir}: no colour frames for scene {scene_id}")
        image_paths = sorted(color_dir.glob("*.jpg"))
        if not image_paths:
            return ViewSet([], {})
        color_k = read_intrinsics(frames / "intrinsics_color.txt")
        depth_k = read_intrinsics(frames / "intrinsics_depth.txt")
        # the camera of the first image whose header reads (extraction skips and counts the others)
        size = _first_image_size(image_paths)
        if size is None:
            return ViewSet([], {"unreadable image": len(image_paths)})
        camera = camera_for_image(color_k, *size, COLOR_CALIBRATION_SIZES)
        views, skipped = [], {}
        depth_camera = None
        for image_path in image_paths:
            frame = image_path.stem
            pose_path = frames / "pose" / f"{frame}.txt"
            depth_path = frames / "depth" / f"{frame}.png"
            try:
                pose = np.loadtxt(pose_path)
            except (OSError, ValueError):
                skipped["missing pose"] = skipped.get("missing pose", 0) + 1
                continue
            if not valid_pose(pose):
                skipped["invalid pose"] = skipped.get("invalid pose", 0) + 1
                continue
            if not depth_path.exists():
                depth_path = None
            elif depth_camera is None:
                # an unreadable header: extraction skips this view; later depth images may set the camera
                depth_size = _first_image_size([depth_path])
                if depth_size is not None:
                    depth_camera = camera_for_image(depth_k, *depth_size, DEPTH_CALIBRATION_SIZES)
            views.append(View(
                view_id=frame, image_path=image_path, camera=camera, cam_to_world=pose,
                depth_path=depth_path, depth_scale=depth_scale,
            ))
        # every depth image gets the camera of the first readable one; extraction rescales it to each
        # depth image's own size, or skips and counts the view if that is unreadable or of another shape
        depth_camera = depth_camera or camera_for_image(depth_k, *DEPTH_CALIBRATION_SIZES[0], DEPTH_CALIBRATION_SIZES)
        views = [replace(v, depth_camera=depth_camera) if v.depth_path is not None else v for v in views]
        return ViewSet(views, skipped)
