"""The `custom` reader: a simple documented layout for users' own RGB-D scans.

Layout read:
    <root>/classes.json               optional: ["wall", "floor", ...], the class of label i is names[i];
                                      without it every label is ignored (adaptation needs none)
    <root>/<split>.txt                optional split lists, one scene id a line; split "all" is every
                                      scene folder (a folder holding points.ply or points.npz)
    <root>/<scene>/points.ply         vertex x y z (metres), optional red green blue (0..255),
                                      nx ny nz, label (int); ascii or binary little-endian; faces ignored
    <root>/<scene>/points.npz         instead of points.ply: coord (N, 3) metres, optional color (N, 3)
                                      0..255, normal (N, 3), label (N,) int
    <root>/<scene>/images/*.jpg|png   the colour images named by cameras.json
    <root>/<scene>/depth/*.png        optional uint16 depth images, `depth_scale` units per metre
    <root>/<scene>/cameras.json       the posed views:
        {
          "depth_scale": 1000,              optional, depth units per metre (default 1000 = millimetres)
          "axes": "opencv",                 optional, "opencv" (x right, y down, z forward; default)
                                            or "opengl" (x right, y up, camera looks down -z)
          "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],   optional default for frames without one
          "frames": [
            {"image": "images/0001.jpg",    path relative to the scene folder (required)
             "depth": "depth/0001.png",     optional, registered to the image (same pose)
             "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],  intrinsics, pixel centres at integers
             "K_size": [width, height],     optional, the image size K was calibrated for (default:
                                            the image file's size); K is rescaled to the actual size
             "depth_K": [[...]],            optional intrinsics of the depth image at its own size
                                            (default: K rescaled to the depth image's size)
             "cam_to_world": 4x4 or 3x4 row-major camera-to-world}, ...]
        }

Labels: -1 (or 255, for uint8 files) means unlabelled; a label >= the number of classes is an
error. Points without colour get black; without normals, normals are estimated from the points
(pipeline/normals.py). Malformed files and keys raise SceneReadError naming the file and the key;
frames with a non-finite or non-rigid pose, or whose image or depth file is missing or unreadable,
are skipped and counted in `ViewSet.skipped`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .ply import PlyError, read_ply
from .scannet import valid_pose
from .scene import IGNORE_LABEL, Camera, Scene, SceneReadError, View, ViewSet, check_scene_id

POINT_FILES = ("points.ply", "points.npz")


class CustomReader:
    """Reads scenes in the layout of the module docstring.

    Args:
        root: the folder holding one sub-folder per scene (and optional classes.json, <split>.txt).
    """

    name = "custom"

    def __init__(self, root: Path):
        self.root = Path(root)
        classes_path = self.root / "classes.json"
        names: tuple[str, ...] = ()
        if classes_path.is_file():
            try:
                loaded = json.loads(classes_path.read_text())
            except (OSError, ValueError) as e:
                raise SceneReadError(f"{classes_path}: {e}") from e
            if not isinstance(loaded, list) or not all(isinstance(n, str) for n in loaded):
                raise SceneReadError(f"{classes_path}: expected a JSON list of class names")
            names = tuple(loaded)
        self._class_names = names

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    def scene_ids(self, split: str) -> list[str]:
        if split == "all":
            return sorted(check_scene_id(p.name) for p in self.root.iterdir()
                          if p.is_dir() and not p.name.startswith(".") and any((p / f).is_file() for f in POINT_FILES))
        path = self.root / f"{split}.txt"
        if not path.is_file():
            raise SceneReadError(f"{path}: no split list {split!r}; write one scene id a line, or use split 'all'")
        return [check_scene_id(line.strip()) for line in path.read_text().splitlines() if line.strip()]

    # -- points -----------------------------------------------------------------------------------

    def read_scene(self, scene_id: str) -> Scene:
        folder = self.root / check_scene_id(scene_id)
        if (folder / "points.ply").is_file():
            path = folder / "points.ply"
            arrays = _read_points_ply(path)
        elif (folder / "points.npz").is_file():
            path = folder / "points.npz"
            arrays = _read_points_npz(path)
        else:
            raise SceneReadError(f"{folder}: no points.ply or points.npz for scene {scene_id}")
        coord = arrays["coord"]
        if coord.ndim != 2 or coord.shape[1] != 3 or len(coord) == 0:
            raise SceneReadError(f"{path}: coord has shape {coord.shape}, expected (N, 3) with N > 0")
        if not np.isfinite(coord).all():
            raise SceneReadError(f"{path}: coord holds NaN or infinite values")
        n = len(coord)
        for key, shape in (("color", (n, 3)), ("normal", (n, 3)), ("label", (n,))):
            if key in arrays and arrays[key].shape != shape:
                raise SceneReadError(f"{path}: {key} has shape {arrays[key].shape}, expected {shape}")
        coord = coord.astype(np.float32)
        if "color" in arrays:
            color = arrays["color"]
            if color.size and (color.min() < 0 or color.max() > 255):
                raise SceneReadError(f"{path}: color outside 0..255 (min {color.min()}, max {color.max()})")
            color = np.rint(color).astype(np.uint8)
        else:
            color = np.zeros((n, 3), np.uint8)
        if "normal" in arrays:
            normal = arrays["normal"].astype(np.float64)
        else:
            from .normals import estimate_normals  # lazy: only scenes without normals need it

            normal = np.asarray(estimate_normals(coord), dtype=np.float64)
        length = np.linalg.norm(normal, axis=1, keepdims=True)
        normal = np.where(length > 1e-6, normal / np.maximum(length, 1e-6), 0).astype(np.float32)
        label = self._labels(arrays.get("label"), n, path)
        return Scene(scene_id, coord, color, normal, label)

    def _labels(self, raw: np.ndarray | None, n: int, path: Path) -> np.ndarray:
        if raw is None or not self._class_names:
            return np.full(n, IGNORE_LABEL, dtype=np.int16)
        if not np.issubdtype(raw.dtype, np.integer):
            raise SceneReadError(f"{path}: label has dtype {raw.dtype}, expected integers")
        raw = raw.astype(np.int64)
        num_classes = len(self._class_names)
        unlabelled = (raw < 0) | ((raw == 255) & (num_classes <= 255))
        too_large = ~unlabelled & (raw >= num_classes)
        if too_large.any():
            raise SceneReadError(f"{path}: label {raw[too_large][0]} but {self.root / 'classes.json'} lists "
                                 f"{num_classes} classes (use -1 or 255 for unlabelled)")
        return np.where(unlabelled, IGNORE_LABEL, raw).astype(np.int16)

    # -- views ------------------------------------------------------------------------------------

    def read_views(self, scene_id: str) -> ViewSet:
        folder = self.root / check_scene_id(scene_id)
        path = folder / "cameras.json"
        try:
            cameras = json.loads(path.read_text())
        except OSError as e:
            raise SceneReadError(f"{path}: {e}") from e
        except ValueError as e:
            raise SceneReadError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(cameras, dict) or not isinstance(cameras.get("frames"), list):
            raise SceneReadError(f"{path}: expected an object with a 'frames' list")
        depth_scale = cameras.get("depth_scale", 1000.0)
        if not isinstance(depth_scale, (int, float)) or not depth_scale > 0:
            raise SceneReadError(f"{path}: depth_scale must be a positive number (depth units per metre), got {depth_scale!r}")
        axes = cameras.get("axes", "opencv")
        if axes not in ("opencv", "opengl"):
            raise SceneReadError(f"{path}: axes must be 'opencv' or 'opengl', got {axes!r}")
        views, skipped, seen_ids = [], {}, set()

        def skip(reason: str) -> None:
            skipped[reason] = skipped.get(reason, 0) + 1

        for i, frame in enumerate(cameras["frames"]):
            where = f"{path}: frames[{i}]"
            if not isinstance(frame, dict):
                raise SceneReadError(f"{where}: expected an object")
            for key in ("image", "cam_to_world"):
                if key not in frame:
                    raise SceneReadError(f"{where}: missing key {key!r}")
            if "K" not in frame and "K" not in cameras:
                raise SceneReadError(f"{where}: missing key 'K' (and no top-level default 'K')")
            k = _matrix(frame.get("K", cameras.get("K")), (3, 3), f"{where}.K")
            pose = _matrix(frame["cam_to_world"], None, f"{where}.cam_to_world")
            if pose.shape == (3, 4):
                pose = np.vstack([pose, [0, 0, 0, 1]])
            if pose.shape != (4, 4):
                raise SceneReadError(f"{where}.cam_to_world: shape {pose.shape}, expected 4x4 or 3x4")
            depth_k = _matrix(frame["depth_K"], (3, 3), f"{where}.depth_K") if "depth_K" in frame else None
            view_id = Path(str(frame["image"])).stem
            if view_id in seen_ids:
                raise SceneReadError(f"{where}.image: a second image named {view_id!r}; image names must be unique")
            seen_ids.add(view_id)

            if not valid_pose(pose):
                skip("invalid pose")
                continue
            if axes == "opengl":  # y up, looking down -z -> y down, looking down +z
                pose = pose @ np.diag([1.0, -1.0, -1.0, 1.0])
            image_path = folder / str(frame["image"])
            size = _image_size(image_path)
            if size is None:
                skip("missing image")
                continue
            k_size = frame.get("K_size", cameras.get("K_size"))
            if k_size is not None:
                if not (isinstance(k_size, list) and len(k_size) == 2 and all(isinstance(s, int) and s > 0 for s in k_size)):
                    raise SceneReadError(f"{where}.K_size: expected [width, height], got {k_size!r}")
                camera = Camera(k, *k_size).resized(*size)
            else:
                camera = Camera(k, *size)
            depth_path, depth_camera = None, None
            if frame.get("depth") is not None:
                depth_path = folder / str(frame["depth"])
                depth_size = _image_size(depth_path)
                if depth_size is None:
                    skip("missing depth")
                    continue
                depth_camera = Camera(depth_k, *depth_size) if depth_k is not None else camera.resized(*depth_size)
            views.append(View(view_id=view_id, image_path=image_path, camera=camera, cam_to_world=pose,
                              depth_path=depth_path, depth_camera=depth_camera, depth_scale=float(depth_scale)))
        return ViewSet(views, skipped)


def _read_points_ply(path: Path) -> dict[str, np.ndarray]:
    try:
        vertices, _ = read_ply(path)
    except (OSError, PlyError, KeyError) as e:  # KeyError: a property type PLY does not define
        raise SceneReadError(f"{path}: {e}") from e
    names = set(vertices.dtype.names)
    if not {"x", "y", "z"} <= names:
        raise SceneReadError(f"{path}: vertex element has no x, y, z properties")
    arrays = {"coord": np.stack([vertices[a] for a in "xyz"], axis=1)}
    if {"red", "green", "blue"} <= names:
        arrays["color"] = np.stack([vertices[c] for c in ("red", "green", "blue")], axis=1)
    if {"nx", "ny", "nz"} <= names:
        arrays["normal"] = np.stack([vertices[a] for a in ("nx", "ny", "nz")], axis=1)
    if "label" in names:
        arrays["label"] = np.asarray(vertices["label"])
    return arrays


def _read_points_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("coord", "color", "normal", "label") if key in data.files}
    except (OSError, ValueError) as e:
        raise SceneReadError(f"{path}: {e}") from e
    if "coord" not in arrays:
        raise SceneReadError(f"{path}: missing key 'coord' (keys: coord, color, normal, label)")
    return arrays


def _matrix(value, shape: tuple[int, int] | None, where: str) -> np.ndarray:
    """A JSON nested list as a float64 matrix of `shape` (any 2-D shape when None)."""
    try:
        matrix = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SceneReadError(f"{where}: expected a matrix of numbers, got {value!r}") from None
    if matrix.ndim != 2 or (shape is not None and matrix.shape != shape):
        raise SceneReadError(f"{where}: shape {matrix.shape}, expected {shape or '2-D'}")
    if shape is not None and not np.isfinite(matrix).all():
        raise SceneReadError(f"{where}: holds NaN or infinite values")
    return matrix


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when it is missing or unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError:  # FileNotFoundError, or PIL's UnidentifiedImageError
        return None
