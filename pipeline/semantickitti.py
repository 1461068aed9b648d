"""SemanticKITTI reader under the xMUDA protocol (brief §6; paper §4.2, Table 2's target domain).

Layout read (`root` holds `sequences/`, or `dataset/sequences/` as the KITTI odometry zips unpack):
    sequences/<seq>/velodyne/<frame>.bin     float32 x 4 per point: x, y, z (metres), remission
    sequences/<seq>/labels/<frame>.label     uint32 per point: semantic id = low 16 bits, instance = high 16
    sequences/<seq>/image_2/<frame>.png      the left colour camera
    sequences/<seq>/calib.txt                lines "P0: ..." .. "P3: ..." and "Tr: ..." (12 numbers each)

A scene is one LiDAR sweep with its one front-camera image: scene id `<seq>_<frame>`, e.g.
`08_000123`. Sources for the protocol: valeoai/xmuda `xmuda/data/semantic_kitti/preprocess.py`,
`semantic_kitti_dataloader.py` and `splits.py`; the raw ids of semantic-kitti-api
`config/semantic-kitti.yaml`.

Points: xMUDA keeps the points in front of the car (x > 0 in the LiDAR frame) whose projection
P2 · Tr · p lies strictly inside the image (0 < u < width, 0 < v < height); the scene holds only
those, in the LiDAR frame (the world frame of the scene). The input is xyz only (paper §4.2, and
xMUDA feeds a constant 1 per voxel): `Scene.color` is zero and `Scene.normal` is zero ("unknown");
remission is not used.

Labels: the raw semantic ids map to xMUDA's 10 classes shared with A2D2
(`data_manifests/semantickitti/classes.json`); the ids of no merged class (bus, other-ground, ...)
become IGNORE_LABEL, and an id that SemanticKITTI does not define is an error naming the file.
Sweeps without a `.label` file (the hidden test sequences 11-21) are all IGNORE_LABEL.

Camera: Tr maps LiDAR points into the rectified frame of camera 0; P2 = K2 [I | t2] projects from
there into image_2, its 4th column K2 t2 holding camera 2's offset from camera 0. So K = P2[:, :3]
and the camera's pose in the LiDAR frame is cam_to_world = (T(t2) · Tr)^-1 with t2 = K^-1 P2[:, 3];
projecting with (K, cam_to_world) is then exactly xMUDA's P2 · Tr. KITTI's intrinsics put integer
pixel coordinates at pixel centres, as scene.py does. There is no depth image: extraction's
occlusion test is the z-buffer of the points (project.py).

Splits (`data_manifests/semantickitti/splits.json`, xMUDA's): train 00-06, 09, 10; val 07;
test 08; `all` 00-10. A split's scenes are the frames of `image_2/` on disk (xMUDA globs them) in
those of its sequences that exist (the embedded streets write only 00, 07 and 08); a split none of
whose sequences exists is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .manifests import load_classes, manifest_dir
from .scene import IGNORE_LABEL, Camera, Scene, SceneReadError, View, ViewSet, check_scene_id

POINT_BYTES = 16
"""A .bin point is 4 little-endian float32: x, y, z, remission."""
CALIB_KEYS = ("P2", "Tr")
"""The calib.txt lines the reader needs (P0, P1, P3 are other cameras)."""

_SCENE_ID = re.compile(r"^(?P<seq>\d{2})_(?P<frame>\d+)$")


def read_calib(path: Path) -> dict[str, np.ndarray]:
    """{"P2": (3, 4), "Tr": (4, 4)} of a calib.txt; SceneReadError naming the file and line if bad."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SceneReadError(f"{path}: {e}") from e
    values = {}
    for line in lines:
        if ":" not in line:
            continue  # blank lines (xMUDA stops at the first one)
        key, numbers = line.split(":", 1)
        try:
            values[key.strip()] = np.array([float(x) for x in numbers.split()], dtype=np.float64)
        except ValueError:
            raise SceneReadError(f"{path}: line {key.strip()!r} holds a value that is no number") from None
    for key in CALIB_KEYS:
        if key not in values:
            raise SceneReadError(f"{path}: no {key!r} line (SemanticKITTI calib.txt has P0..P3 and Tr)")
        if values[key].size != 12 or not np.isfinite(values[key]).all():
            raise SceneReadError(f"{path}: line {key!r} has {values[key].size} numbers, expected 12 finite ones")
    tr = np.eye(4)
    tr[:3] = values["Tr"].reshape(3, 4)
    return {"P2": values["P2"].reshape(3, 4), "Tr": tr}


def camera_pose(p2: np.ndarray, tr: np.ndarray, *, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), cam_to_world (4, 4)) of image_2 in the LiDAR frame, from P2 and Tr (module docstring)."""
    k = p2[:, :3]
    if not (k[0, 0] > 0 and k[1, 1] > 0 and k[1, 0] == 0 and np.allclose(k[2], [0, 0, 1])):
        raise SceneReadError(f"{path}: the left 3x3 of P2 is no camera matrix (expected fx, fy > 0, "
                             f"upper triangular, last row 0 0 1; got {np.round(k, 4).tolist()})")
    rotation = tr[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-3) or np.linalg.det(rotation) <= 0:
        raise SceneReadError(f"{path}: Tr is not a rigid transform (its 3x3 is no rotation)")
    cam2_from_cam0 = np.eye(4)
    cam2_from_cam0[:3, 3] = np.linalg.solve(k, p2[:, 3])  # t2: camera 2's offset, P2[:, 3] = K t2
    return k.copy(), np.linalg.inv(cam2_from_cam0 @ tr)


def in_front_and_inside(points: np.ndarray, p2: np.ndarray, tr: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N,) bool: xMUDA's crop, x > 0 in the LiDAR frame and P2 · Tr · p strictly inside the image."""
    keep = points[:, 0] > 0
    homogeneous = np.concatenate([points[keep], np.ones((int(keep.sum()), 1))], axis=1)
    pixels = homogeneous @ (p2 @ tr).T  # (M, 3)
    uv = pixels[:, :2] / pixels[:, 2:3]
    keep[keep] = (uv[:, 0] > 0) & (uv[:, 1] > 0) & (uv[:, 0] < width) & (uv[:, 1] < height)
    return keep


class SemanticKITTIReader:
    """Reads SemanticKITTI sweeps with their image_2 frame; see the module docstring for the layout.

    Args:
        root: the dataset root (holds `sequences/` or `dataset/sequences/`).
    """

    name = "semantickitti"

    def __init__(self, root: Path):
        self.root = Path(root)
        classes = load_classes("semantickitti")
        self._class_names = tuple(classes["names"])
        known = [i for ids in classes["raw_ids"].values() for i in ids] + classes["ignored_raw_ids"]
        # raw id -> class index; ids SemanticKITTI does not define stay -2 (an error when met)
        self._raw_to_class = np.full(max(known) + 1, -2, dtype=np.int16)
        self._raw_to_class[classes["ignored_raw_ids"]] = IGNORE_LABEL
        for index, name in enumerate(self._class_names):
            self._raw_to_class[classes["raw_ids"][name]] = index
        self._splits = json.loads((manifest_dir("semantickitti") / "splits.json").read_text())["sequences"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    @property
    def sequences_dir(self) -> Path:
        """`root/sequences`, else `root/dataset/sequences` (the layout of the unpacked KITTI zips)."""
        nested = self.root / "dataset" / "sequences"
        return nested if not (self.root / "sequences").is_dir() and nested.is_dir() else self.root / "sequences"

    def scene_ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise ValueError(f"unknown SemanticKITTI split {split!r}; choose one of {', '.join(self._splits)}")
        folders = [self.sequences_dir / seq / "image_2" for seq in self._splits[split]]
        if not any(folder.is_dir() for folder in folders):
            raise SceneReadError(f"{self.sequences_dir}: none of the {split!r} split's sequences "
                                 f"{', '.join(self._splits[split])} has an image_2/ folder")
        return [check_scene_id(f"{folder.parent.name}_{p.stem}")
                for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.png")) if p.stem.isdigit()]

    def _paths(self, scene_id: str) -> dict[str, Path]:
        match = _SCENE_ID.match(check_scene_id(scene_id))
        if match is None:
            raise SceneReadError(f"{scene_id!r} is not a SemanticKITTI scene id (<sequence>_<frame>, e.g. 08_000123)")
        seq_dir = self.sequences_dir / match["seq"]
        frame = match["frame"]
        return {"bin": seq_dir / "velodyne" / f"{frame}.bin", "label": seq_dir / "labels" / f"{frame}.label",
                "image": seq_dir / "image_2" / f"{frame}.png", "calib": seq_dir / "calib.txt"}

    def _image_size(self, path: Path) -> tuple[int, int]:
        try:
            with Image.open(path) as image:
                return image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SceneReadError(f"{path}: cannot read the image header ({e})") from e

    def read_scene(self, scene_id: str) -> Scene:
        paths = self._paths(scene_id)
        try:
            data = paths["bin"].read_bytes()
        except OSError as e:
            raise SceneReadError(f"{paths['bin']}: {e}") from e
        if len(data) % POINT_BYTES:
            raise SceneReadError(f"{paths['bin']}: {len(data)} bytes, not a multiple of {POINT_BYTES} "
                                 "(4 float32 per point: x, y, z, remission); a truncated download?")
        points = np.frombuffer(data, dtype="<f4").reshape(-1, 4)[:, :3]
        if not np.isfinite(points).all():
            raise SceneReadError(f"{paths['bin']}: {int((~np.isfinite(points).all(1)).sum())} points with a "
                                 "non-finite coordinate")
        label = self._read_labels(paths["label"], len(points))
        calib = read_calib(paths["calib"])
        width, height = self._image_size(paths["image"])
        keep = in_front_and_inside(points.astype(np.float64), calib["P2"], calib["Tr"], width, height)
        coord = np.ascontiguousarray(points[keep], dtype=np.float32)
        zeros = np.zeros_like(coord)  # xyz only: no colour, normals unknown
        return Scene(scene_id, coord, zeros.astype(np.uint8), zeros, label[keep])

    def _read_labels(self, path: Path, num_points: int) -> np.ndarray:
        """(N,) int16 merged-class labels of a .label file; all IGNORE_LABEL if the sweep has none."""
        if not path.exists():
            return np.full(num_points, IGNORE_LABEL, dtype=np.int16)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SceneReadError(f"{path}: {e}") from e
        if len(data) % 4:
            raise SceneReadError(f"{path}: {len(data)} bytes, not a multiple of 4 (one uint32 per point)")
        if len(data) // 4 != num_points:
            raise SceneReadError(f"{path}: {len(data) // 4} labels for the {num_points} points of its .bin sweep")
        semantic = np.frombuffer(data, dtype="<u4") & 0xFFFF  # the high 16 bits are the instance id
        label = self._raw_to_class[np.minimum(semantic, len(self._raw_to_class) - 1)]
        unknown = (label == -2) | (semantic >= len(self._raw_to_class))
        if unknown.any():
            raise SceneReadError(f"{path}: semantic id {semantic[unknown][0]} ({int(unknown.sum())} points) is "
                                 "not a SemanticKITTI class id; is this a labels file of another dataset?")
        return label

    def read_views(self, scene_id: str) -> ViewSet:
        paths = self._paths(scene_id)
        calib = read_calib(paths["calib"])
        intrinsics, cam_to_world = camera_pose(calib["P2"], calib["Tr"], path=paths["calib"])
        width, height = self._image_size(paths["image"])
        view = View(view_id=paths["image"].stem, image_path=paths["image"],
                    camera=Camera(intrinsics, width, height), cam_to_world=cam_to_world)
        return ViewSet([view], {})
