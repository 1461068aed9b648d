"""The embedded dataset: procedural indoor rooms with posed RGB-D views, in the ScanNet layout.

Each scene is a room (floor, four walls, ceiling) furnished with box-built objects of ScanNet
classes (cabinet, bed, chair, sofa, table, door, window, bookshelf, picture, desk, refrigerator).
Points are sampled on the visible surfaces; views are ray-cast from the same geometry with a
depth buffer, so the images and the points agree the way a real RGB-D scan does.

Two domains differ the way real datasets do, so that b is out of distribution for a model
trained on a: palette and lighting (images and points), sensor noise, point density and missing
normals (points only), and furniture proportions and layout (geometry).

Shift families (`FAMILIES`) take domain a's rooms (same seed: the same rooms) and change one group
of parameters to domain b's values: `appearance` (palette and lighting), `sensor` (point noise,
density, missing normals), `geometry` (furniture proportions and layout), and `all` (every group:
domain b's parameters on domain a's rooms). Each room draws its layout, paint, points, sensor noise
and camera poses from five independent random streams, so a family changes only what it names.
The values are fixed here, once, and written with every generated dataset to `synth.json`.

Written as ScanNet is (see `scannet.py`): `scans/<scene>/<scene>_vh_clean_2.ply` with colours and
normals, `_vh_clean_2.labels.ply` with nyu40 ids, `scannet_frames_25k/<scene>/{color,depth,pose}`,
`intrinsics_{color,depth}.txt`, and `scannetv2_{train,val}.txt` at the root. As with many real
25k-subset downloads, the colour intrinsics describe a 1296x968 sensor while the JPEGs are
640x480, and some scenes carry a frame whose pose is -inf.
"""

from __future__ import annotations

import colorsys
import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .ply import write_ply
from .scene import Camera

# nyu40 ids
WALL, FLOOR, CABINET, BED, CHAIR, SOFA, TABLE, DOOR, WINDOW, BOOKSHELF, PICTURE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
DESK, CEILING, REFRIGERATOR = 14, 22, 24

# base colours (RGB in [0, 1]) of the classes in domain a; domain b rotates their hues
PALETTE = {
    WALL: (0.82, 0.80, 0.74), FLOOR: (0.55, 0.40, 0.26), CEILING: (0.92, 0.92, 0.90),
    CABINET: (0.62, 0.45, 0.30), BED: (0.30, 0.42, 0.70), CHAIR: (0.70, 0.25, 0.20),
    SOFA: (0.35, 0.55, 0.35), TABLE: (0.50, 0.33, 0.18), DOOR: (0.45, 0.30, 0.20),
    WINDOW: (0.65, 0.82, 0.95), BOOKSHELF: (0.40, 0.28, 0.18), PICTURE: (0.85, 0.70, 0.20),
    DESK: (0.75, 0.72, 0.68), REFRIGERATOR: (0.90, 0.90, 0.93),
}
SENSOR_SIZE = (1296, 968)  # what intrinsics_color.txt describes
IMAGE_SIZE = (640, 480)    # what the JPEGs and depth PNGs are
SENSOR_INTRINSICS = np.array([[1170.0, 0, 647.5], [0, 1170.0, 483.5], [0, 0, 1]])


@dataclass(frozen=True)
class Domain:
    hue_shift: float
    """Rotation of every class colour's hue (palette change)."""
    light_rgb: tuple[float, float, float]
    light_intensity: float
    ambient: float
    coord_noise_m: float
    """Gaussian noise on point coordinates (depth-sensor noise)."""
    color_noise: float
    """Gaussian noise on point colours, in 0..255 units."""
    density_per_m2: float
    """Points sampled per square metre of visible surface."""
    proportions: tuple[float, float, float]
    """Scale of furniture footprint (x, y) and height (z)."""
    missing_normals: float = 0.0
    """Share of points written with a zero normal (a scanner that reports none for them)."""
    furniture_count: tuple[int, int] = (5, 9)
    """Free-standing objects per room: drawn from [lo, hi)."""
    room_size_m: tuple[float, float] = (4.0, 6.5)
    """Range of the room's floor sides."""
    wall_share: float = 0.5
    """Probability that a free-standing object is pushed against a wall."""


# which Domain fields each shift family changes
FAMILY_FIELDS = {
    "appearance": ("hue_shift", "light_rgb", "light_intensity", "ambient"),
    "sensor": ("coord_noise_m", "color_noise", "density_per_m2", "missing_normals"),
    "geometry": ("proportions", "furniture_count", "room_size_m", "wall_share"),
}
FAMILY_FIELDS["all"] = sum(FAMILY_FIELDS.values(), ())
FAMILIES = tuple(FAMILY_FIELDS)

_SOURCE = Domain(0.0, (1.0, 1.0, 1.0), 0.75, 0.35, 0.002, 3.0, 300.0, (1.0, 1.0, 1.0))
# fixed before any adaptation ran; never tune these to favour a method
_SHIFTED = Domain(0.45, (1.0, 0.82, 0.62), 0.55, 0.25, 0.015, 14.0, 150.0, (0.8, 0.8, 1.3),
                  missing_normals=0.3, furniture_count=(7, 11), room_size_m=(3.5, 5.5), wall_share=0.8)
DOMAINS = {"a": _SOURCE, "b": _SHIFTED} | {
    family: replace(_SOURCE, **{name: getattr(_SHIFTED, name) for name in names})
    for family, names in FAMILY_FIELDS.items()}
ROOMS_OF = {name: "b" if name == "b" else "a" for name in DOMAINS}
"""Whose rooms a domain furnishes: the families shift domain a's rooms; b has rooms of its own."""


@dataclass
class Box:
    lo: np.ndarray
    hi: np.ndarray
    nyu40: int
    color: np.ndarray
    texture: np.ndarray
    """(4,) frequency (x, y, z) in cycles per metre and phase of a sinusoidal texture."""
    inverted: bool = False
    """The room itself: seen from inside."""
    floor_color: np.ndarray | None = None
    ceiling_color: np.ndarray | None = None
    """The room's floor and ceiling colours (its walls take `color`)."""


def _furniture(kind: int, rng, scale) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Boxes (lo, hi, nyu40) of one object in its own frame: footprint from (0, 0), floor at z = 0."""
    sx, sy, sz = scale
    def box(x0, y0, z0, x1, y1, z1, label=kind):
        return np.array([x0 * sx, y0 * sy, z0 * sz]), np.array([x1 * sx, y1 * sy, z1 * sz]), label
    j = lambda lo, hi: rng.uniform(lo, hi)
    if kind == BED:
        w, l, h = j(1.3, 1.7), j(1.9, 2.1), j(0.4, 0.55)
        return [box(0, 0, 0, l, w, h), box(0, 0, h, 0.08, w, h + j(0.4, 0.7))]
    if kind == CHAIR:
        s, h = j(0.42, 0.5), j(0.42, 0.48)
        legs = [box(x, y, 0, x + 0.04, y + 0.04, h) for x in (0, s - 0.04) for y in (0, s - 0.04)]
        return legs + [box(0, 0, h, s, s, h + 0.05), box(0, 0, h + 0.05, 0.05, s, h + j(0.4, 0.5))]
    if kind == SOFA:
        d, w = j(0.8, 0.95), j(1.6, 2.2)
        return [box(0, 0, 0, d, w, 0.42), box(0, 0, 0.42, 0.22, w, j(0.8, 0.9)),
                box(0, 0, 0.42, d, 0.2, 0.62), box(0, w - 0.2, 0.42, d, w, 0.62)]
    if kind in (TABLE, DESK):
        l, w, h = (j(1.0, 1.6), j(0.7, 0.9), j(0.7, 0.76)) if kind == TABLE else (j(1.2, 1.5), j(0.6, 0.7), 0.74)
        legs = [box(x, y, 0, x + 0.05, y + 0.05, h - 0.04) for x in (0, l - 0.05) for y in (0, w - 0.05)]
        return legs + [box(0, 0, h - 0.04, l, w, h)]
    if kind == CABINET:
        return [box(0, 0, 0, j(0.45, 0.6), j(0.8, 1.4), j(0.8, 1.0))]
    if kind == BOOKSHELF:
        d, w, h = j(0.3, 0.4), j(0.8, 1.2), j(1.6, 2.0)
        shelves = [box(0, 0, z, d, w, z + 0.03) for z in np.arange(0.4, h - 0.2, 0.4)]
        return [box(0, 0, 0, d, 0.03, h), box(0, w - 0.03, 0, d, w, h), box(0, 0, 0, 0.03, w, h)] + shelves
    if kind == REFRIGERATOR:
        return [box(0, 0, 0, j(0.65, 0.75), j(0.65, 0.75), j(1.7, 1.9))]
    raise ValueError(kind)


FREE_STANDING = (BED, CHAIR, SOFA, TABLE, DESK, CABINET, BOOKSHELF, REFRIGERATOR, CHAIR, TABLE)


def build_room(rng: np.random.Generator, domain: Domain, paint: np.random.Generator | None = None) -> list[Box]:
    """A furnished room as a list of boxes; index 0 is the room shell. Colours and textures come
    from `paint` (default: `rng`), so a palette change leaves the layout alone."""
    paint = rng if paint is None else paint
    size = np.array([rng.uniform(*domain.room_size_m), rng.uniform(*domain.room_size_m), rng.uniform(2.5, 3.0)])

    def color(nyu40):
        h, s, v = colorsys.rgb_to_hsv(*PALETTE[nyu40])
        rgb = colorsys.hsv_to_rgb((h + domain.hue_shift) % 1.0, s, v)
        return np.clip(np.array(rgb) * paint.uniform(0.85, 1.15, 3), 0, 1)

    def texture():
        return np.array([*paint.uniform(-6, 6, 3), paint.uniform(0, 2 * np.pi)])

    boxes = [Box(np.zeros(3), size, WALL, color(WALL), texture(), inverted=True,
                 floor_color=color(FLOOR), ceiling_color=color(CEILING))]
    footprints = []  # (lo_xy, hi_xy) of placed furniture, to avoid overlaps

    def free(lo, hi, margin=0.1):
        return all(np.any(hi + margin <= flo) or np.any(lo >= fhi + margin) for flo, fhi in footprints)

    # wall-mounted: doors and windows, flush with the wall and 3 cm proud of it
    for kind, count in ((DOOR, 1), (WINDOW, int(rng.integers(1, 3))), (PICTURE, int(rng.integers(0, 3)))):
        for _ in range(count):
            wall_axis = int(rng.integers(0, 2))  # 0: wall at x = const, 1: at y = const
            at_far = bool(rng.integers(0, 2))
            along = 1 - wall_axis
            width = {DOOR: 0.9, WINDOW: rng.uniform(0.9, 1.5), PICTURE: rng.uniform(0.5, 1.0)}[kind]
            z0, z1 = {DOOR: (0.0, 2.05), WINDOW: (0.9, 2.1), PICTURE: (1.3, 1.3 + rng.uniform(0.4, 0.7))}[kind]
            start = rng.uniform(0.3, size[along] - width - 0.3)
            lo, hi = np.zeros(3), np.zeros(3)
            lo[along], hi[along] = start, start + width
            lo[wall_axis], hi[wall_axis] = (size[wall_axis] - 0.03, size[wall_axis]) if at_far else (0.0, 0.03)
            lo[2], hi[2] = z0, min(z1, size[2] - 0.05)
            boxes.append(Box(lo, hi, kind, color(kind), texture()))
            if kind == DOOR:  # keep the doorway clear
                footprints.append((lo[:2] - 0.6, hi[:2] + 0.6))

    kinds = rng.choice(FREE_STANDING, size=int(rng.integers(*domain.furniture_count)), replace=True)
    for kind in kinds:
        parts = _furniture(int(kind), rng, domain.proportions)
        extent = np.max([hi for _, hi, _ in parts], axis=0)
        for _ in range(30):  # rejection sampling of a free spot, against a wall half of the time
            rotate = bool(rng.integers(0, 2))
            ext = extent[[1, 0, 2]] if rotate else extent
            if ext[0] >= size[0] - 0.2 or ext[1] >= size[1] - 0.2:
                continue
            origin = np.array([rng.uniform(0.05, size[0] - ext[0] - 0.05), rng.uniform(0.05, size[1] - ext[1] - 0.05)])
            if rng.random() < domain.wall_share:
                axis = int(rng.integers(0, 2))
                origin[axis] = 0.02 if rng.random() < 0.5 else size[axis] - ext[axis] - 0.02
            if free(origin, origin + ext[:2]):
                break
        else:
            continue
        footprints.append((origin, origin + ext[:2]))
        obj_color, obj_texture = color(int(kind)), texture()
        for lo, hi, label in parts:
            if rotate:
                lo, hi = lo[[1, 0, 2]], hi[[1, 0, 2]]
            shift = np.array([origin[0], origin[1], 0.0])
            boxes.append(Box(lo + shift, hi + shift, label, obj_color, obj_texture))
    return boxes


def shade(boxes: list[Box], box_index: np.ndarray, position: np.ndarray, normal: np.ndarray, domain: Domain) -> np.ndarray:
    """Colour in [0, 1] of surface points: class colour x procedural texture x Lambert lighting.

    The same function colours the rendered images and the scanned points, as a real scan's point
    colours come from its images.
    """
    base = np.stack([boxes[i].color for i in range(len(boxes))])[box_index]
    tex = np.stack([boxes[i].texture for i in range(len(boxes))])[box_index]
    pattern = 0.88 + 0.12 * np.sin(2 * np.pi * np.sum(tex[:, :3] * position, axis=1) + tex[:, 3])
    shell = box_index == 0
    floor = shell & (normal[:, 2] > 0.5)
    base = np.where(floor[:, None], boxes[0].floor_color, base)
    base = np.where((shell & (normal[:, 2] < -0.5))[:, None], boxes[0].ceiling_color, base)
    tiles = (np.floor(position[:, 0] / 0.5) + np.floor(position[:, 1] / 0.5)) % 2
    pattern = np.where(floor, 0.8 + 0.2 * tiles, pattern)
    light_dir = np.array([0.3, 0.5, -1.0]) / np.linalg.norm([0.3, 0.5, -1.0])
    diffuse = np.clip(-(normal @ light_dir), 0, 1)
    light = domain.ambient + domain.light_intensity * (0.35 + 0.65 * diffuse)
    return np.clip(base * pattern[:, None] * light[:, None] * np.array(domain.light_rgb), 0, 1)


def shell_labels(normal: np.ndarray) -> np.ndarray:
    """nyu40 label of the room shell by the direction its surface faces (it is seen from inside)."""
    return np.where(normal[:, 2] > 0.5, FLOOR, np.where(normal[:, 2] < -0.5, CEILING, WALL))


def sample_points(boxes: list[Box], rng: np.random.Generator, domain: Domain):
    """Points on the visible faces of all boxes: (coord, normal, box index), hidden ones removed."""
    coords, normals, owners = [], [], []
    for index, box in enumerate(boxes):
        size = box.hi - box.lo
        for axis in range(3):
            for side in (0, 1):
                u, v = [a for a in range(3) if a != axis]
                area = size[u] * size[v]
                count = rng.poisson(area * domain.density_per_m2)
                if count == 0:
                    continue
                p = box.lo + rng.random((count, 3)) * size
                p[:, axis] = box.hi[axis] if side else box.lo[axis]
                n = np.zeros((count, 3))
                n[:, axis] = 1.0 if side else -1.0
                if box.inverted:
                    n = -n
                coords.append(p), normals.append(n), owners.append(np.full(count, index))
    coord, normal, owner = np.concatenate(coords), np.concatenate(normals), np.concatenate(owners)
    hidden = np.zeros(len(coord), dtype=bool)
    probe = coord + 0.005 * normal  # just off the surface, on its visible side
    for index, box in enumerate(boxes[1:], start=1):
        hidden |= np.all((probe > box.lo) & (probe < box.hi), axis=1)
    shell = boxes[0]
    hidden |= ~np.all((probe > shell.lo) & (probe < shell.hi), axis=1)  # faces outside the room
    keep = ~hidden
    return coord[keep], normal[keep], owner[keep]


def ray_cast(boxes: list[Box], origin: np.ndarray, directions: np.ndarray):
    """Nearest hit of rays (origin + t * directions) against the boxes -> (t, box index, normal).

    The slab test, one axis at a time on contiguous (P,) rows: reducing (P, 3) arrays along
    axis 1 is several times slower in numpy.
    """
    d = np.ascontiguousarray(directions.T, dtype=np.float32)  # (3, P)
    inv = 1.0 / np.where(np.abs(d) < 1e-9, np.float32(1e-9), d)
    count = d.shape[1]
    best_t = np.full(count, np.inf, dtype=np.float32)
    best_box = np.full(count, -1)
    best_axis = np.zeros(count, dtype=np.int64)
    for index, box in enumerate(boxes):
        t_min, t_max = [], []
        for axis in range(3):
            t1 = (box.lo[axis] - origin[axis]) * inv[axis]
            t2 = (box.hi[axis] - origin[axis]) * inv[axis]
            t_min.append(np.minimum(t1, t2)), t_max.append(np.maximum(t1, t2))
        t_near = np.maximum(np.maximum(t_min[0], t_min[1]), t_min[2])
        t_far = np.minimum(np.minimum(t_max[0], t_max[1]), t_max[2])
        t, faces = (t_far, t_max) if box.inverted else (t_near, t_min)  # from inside: the exit face
        closer = (t > 1e-6) & (t_near <= t_far) & (t < best_t)
        if not closer.any():
            continue
        best_t[closer], best_box[closer] = t[closer], index
        best_axis[closer] = np.where(faces[0][closer] == t[closer], 0, np.where(faces[1][closer] == t[closer], 1, 2))
    normal = np.zeros((count, 3))
    rows = np.arange(count)
    normal[rows, best_axis] = -np.sign(d[best_axis, rows])  # faces the camera
    return best_t.astype(np.float64), best_box, normal


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """4x4 camera-to-world of an OpenCV camera (x right, y down, z forward) at `position`, looking at `target`."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = position
    return pose


def render(boxes: list[Box], pose: np.ndarray, camera: Camera, domain: Domain):
    """RGB (H, W, 3) uint8 and z-depth (H, W) metres of the room seen from `pose`."""
    u, v = np.meshgrid(np.arange(camera.width), np.arange(camera.height))
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    rays_cam = pixels @ np.linalg.inv(camera.intrinsics).T  # z = 1: t below is the z-depth
    directions = rays_cam @ pose[:3, :3].T
    t, box_index, normal = ray_cast(boxes, pose[:3, 3], directions)
    position = pose[:3, 3] + t[:, None] * directions
    rgb = shade(boxes, np.maximum(box_index, 0), position, normal, domain)
    image = (rgb * 255).round().astype(np.uint8).reshape(camera.height, camera.width, 3)
    return image, np.where(np.isfinite(t), t, 0).reshape(camera.height, camera.width)


def camera_poses(boxes: list[Box], rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Poses at head height in free space, each looking across the room."""
    size = boxes[0].hi
    poses = []
    while len(poses) < count:
        position = np.array([rng.uniform(0.6, size[0] - 0.6), rng.uniform(0.6, size[1] - 0.6), rng.uniform(1.2, 1.7)])
        if any(np.all((position > b.lo - 0.3) & (position < b.hi + 0.3)) for b in boxes[1:]):
            continue
        target = np.array([rng.uniform(0.2, size[0] - 0.2), rng.uniform(0.2, size[1] - 0.2), rng.uniform(0.3, 1.0)])
        if np.linalg.norm((target - position)[:2]) < 1.5:
            continue
        poses.append(look_at(position, target))
    return poses


@dataclass
class Room:
    """One generated room before it is written: its geometry, its points (clean and as the sensor
    reports them) and its camera poses."""

    boxes: list[Box]
    clean_coord: np.ndarray  # (N, 3) on the surfaces
    coord: np.ndarray        # (N, 3) with the domain's sensor noise
    normal: np.ndarray
    nyu40: np.ndarray
    color: np.ndarray        # (N, 3) uint8
    poses: list[np.ndarray]
    camera: Camera           # of the written colour and depth images


def make_room(rng: np.random.Generator, domain: Domain, views: int) -> Room:
    # independent streams: a family that changes one of them leaves the others' draws identical
    layout, paint, points, sensor, cameras = rng.spawn(5)
    boxes = build_room(layout, domain, paint)
    clean, normal, owner = sample_points(boxes, points, domain)
    nyu40 = np.array([b.nyu40 for b in boxes])[owner]
    nyu40 = np.where(owner == 0, shell_labels(normal), nyu40)
    color = shade(boxes, owner, clean, normal, domain) * 255
    color = np.clip(color + sensor.normal(0, domain.color_noise, color.shape), 0, 255).round().astype(np.uint8)
    coord = clean + sensor.normal(0, domain.coord_noise_m, clean.shape)
    normal = np.where((sensor.random(len(clean)) < domain.missing_normals)[:, None], 0.0, normal)
    camera = Camera(SENSOR_INTRINSICS, *SENSOR_SIZE).resized(*IMAGE_SIZE)
    return Room(boxes, clean, coord, normal, nyu40, color, camera_poses(boxes, cameras, views), camera)


def visible_from(room: Room, pose: np.ndarray) -> np.ndarray:
    """(N,) bool: exact visibility of each clean surface point from the camera at `pose` (nothing
    between the camera centre and the point), ignoring the image bounds."""
    origin = pose[:3, 3]
    t, _, _ = ray_cast(room.boxes, origin, room.clean_coord - origin)  # t = 1 at the point itself
    return t > 1 - 1e-3


def write_scene(root: Path, scene_id: str, *, domain: Domain, rng: np.random.Generator, views: int,
                invalid_pose: bool, image_size: tuple[int, int] = IMAGE_SIZE, depth_size: tuple[int, int] | None = None,
                points: int | None = None) -> int:
    """Generate one scene under `root` in the ScanNet layout; return its number of points.

    `image_size` (colour JPEGs), `depth_size` (depth PNGs, default: the colour size) and `points`
    (about this many points, instead of the domain's density) make ScanNet-sized scenes for
    `tttkd bench extract`: 1296x968 colour, 640x480 depth, ~150k points. Frames are ray-cast at the
    depth size and the colour image is resized from that render (only its size matters there)."""
    if points is not None:  # the density that puts about `points` on the room's faces (a few are hidden)
        probe = make_room(copy.deepcopy(rng), domain, 0)  # the same room at the domain's density
        domain = replace(domain, density_per_m2=domain.density_per_m2 * points / max(1, len(probe.coord)))
    room = make_room(rng, domain, views)
    coord, normal, nyu40, color = room.coord, room.normal, room.nyu40, room.color
    camera = Camera(SENSOR_INTRINSICS, *SENSOR_SIZE).resized(*(depth_size or image_size))

    scan = root / "scans" / scene_id
    scan.mkdir(parents=True, exist_ok=True)
    vertex = np.empty(len(coord), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("nx", "f4"), ("ny", "f4"),
                                         ("nz", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")])
    for i, a in enumerate("xyz"):
        vertex[a], vertex["n" + a] = coord[:, i], normal[:, i]
    vertex["red"], vertex["green"], vertex["blue"], vertex["alpha"] = *color.T, 255
    write_ply(scan / f"{scene_id}_vh_clean_2.ply", vertex)
    labels = np.empty(len(coord), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("label", "u2")])
    labels["x"], labels["y"], labels["z"], labels["label"] = *coord.T, nyu40
    write_ply(scan / f"{scene_id}_vh_clean_2.labels.ply", labels)

    frames = root / "scannet_frames_25k" / scene_id
    for sub in ("color", "depth", "pose"):
        (frames / sub).mkdir(parents=True, exist_ok=True)
    sensor = np.eye(4)
    sensor[:3, :3] = SENSOR_INTRINSICS
    np.savetxt(frames / "intrinsics_color.txt", sensor, fmt="%.6f")
    depth_k = np.eye(4)
    depth_k[:3, :3] = camera.intrinsics
    np.savetxt(frames / "intrinsics_depth.txt", depth_k, fmt="%.6f")
    for index, pose in enumerate(room.poses):
        image, depth = render(room.boxes, pose, camera, domain)
        frame = f"{index * 100:06d}"  # the 25k subset keeps every 100th frame
        colour = Image.fromarray(image)
        if colour.size != tuple(image_size):
            colour = colour.resize(tuple(image_size), Image.BILINEAR)
        colour.save(frames / "color" / f"{frame}.jpg", quality=90)
        Image.fromarray((depth * 1000).round().astype(np.uint16)).save(frames / "depth" / f"{frame}.png")
        if invalid_pose and index == views - 1:
            pose = np.full((4, 4), -np.inf)  # lost tracking, as in real ScanNet frames
        np.savetxt(frames / "pose" / f"{frame}.txt", pose, fmt="%.6f")
    return len(coord)


def generate(out: Path, *, domain: str, scenes: int, seed: int, views: int = 8, val_fraction: float = 0.25,
             progress=None, image_size: tuple[int, int] = IMAGE_SIZE, depth_size: tuple[int, int] | None = None,
             points: int | None = None) -> list[str]:
    """Write `scenes` rooms of `domain` (a, b or a shift family) under `out`; deterministic for
    (`seed`, `domain`). A family furnishes the rooms domain a has for the same seed. The domain's
    parameters go to `out/synth.json`."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synth.json").write_text(json.dumps(
        {"domain": domain, "rooms_of": ROOMS_OF[domain], "seed": seed, "scenes": scenes, "views": views,
         "changed": list(FAMILY_FIELDS.get(domain, ())), "parameters": asdict(DOMAINS[domain])}, indent=1))
    ids = [f"scene{i:04d}_00" for i in range(scenes)]
    for i, scene_id in enumerate(ids):
        rng = np.random.default_rng([seed, ord(ROOMS_OF[domain]), i])  # per scene: any subset regenerates identically
        write_scene(out, scene_id, domain=DOMAINS[domain], rng=rng, views=views, invalid_pose=(i % 3 == 2),
                    image_size=image_size, depth_size=depth_size, points=points)  # sizes: see write_scene
        if progress is not None:
            progress(scene_id)
    num_val = int(round(scenes * val_fraction)) if scenes > 1 else 0
    (out / "scannetv2_train.txt").write_text("".join(s + "\n" for s in ids[: scenes - num_val]))
    (out / "scannetv2_val.txt").write_text("".join(s + "\n" for s in ids[scenes - num_val:]))
    return ids
