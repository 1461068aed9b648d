"""Stage 1 of the data path: the typed values every dataset reader returns.

A `Scene` is the 3D side of the paper's input tuple (X, F, Y) of §3.1: points, their colours and
normals (the 6 input channels indoors) and per-point labels. A `View` is one posed image of the
scene (an element of I with its camera, from which U is computed by projection). Readers differ;
these types do not, so projection, the teachers and the cache never see a dataset's file layout.

Conventions: world coordinates in metres; cameras in the OpenCV frame (x right, y down, z forward);
intrinsics map camera coordinates to pixel coordinates in which integer values are pixel centres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

IGNORE_LABEL = -1


class SceneReadError(ValueError):
    """A scene's files are missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Scene:
    """The points of one scan."""

    scene_id: str
    coord: np.ndarray
    """(N, 3) float32, metres, world frame."""
    color: np.ndarray
    """(N, 3) uint8 RGB."""
    normal: np.ndarray
    """(N, 3) float32, unit length, zero where unknown."""
    label: np.ndarray
    """(N,) int16 class index into the reader's class list, IGNORE_LABEL where unlabelled."""

    def __post_init__(self):
        n = len(self.coord)
        assert self.coord.shape == (n, 3) and self.color.shape == (n, 3), "coord/color must be (N, 3)"
        assert self.normal.shape == (n, 3) and self.label.shape == (n,), "normal (N, 3), label (N,)"

    @property
    def num_points(self) -> int:
        return len(self.coord)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera for an image of `width` x `height` pixels."""

    intrinsics: np.ndarray
    """(3, 3) K; pixel centres at integer coordinates."""
    width: int
    height: int

    def resized(self, width: int, height: int) -> Camera:
        """The same camera for the image resampled to `width` x `height` pixels.

        With pixel centres at integers, a pixel coordinate u maps to (u + 0.5) * s - 0.5.
        """
        sx, sy = width / self.width, height / self.height
        k = self.intrinsics.astype(np.float64).copy()
        k[0, 0] *= sx
        k[1, 1] *= sy
        k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
        return Camera(k, width, height)

    def cropped(self, width: int, height: int) -> Camera:
        """The camera of the top-left `width` x `height` crop of the image (K unchanged)."""
        assert width <= self.width and height <= self.height
        return Camera(self.intrinsics, width, height)


@dataclass(frozen=True)
class View:
    """One posed image of a scene, with its depth image when the sensor recorded one."""

    view_id: str
    image_path: Path
    camera: Camera
    """Intrinsics at the image file's actual size."""
    cam_to_world: np.ndarray
    """(4, 4) camera-to-world rigid transform."""
    depth_path: Path | None = None
    depth_camera: Camera | None = None
    depth_scale: float = 1000.0
    """Stored depth units per metre (ScanNet: millimetres)."""


@dataclass(frozen=True)
class ViewSet:
    """The usable views of a scene and how many were skipped, by reason."""

    views: list[View]
    skipped: dict[str, int] = field(default_factory=dict)


class DatasetReader(Protocol):
    """What every dataset reader provides. Readers are cheap to construct and picklable."""

    name: str
    root: Path

    @property
    def class_names(self) -> tuple[str, ...]: ...

    def scene_ids(self, split: str) -> list[str]: ...

    def read_scene(self, scene_id: str) -> Scene: ...

    def read_views(self, scene_id: str) -> ViewSet: ...


def check_scene_id(scene_id: str) -> str:
    """Return `scene_id` if it is safe as a file name and a Zarr group name, else raise ValueError.

    Scene ids come from split files and the command line and end up in paths: no separators, no
    leading dot, no `..`.
    """
    ok = bool(scene_id) and scene_id[0] != "." and all(c.isalnum() or c in "_-." for c in scene_id)
    if not ok:
        raise ValueError(f"invalid scene id {scene_id!r}: use letters, digits, '_', '-' and '.' only")
    return scene_id
