"""ScanNet reader: raw scans plus the 25k-frame subset, as described in the brief §6.

Layout read:
    <root>/scans/<scene>/<scene>_vh_clean_2.ply           mesh vertices = points, RGB
    <root>/scans/<scene>/<scene>_vh_clean_2.labels.ply    nyu40 `label` per vertex
    <root>/scannet_frames_25k/<scene>/color/NNNNNN.jpg
    <root>/scannet_frames_25k/<scene>/depth/NNNNNN.png    uint16 millimetres
    <root>/scannet_frames_25k/<scene>/pose/NNNNNN.txt     4x4 camera-to-world (some are -inf/NaN)
    <root>/scannet_frames_25k/<scene>/intrinsics_color.txt, intrinsics_depth.txt   4x4

nyu40 ids map to the 20 benchmark classes of `data_manifests/scannet/classes.json`; other ids
become IGNORE_LABEL. Frames with a non-finite or non-rigid pose are skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .manifests import load_classes, read_split
from .ply import PlyError, read_ply, vertex_normals
from .scene import IGNORE_LABEL, Camera, Scene, SceneReadError, View, ViewSet, check_scene_id

# Sizes ScanNet's cameras were calibrated at; intrinsics files do not say which one applies.
COLOR_CALIBRATION_SIZES = ((1296, 968), (640, 480))
DEPTH_CALIBRATION_SIZES = ((640, 480),)


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


class ScanNetReader:
    """Reads ScanNet scans and their posed frames; see the module docstring for the layout."""

    name = "scannet"

    def __init__(self, root: Path, *, frames_dir: str = "scannet_frames_25k"):
        self.root = Path(root)
        self.frames_dir = frames_dir
        classes = load_classes("scannet")
        self._class_names = tuple(classes["names"])
        self._nyu40_to_class = np.full(256, IGNORE_LABEL, dtype=np.int16)
        for index, nyu40 in enumerate(classes["nyu40_ids"]):
            self._nyu40_to_class[nyu40] = index

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    def scene_ids(self, split: str) -> list[str]:
        return [check_scene_id(s) for s in read_split("scannet", split, root=self.root)]

    def read_scene(self, scene_id: str) -> Scene:
        scan = self.root / "scans" / check_scene_id(scene_id)
        mesh_path = scan / f"{scene_id}_vh_clean_2.ply"
        labels_path = scan / f"{scene_id}_vh_clean_2.labels.ply"
        try:
            vertices, faces = read_ply(mesh_path)
            coord = np.stack([vertices[a] for a in "xyz"], axis=1).astype(np.float32)
            color = np.stack([vertices[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
        except (OSError, PlyError, ValueError) as e:
            raise SceneReadError(f"{mesh_path}: {e}") from e
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
            nyu40 = np.clip(label_vertices["label"].astype(np.int64), 0, 255)
            label = self._nyu40_to_class[nyu40]
        else:  # test scans come without labels
            label = np.full(len(coord), IGNORE_LABEL, dtype=np.int16)
        return Scene(scene_id, coord, color, normal, label)

    def read_views(self, scene_id: str) -> ViewSet:
        frames = self.root / self.frames_dir / check_scene_id(scene_id)
        color_dir = frames / "color"
        if not color_dir.is_dir():
            raise SceneReadError(f"{color_dir}: no colour frames for scene {scene_id}")
        image_paths = sorted(color_dir.glob("*.jpg"))
        if not image_paths:
            return ViewSet([], {})
        try:
            color_k = np.loadtxt(frames / "intrinsics_color.txt")
            depth_k = np.loadtxt(frames / "intrinsics_depth.txt")
        except OSError as e:
            raise SceneReadError(f"{frames}: {e}") from e
        with Image.open(image_paths[0]) as image:  # reads the header only
            camera = camera_for_image(color_k, *image.size, COLOR_CALIBRATION_SIZES)
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
                with Image.open(depth_path) as depth:
                    depth_camera = camera_for_image(depth_k, *depth.size, DEPTH_CALIBRATION_SIZES)
            views.append(View(
                view_id=frame, image_path=image_path, camera=camera, cam_to_world=pose,
                depth_path=depth_path, depth_camera=depth_camera if depth_path else None, depth_scale=1000.0,
            ))
        return ViewSet(views, skipped)
