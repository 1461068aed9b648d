"""A2D2 reader under the xMUDA protocol (brief §6; paper §4.2, Table 2's source domain).

Layout read (`root` holds `camera_lidar_semantic/`, or is that folder):
    <seq>/camera/cam_front_center/<datetime>_camera_frontcenter_<frame>.png   1920x1208, distorted
    <seq>/lidar/cam_front_center/<datetime>_lidar_frontcenter_<frame>.npz     points (N, 3), row, col, ...
    <seq>/label/cam_front_center/<datetime>_label_frontcenter_<frame>.png     colour-coded classes
    class_list.json     hex colour -> class name (55 classes); in camera_lidar_semantic/ or root
    cams_lidars.json    sensor calibration; in camera_lidar_semantic/ or the folder above it
`<seq>` is a drive such as `20180810_142822`; `<datetime>` is the same 14 digits without `_`.

A scene is one sweep with the front-centre image it was mapped onto: scene id `<seq>_<frame>`,
e.g. `20180810_142822_000000091`. Sources: valeoai/xmuda `xmuda/data/a2d2/preprocess.py`,
`a2d2_dataloader.py` and `splits.py`; the A2D2 tutorial (a2d2.audi, "tutorial") for
cams_lidars.json and the undistortion.

Points: a `cam_front_center` lidar file holds only the points A2D2 mapped onto that camera, with
their pixel (`row`, `col`) in the undistorted image, so no crop applies. All of them are kept, in
the vehicle frame (`points_frame="vehicle"`, as the brief states; the A2D2 tutorial says the
points are in the camera's view frame, `points_frame="camera"`). Which one holds is checked: each
scene's points must project with the camera pose below to within FRAME_CHECK_RAD of their own
row/col (median angle), else the error says so and names the other option. A file without `row` (or
`col`) is not mapped onto the camera; xMUDA skips such sweeps: here the scene fails with that
reason, so a run's summary counts them. xyz only: `Scene.color` and `Scene.normal` are zero.

Labels: a point's class is the colour of the label image at its pixel, through class_list.json
and xMUDA's merge into the 10 classes shared with SemanticKITTI
(`data_manifests/a2d2/classes.json`). xMUDA undistorts the label image as it does the photo; here
the distorted source pixel of each point's (rounded) pixel is computed directly, the same as a
nearest-neighbour undistortion (xMUDA's bilinear one blends colours at class borders into
colours of no class, which it then ignores). Points on a colour of no class are ignored (-1),
counted, and reported with a warning naming the file, as xMUDA ignores them; points whose source
pixel falls outside the original image are ignored too.

Camera (cams_lidars.json, `cameras.front_center`): `CamMatrix` is K of the undistorted image,
`CamMatrixOriginal` and `Distortion` (k1, k2, p1, p2, k3; OpenCV's model, `Lens` "Telecam") those
of the file; `Resolution` is (width, height). `view` gives the camera's origin, x-axis and y-axis
in the vehicle frame (x along the optical axis, y left, z up; the y-axis is made orthogonal to x
as the tutorial does), turned into an OpenCV cam_to_world (x right, y down, z forward). The teacher
needs the undistorted image: it is written once, on first use, to
`<undistorted_dir>/<seq>/camera/cam_front_center/<name>.png` (xMUDA's preprocessing output has
this layout: point `undistorted_dir` at it to reuse its images). No depth image: the z-buffer test
applies (project.py).

Splits (`data_manifests/a2d2/splits.json`, xMUDA's): train 20 drives, test 20180807_145028, `all`;
a split's scenes are the camera frames on disk of those of its drives that exist (a split none of
whose drives exists is an error).
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .manifests import load_classes, manifest_dir
from .project import camera_to_pixel, world_to_camera
from .scene import IGNORE_LABEL, Camera, Scene, SceneReadError, View, ViewSet, check_scene_id

SCENES_DIR = "camera_lidar_semantic"
CAMERA = "front_center"
FOLDER = "cam_front_center"
FRAME_CHECK_RAD = 0.01
"""Median angle allowed between a sweep's projected points and their stored row/col (pixels over
the focal length; 17 px at A2D2's 1687 px). The camera sits 1.7 m ahead of and 0.9 m above the
vehicle origin, so the wrong frame moves a point 10 m away by about 0.09 rad."""
# A2D2 view axes (x forward, y left, z up) from OpenCV camera axes (x right, y down, z forward)
VIEW_FROM_OPENCV = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])

_SCENE_ID = re.compile(r"^(?P<seq>\d{8}_\d{6})_(?P<frame>\d+)$")
_CAMERA_FILE = re.compile(r"^(?P<datetime>\d{14})_camera_frontcenter_(?P<frame>\d+)\.png$")


@dataclass(frozen=True)
class FrontCamera:
    """The front-centre camera's calibration from cams_lidars.json."""

    intrinsics: np.ndarray
    """(3, 3) K of the undistorted image (`CamMatrix`)."""
    original_intrinsics: np.ndarray
    """(3, 3) K of the distorted image on disk (`CamMatrixOriginal`)."""
    distortion: np.ndarray
    """(5,) k1, k2, p1, p2, k3 of OpenCV's model."""
    width: int
    height: int
    view_to_vehicle: np.ndarray
    """(4, 4) the camera's view frame (x forward, y left, z up) -> vehicle frame."""

    @property
    def distorted(self) -> bool:
        return bool(self.distortion.any()) or not np.allclose(self.intrinsics, self.original_intrinsics)


def view_to_vehicle(view: dict) -> np.ndarray:
    """(4, 4) transform of an A2D2 `view` (origin, x-axis, y-axis in the vehicle frame) to the vehicle frame.
    The y-axis is projected orthogonal to the x-axis and z = x cross y, as the A2D2 tutorial does."""
    x_axis = np.asarray(view["x-axis"], dtype=np.float64)
    y_axis = np.asarray(view["y-axis"], dtype=np.float64)
    origin = np.asarray(view["origin"], dtype=np.float64)
    if x_axis.shape != (3,) or y_axis.shape != (3,) or origin.shape != (3,):
        raise ValueError("origin, x-axis and y-axis must be 3 numbers each")
    x_axis = x_axis / np.linalg.norm(x_axis)
    y_axis = y_axis - x_axis * np.dot(y_axis, x_axis)
    z_axis = np.cross(x_axis, y_axis)
    if not (np.linalg.norm(y_axis) > 1e-10 and np.isfinite(z_axis).all()):
        raise ValueError("x-axis and y-axis are parallel or zero")
    transform = np.eye(4)
    transform[:3, :3] = np.column_stack([x_axis, y_axis / np.linalg.norm(y_axis), z_axis / np.linalg.norm(z_axis)])
    transform[:3, 3] = origin
    return transform


def read_front_camera(path: Path) -> FrontCamera:
    """The front-centre camera of a cams_lidars.json; SceneReadError naming the file and key if bad."""
    try:
        camera = json.loads(path.read_text())["cameras"][CAMERA]
        lens = camera.get("Lens", "Telecam")
        if lens == "Fisheye":
            raise ValueError("a fisheye lens; only the pinhole ('Telecam') model of cam_front_center is supported")
        intrinsics = np.asarray(camera["CamMatrix"], dtype=np.float64)
        original = np.asarray(camera.get("CamMatrixOriginal", intrinsics), dtype=np.float64)
        distortion = np.asarray(camera.get("Distortion", [0.0] * 5), dtype=np.float64).reshape(-1)
        width, height = (int(v) for v in camera["Resolution"])
        to_vehicle = view_to_vehicle(camera["view"])
    except FileNotFoundError:
        raise SceneReadError(f"{path}: missing (A2D2's sensor calibration, beside camera_lidar_semantic/)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SceneReadError(f"{path}: cameras.{CAMERA}: {type(e).__name__}: {e}") from e
    for name, k in (("CamMatrix", intrinsics), ("CamMatrixOriginal", original)):
        if k.shape != (3, 3) or not np.isfinite(k).all() or not (k[0, 0] > 0 and k[1, 1] > 0):
            raise SceneReadError(f"{path}: cameras.{CAMERA}.{name} is no 3x3 camera matrix")
    if distortion.size > 5:
        raise SceneReadError(f"{path}: cameras.{CAMERA}.Distortion has {distortion.size} coefficients; "
                             "expected at most 5 (k1, k2, p1, p2, k3)")
    distortion = np.concatenate([distortion, np.zeros(5 - distortion.size)])
    return FrontCamera(intrinsics, original, distortion, width, height, to_vehicle)


def distorted_pixels(uv: np.ndarray, camera: FrontCamera) -> np.ndarray:
    """(N, 2) pixels of the undistorted image -> where they come from in the original (distorted) one.

    OpenCV's model, as cv2.undistort applies it: normalise with the undistorted K, distort
    radially (k1, k2, k3) and tangentially (p1, p2), project with the original K.
    """
    k_new, k_old = camera.intrinsics, camera.original_intrinsics
    k1, k2, p1, p2, k3 = camera.distortion
    y = (uv[:, 1] - k_new[1, 2]) / k_new[1, 1]
    x = (uv[:, 0] - k_new[0, 2] - k_new[0, 1] * y) / k_new[0, 0]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([k_old[0, 0] * xd + k_old[0, 1] * yd + k_old[0, 2], k_old[1, 1] * yd + k_old[1, 2]], axis=1)


def undistort_image(image: np.ndarray, camera: FrontCamera) -> np.ndarray:
    """(H, W, C) uint8 original image -> the undistorted one (bilinear; black where no source pixel)."""
    height, width = image.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    source = distorted_pixels(np.stack([cols.reshape(-1), rows.reshape(-1)], axis=1).astype(np.float64), camera)
    x, y = source[:, 0], source[:, 1]
    inside = (x >= 0) & (y >= 0) & (x <= width - 1) & (y <= height - 1)
    x0 = np.clip(np.floor(x), 0, width - 2).astype(np.int64)
    y0 = np.clip(np.floor(y), 0, height - 2).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    pixels = image.reshape(height * width, -1).astype(np.float32)
    at = lambda dy, dx: pixels[(y0 + dy) * width + x0 + dx]  # noqa: E731
    value = (at(0, 0) * (1 - fx) + at(0, 1) * fx) * (1 - fy) + (at(1, 0) * (1 - fx) + at(1, 1) * fx) * fy
    value[~inside] = 0
    return np.clip(np.rint(value), 0, 255).astype(np.uint8).reshape(image.shape)


def read_class_colours(path: Path, class_of_name: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted packed 0xRRGGBB colours, their class index) of a class_list.json; SceneReadError if bad."""
    try:
        colours = json.loads(path.read_text())
        packed = np.array([int(key.lstrip("#"), 16) for key in colours], dtype=np.int64)
    except FileNotFoundError:
        raise SceneReadError(f"{path}: missing (A2D2's colour -> class list, in camera_lidar_semantic/)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise SceneReadError(f"{path}: not a JSON map of '#rrggbb' colours to class names ({e})") from e
    unknown = [name for name in colours.values() if name not in class_of_name]
    if unknown:
        raise SceneReadError(f"{path}: class {unknown[0]!r} is neither merged nor ignored in "
                             "data_manifests/a2d2/classes.json; is this A2D2's class list?")
    classes = np.array([class_of_name[name] for name in colours.values()], dtype=np.int16)
    order = np.argsort(packed)
    return packed[order], classes[order]


class A2D2Reader:
    """Reads A2D2 front-centre sweeps with their image; see the module docstring for the layout.

    Args:
        root: the A2D2 root (holds `camera_lidar_semantic/`) or that folder itself.
        points_frame: "vehicle" or "camera": the frame the lidar files' points are in.
        undistorted_dir: where undistorted images are written on first use (default
            `<root>/undistorted`); must be writable and shared by Dask workers.
    """

    name = "a2d2"

    def __init__(self, root: Path, *, points_frame: str = "vehicle", undistorted_dir: Path | None = None):
        if points_frame not in ("vehicle", "camera"):
            raise ValueError(f"points_frame must be 'vehicle' or 'camera', got {points_frame!r}")
        self.root = Path(root)
        self.points_frame = points_frame
        self.undistorted_dir = Path(undistorted_dir) if undistorted_dir is not None else self.root / "undistorted"
        classes = load_classes("a2d2")
        self._class_names = tuple(classes["names"])
        self._class_of_name = {name: IGNORE_LABEL for name in classes["ignored_a2d2_classes"]}
        for index, merged in enumerate(self._class_names):
            self._class_of_name.update({name: index for name in classes["a2d2_classes"][merged]})
        self._splits = json.loads((manifest_dir("a2d2") / "splits.json").read_text())["sequences"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    @property
    def scenes_dir(self) -> Path:
        nested = self.root / SCENES_DIR
        return nested if nested.is_dir() else self.root

    def _config_file(self, name: str) -> Path:
        """`name` in camera_lidar_semantic/ or the folder above it (the first that has it)."""
        for folder in (self.scenes_dir, self.scenes_dir.parent):
            if (folder / name).is_file():
                return folder / name
        return self.scenes_dir / name

    def _camera(self) -> FrontCamera:
        return read_front_camera(self._config_file("cams_lidars.json"))

    def cam_to_world(self, camera: FrontCamera) -> np.ndarray:
        """(4, 4) OpenCV camera -> the frame of the points."""
        opencv_to_view = np.eye(4)
        opencv_to_view[:3, :3] = VIEW_FROM_OPENCV
        return opencv_to_view if self.points_frame == "camera" else camera.view_to_vehicle @ opencv_to_view

    def scene_ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise ValueError(f"unknown A2D2 split {split!r}; choose one of {', '.join(self._splits)}")
        folders = [self.scenes_dir / seq / "camera" / FOLDER for seq in self._splits[split]]
        if not any(folder.is_dir() for folder in folders):
            raise SceneReadError(f"{self.scenes_dir}: none of the {split!r} split's drives "
                                 f"{', '.join(self._splits[split])} has a camera/{FOLDER}/ folder")
        scene_ids = []
        for folder in filter(Path.is_dir, folders):
            frames = (_CAMERA_FILE.match(p.name) for p in sorted(folder.glob("*.png")))
            scene_ids += [check_scene_id(f"{folder.parents[1].name}_{m['frame']}") for m in frames if m]
        return scene_ids

    def _paths(self, scene_id: str) -> tuple[str, dict[str, Path]]:
        """(drive, {"camera", "lidar", "label"} paths) of a scene."""
        match = _SCENE_ID.match(check_scene_id(scene_id))
        if match is None:
            raise SceneReadError(f"{scene_id!r} is not an A2D2 scene id (<drive>_<frame>, "
                                 "e.g. 20180810_142822_000000091)")
        seq, frame = match["seq"], match["frame"]
        images = self.scenes_dir / seq / "camera" / FOLDER
        found = sorted(images.glob(f"*_camera_frontcenter_{frame}.png"))
        if len(found) != 1:
            raise SceneReadError(f"{images}: {len(found)} files *_camera_frontcenter_{frame}.png for scene {scene_id}, "
                                 "expected one")
        stamp = found[0].name[:14]
        return seq, {"camera": found[0],
                     "lidar": self.scenes_dir / seq / "lidar" / FOLDER / f"{stamp}_lidar_frontcenter_{frame}.npz",
                     "label": self.scenes_dir / seq / "label" / FOLDER / f"{stamp}_label_frontcenter_{frame}.png"}

    def read_scene(self, scene_id: str) -> Scene:
        _, paths = self._paths(scene_id)
        points, row, col = self._read_lidar(paths["lidar"])
        camera = self._camera()
        self._check_frame(points, row, col, camera, paths["lidar"])
        label = self._read_labels(paths["label"], row, col, camera)
        coord = np.ascontiguousarray(points, dtype=np.float32)
        zeros = np.zeros_like(coord)  # xyz only: no colour, normals unknown
        return Scene(scene_id, coord, zeros.astype(np.uint8), zeros, label)

    def _read_lidar(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as lidar:
                if "row" not in lidar.files or "col" not in lidar.files:
                    raise SceneReadError(f"{path}: no 'row'/'col' arrays, the sweep is not mapped onto the front "
                                         "camera (xMUDA skips such sweeps)")
                if "points" not in lidar.files:
                    raise SceneReadError(f"{path}: no 'points' array")
                points = lidar["points"].astype(np.float64)
                row, col = lidar["row"].astype(np.float64), lidar["col"].astype(np.float64)
        except SceneReadError:
            raise
        except (OSError, ValueError) as e:  # missing file, not a zip, pickled objects
            raise SceneReadError(f"{path}: {e}") from e
        n = len(points)
        if points.ndim != 2 or points.shape[1] != 3 or row.shape != (n,) or col.shape != (n,):
            raise SceneReadError(f"{path}: points {points.shape}, row {row.shape}, col {col.shape}; expected "
                                 "(N, 3), (N,), (N,)")
        if not (np.isfinite(points).all() and np.isfinite(row).all() and np.isfinite(col).all()):
            raise SceneReadError(f"{path}: non-finite points, row or col values")
        return points, row, col

    def _check_frame(self, points, row, col, camera: FrontCamera, path: Path) -> None:
        """SceneReadError if the points do not land on their own row/col: the wrong `points_frame`."""
        if len(points) == 0:
            return
        points_cam = world_to_camera(points, self.cam_to_world(camera))
        in_front = points_cam[:, 2] > 1e-6
        distance = np.full(len(points), np.inf)
        k = Camera(camera.intrinsics, camera.width, camera.height)
        uv = camera_to_pixel(points_cam[in_front], k)
        distance[in_front] = np.hypot((uv[:, 0] - col[in_front]) / k.intrinsics[0, 0],
                                      (uv[:, 1] - row[in_front]) / k.intrinsics[1, 1])
        median = float(np.median(distance))
        if median > FRAME_CHECK_RAD:
            other = "camera" if self.points_frame == "vehicle" else "vehicle"
            raise SceneReadError(f"{path}: its points land {median:.3f} rad (median) from their row/col through the "
                                 f"front camera of {self._config_file('cams_lidars.json')} with points_frame="
                                 f"'{self.points_frame}'; if the files hold points in the {other} frame, pass "
                                 f"points_frame='{other}'")

    def _read_labels(self, path: Path, row, col, camera: FrontCamera) -> np.ndarray:
        """(N,) int16: the merged class of each point's colour in the label image."""
        colours, classes = read_class_colours(self._config_file("class_list.json"), self._class_of_name)
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SceneReadError(f"{path}: cannot read the label image ({e})") from e
        if rgb.shape[:2] != (camera.height, camera.width):
            raise SceneReadError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} pixels, but cams_lidars.json gives the "
                                 f"front camera {camera.width}x{camera.height}")
        # the pixel of each point in the undistorted image (rounded half up, as the A2D2 tutorial does),
        # then the pixel of the original label image it comes from: a nearest-neighbour undistortion
        pixel = np.stack([np.clip(np.floor(col + 0.5), 0, camera.width - 1),
                          np.clip(np.floor(row + 0.5), 0, camera.height - 1)], axis=1)
        if camera.distorted:
            pixel = np.floor(distorted_pixels(pixel, camera) + 0.5)
        inside = (pixel[:, 0] >= 0) & (pixel[:, 0] < camera.width) & (pixel[:, 1] >= 0) & (pixel[:, 1] < camera.height)
        label = np.full(len(pixel), IGNORE_LABEL, dtype=np.int16)
        source = pixel[inside].astype(np.int64)
        colour = rgb[source[:, 1], source[:, 0]].astype(np.int64)
        packed = colour[:, 0] << 16 | colour[:, 1] << 8 | colour[:, 2]
        slot = np.minimum(np.searchsorted(colours, packed), len(colours) - 1)
        known = colours[slot] == packed
        label[np.flatnonzero(inside)[known]] = classes[slot[known]]
        if (~known).any():
            warnings.warn(f"{path}: {int((~known).sum())} of {len(label)} points on a colour that is not in "
                          "class_list.json: ignored", stacklevel=2)
        return label

    def read_views(self, scene_id: str) -> ViewSet:
        seq, paths = self._paths(scene_id)
        camera = self._camera()
        try:
            with Image.open(paths["camera"]) as image:
                size = image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SceneReadError(f"{paths['camera']}: cannot read the image header ({e})") from e
        if size != (camera.width, camera.height):
            raise SceneReadError(f"{paths['camera']}: {size[0]}x{size[1]} pixels, but cams_lidars.json gives the "
                                 f"front camera {camera.width}x{camera.height}")
        image_path = self._undistorted(paths["camera"], seq, camera) if camera.distorted else paths["camera"]
        view = View(view_id=paths["camera"].stem, image_path=image_path, cam_to_world=self.cam_to_world(camera),
                    camera=Camera(camera.intrinsics, camera.width, camera.height))
        return ViewSet([view], {})

    def _undistorted(self, source: Path, seq: str, camera: FrontCamera) -> Path:
        """The undistorted copy of `source`, written on first use (to a temporary name, then renamed,
        so a concurrent or interrupted writer never leaves a partial image under the final name)."""
        target = self.undistorted_dir / seq / "camera" / FOLDER / source.name
        if target.is_file():
            return target
        partial = target.with_name(f".{target.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}.png")
        try:
            with Image.open(source) as image:
                original = np.asarray(image.convert("RGB"))
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(undistort_image(original, camera)).save(partial, format="PNG")
            os.replace(partial, target)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SceneReadError(f"{target}: cannot write the undistorted copy of {source} ({e})") from e
        finally:
            partial.unlink(missing_ok=True)
        return target
