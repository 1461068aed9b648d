"""In-memory rooms for tests that need a scene without a cache: box rooms with furniture, surface
points with colours, normals, labels and unit 'teacher' features."""

from __future__ import annotations

import numpy as np
import torch

from tttkd.adapt import TargetScene
from tttkd.augment import PointSet


def room_points(points: int, *, seed: int = 0, size_m: float = 6.0):
    """(coord (N, 3), normal (N, 3), label (N,)): floor, four walls and eight boxes, 2.5 m high."""
    rng = np.random.default_rng(seed)
    surfaces = []  # (origin, u, v, normal, label)
    h = 2.5
    surfaces.append(((0, 0, 0), (size_m, 0, 0), (0, size_m, 0), (0, 0, 1), 1))
    for origin, u, normal in (((0, 0, 0), (size_m, 0, 0), (0, 1, 0)), ((0, size_m, 0), (size_m, 0, 0), (0, -1, 0)),
                              ((0, 0, 0), (0, size_m, 0), (1, 0, 0)), ((size_m, 0, 0), (0, size_m, 0), (-1, 0, 0))):
        surfaces.append((origin, u, (0, 0, h), normal, 0))
    for k in range(8):
        x, y = rng.uniform(0.5, size_m - 1.5, 2)
        w, d, z = rng.uniform(0.4, 1.2, 3)
        label = 2 + k % 5
        surfaces.append(((x, y, z), (w, 0, 0), (0, d, 0), (0, 0, 1), label))
        surfaces.append(((x, y, 0), (w, 0, 0), (0, 0, z), (0, -1, 0), label))
        surfaces.append(((x, y, 0), (0, d, 0), (0, 0, z), (-1, 0, 0), label))
    area = np.array([np.linalg.norm(np.cross(u, v)) for _, u, v, _, _ in surfaces])
    which = rng.choice(len(surfaces), size=points, p=area / area.sum())
    st = rng.random((points, 2))
    origin, u, v, normal, label = (np.array([s[i] for s in surfaces], dtype=np.float32) for i in range(5))
    coord = origin[which] + st[:, :1] * u[which] + st[:, 1:] * v[which]
    return coord.astype(np.float32), normal[which], label[which].astype(np.int64)


def room_scene(points: int = 60_000, *, kd_dim: int = 16, seed: int = 0, device="cpu",
               scene_id: str = "room") -> TargetScene:
    """A TargetScene whose 'teacher' features are a smooth function of position and class, so a
    network can fit them; about two thirds of the points are seen."""
    rng = np.random.default_rng(seed + 1)
    coord, normal, label = room_points(points, seed=seed)
    color = (rng.random((points, 3)) * 64 + 96 + 40 * label[:, None] % 255).astype(np.float32)
    seen = np.flatnonzero(rng.random(points) < 0.66)
    seen = rng.permutation(seen)
    seen_row = np.full(points, -1, np.int64)
    seen_row[seen] = np.arange(len(seen))
    basis = np.random.default_rng(seed + 2).normal(size=(3 + 8, kd_dim)).astype(np.float32)
    one_hot = np.eye(8, dtype=np.float32)[label[seen] % 8]
    feature = np.concatenate([np.sin(coord[seen]), one_hot], 1) @ basis
    feature /= np.linalg.norm(feature, axis=1, keepdims=True)
    point_set = PointSet(coord=coord, color=color, normal=normal, label=label, seen_row=seen_row,
                         source=np.zeros(points, np.int64))
    return TargetScene(scene_id, point_set, seen.astype(np.int64), torch.from_numpy(feature).to(device))
