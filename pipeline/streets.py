"""The embedded outdoor dataset: procedural streets seen by a front camera and a simulated LiDAR,
written in the SemanticKITTI layout (the outdoor shift of paper §4.2 in miniature).

Each frame is one straight street: a two-lane road with a dashed centre line, parking strips,
raised sidewalks, front yards of terrain, rows of buildings, and the things of a street built from
axis-aligned boxes: parked and moving cars, trucks, parked bicycles and cyclists, pedestrians,
trees (trunk and crown) and bushes, street lights, traffic signs, fences and bins. The ground is
the plane z = 0, labelled by where a ray meets it (road, lane marking, parking, terrain).

Both sensors ray-cast the same geometry (the slab test of `synth.py`, restricted per box to the
rays whose azimuth can reach it, since all rays of a sensor share one origin):
  - the camera renders an RGB image (class colour x texture x sun and sky light), so the image and
    the points agree the way a calibrated camera-LiDAR pair does;
  - the LiDAR fires `beams` rings at evenly spaced elevations between `fov_up_deg` and
    `fov_down_deg`, one column every `horizontal_resolution_deg`, tilted by its mount's pitch; each
    return gets Gaussian range noise, a remission from its class and incidence angle, and a
    fraction of returns drops out.

The two domains differ only in the LiDAR, as A2D2 and SemanticKITTI do under the xMUDA protocol
(the images of both come from this one renderer and one camera mount):
  - "source" (A2D2-like): a sparse 16-beam sensor (+15..-15 deg, 0.2 deg columns, 3 cm noise)
    mounted low at the front of the car (1.25 m, pitched 5 deg down);
  - "target" (SemanticKITTI-like): an HDL-64E (64 beams, +2..-24.8 deg, 0.17 deg columns, 2 cm
    noise) on the roof at 1.73 m, level.
Beam elevations are evenly spaced (the real HDL-64E's two laser blocks are not): the density and
field-of-view shift is what matters here.

Layout (each domain its own root; SemanticKITTI's reader takes splits from sequence numbers):
    <root>/sequences/<seq>/velodyne/<frame>.bin   float32 (N, 4): x, y, z, remission in [0, 1]
    <root>/sequences/<seq>/labels/<frame>.label   uint32 (N,): SemanticKITTI raw id in the low 16 bits
    <root>/sequences/<seq>/image_2/<frame>.png    RGB, the camera-2 image
    <root>/sequences/<seq>/calib.txt              P0..P3 and Tr, 12 numbers each (3x4, row-major)
Frames go to sequence 00 (train), 07 (val) and 08 (test), the xMUDA split of SemanticKITTI; each
frame is its own street, so there is no poses.txt, and labels carry no instance ids (upper 16 bits 0).
Points are in the LiDAR frame: origin at the sensor, x forward, y left, z up, level with the road
(as A2D2's points are in the vehicle frame; the mount's pitch tilts the beams, not the frame).
Tr maps it to the rectified camera-0 frame and P2 = K [I | t2] projects from there into image_2
(camera 2 sits 6 cm left of camera 0, as in KITTI): pixel ~ P2 @ Tr @ [x, y, z, 1], with integer
pixel coordinates at pixel centres. Deterministic for (seed, domain, frame).
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scene import Camera

# SemanticKITTI raw ids (semantic-kitti.yaml)
CAR, BICYCLE, TRUCK, PERSON, BICYCLIST = 10, 11, 18, 30, 31
ROAD, PARKING, SIDEWALK, BUILDING, FENCE, LANE_MARKING = 40, 44, 48, 50, 51, 60
VEGETATION, TRUNK, TERRAIN, POLE, TRAFFIC_SIGN, OTHER_OBJECT = 70, 71, 72, 80, 81, 99

# base colour (RGB in [0, 1]) and LiDAR reflectivity of each class; cars, trucks and bicycles take
# a random saturated paint instead of their base colour
MATERIAL = {
    ROAD: ((0.30, 0.30, 0.32), 0.20), LANE_MARKING: ((0.92, 0.92, 0.90), 0.75),
    PARKING: ((0.42, 0.40, 0.40), 0.22), SIDEWALK: ((0.62, 0.60, 0.56), 0.30),
    TERRAIN: ((0.45, 0.55, 0.25), 0.35), BUILDING: ((0.72, 0.62, 0.50), 0.30),
    VEGETATION: ((0.18, 0.45, 0.16), 0.40), TRUNK: ((0.35, 0.24, 0.15), 0.35),
    FENCE: ((0.55, 0.50, 0.42), 0.30), POLE: ((0.50, 0.52, 0.55), 0.45),
    TRAFFIC_SIGN: ((0.85, 0.85, 0.88), 0.95), OTHER_OBJECT: ((0.25, 0.35, 0.28), 0.25),
    PERSON: ((0.35, 0.30, 0.45), 0.25), BICYCLIST: ((0.60, 0.20, 0.35), 0.25),
    CAR: ((0.70, 0.10, 0.10), 0.55), TRUCK: ((0.85, 0.85, 0.82), 0.55), BICYCLE: ((0.10, 0.30, 0.70), 0.45),
}
PAINTED = (CAR, TRUCK, BICYCLE)
REFLECTIVITY = np.array([MATERIAL[i][1] if i in MATERIAL else 0.0 for i in range(100)])
"""Reflectivity by raw id, for a vectorised look-up."""
SKY_HORIZON, SKY_ZENITH = np.array([0.80, 0.86, 0.92]), np.array([0.35, 0.55, 0.85])
SUN = np.array([0.4, -0.3, 0.87]) / np.linalg.norm([0.4, -0.3, 0.87])  # direction towards the sun

# KITTI's colour camera (image_2 of sequence 00): 1242 x 375 pixels, f = 721.5 px
KITTI_SIZE = (1242, 375)
KITTI_INTRINSICS = np.array([[721.5377, 0.0, 609.5593], [0.0, 721.5377, 172.854], [0.0, 0.0, 1.0]])
CAMERA_OFFSETS_M = (0.0, -0.54, 0.06, -0.48)
"""x of cameras 0..3 relative to camera 0 in its own frame as P's 4th column stores it (t = K^-1 P[:, 3]):
camera 2 is 6 cm left of camera 0 (t_x = +0.06), cameras 1 and 3 are the right-hand pair."""
SEQUENCES = {"train": "00", "val": "07", "test": "08"}
GROUND = -2  # hit index of the ground plane; -1: no hit


@dataclass(frozen=True)
class Lidar:
    beams: int
    fov_up_deg: float
    """Elevation of the top beam above the sensor's horizontal plane."""
    fov_down_deg: float
    """Elevation of the bottom beam (negative: below)."""
    horizontal_resolution_deg: float
    """Azimuth step between columns."""
    range_noise_m: float
    """Standard deviation of the Gaussian noise on each return's range."""
    max_range_m: float
    min_range_m: float = 2.5
    """Returns nearer than this are dropped (the car itself)."""
    dropout: float = 0.02
    """Fraction of returns lost (dark or specular surfaces)."""
    horizontal_fov_deg: float = 360.0
    """Azimuth range swept, centred on forward (360: a full sweep as the real .bin files hold)."""

    def elevations_deg(self) -> np.ndarray:
        return np.linspace(self.fov_up_deg, self.fov_down_deg, self.beams)


@dataclass(frozen=True)
class Mount:
    """Where a sensor sits on the car: ground below the car's reference point is the origin."""

    x_m: float
    height_m: float
    pitch_down_deg: float = 0.0


@dataclass(frozen=True)
class Domain:
    lidar: Lidar
    lidar_mount: Mount
    camera_mount: Mount = Mount(0.27, 1.65)
    """Camera 0 of KITTI: 27 cm ahead of the Velodyne, at 1.65 m, level; the same in both domains."""


HDL64E = Lidar(64, 2.0, -24.8, 0.17, 0.02, 120.0)
VLP16 = Lidar(16, 15.0, -15.0, 0.2, 0.03, 100.0)
DOMAINS = {
    "source": Domain(VLP16, Mount(1.2, 1.25, 5.0)),
    "target": Domain(HDL64E, Mount(0.0, 1.73)),
}


@dataclass
class Street:
    """One street before it is sensed: boxes (with their class, colour and texture) and the
    layout of the ground. World frame: the car's reference point on the road, x forward, y left."""

    lo: np.ndarray        # (B, 3)
    hi: np.ndarray        # (B, 3)
    label: np.ndarray     # (B,) SemanticKITTI raw id
    color: np.ndarray     # (B, 3) in [0, 1]
    texture: np.ndarray   # (B, 4) frequency (x, y, z) in cycles per metre and phase
    road: tuple[float, float]
    """y of the road's right and left edges."""
    centre_line: float
    parking: list[tuple[int, float, float]]
    """(side, x0, x1): parking strips; side -1 right of the road, +1 left."""
    parking_width: tuple[float, float]
    """Width of the parking strip on the right and left side (0: none)."""

    def ground_label(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Raw id of the ground plane at (x, y): road, lane marking, parking or terrain."""
        right, left = self.road
        label = np.where((y >= right) & (y <= left), ROAD, TERRAIN)
        dash = (np.abs(y - self.centre_line) < 0.08) & (np.mod(x, 6.0) < 3.0)
        label = np.where(dash, LANE_MARKING, label)
        for side, x0, x1 in self.parking:
            edge, width = (right, self.parking_width[0]) if side < 0 else (left, self.parking_width[1])
            inside = (x >= x0) & (x <= x1) & (np.abs(y - edge) <= width) & (np.sign(y - edge) == side)
            label = np.where(inside, PARKING, label)
        return label


def build_street(rng: np.random.Generator) -> Street:
    """A random street from x = -30 m to 110 m; the ego car stands in the right lane at the origin."""
    x_start, x_end = -30.0, 110.0
    boxes: list[tuple] = []  # (lo, hi, label, colour, texture)

    def texture():
        return np.array([*rng.uniform(-2, 2, 3), rng.uniform(0, 2 * np.pi)])

    def paint(label):
        if label in PAINTED:
            rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 0.9), rng.uniform(0.45, 0.9))
        else:
            rgb = np.array(MATERIAL[label][0]) * rng.uniform(0.9, 1.1, 3)
        return np.clip(rgb, 0, 1)

    def add(lo, hi, label, color=None, tex=None):
        boxes.append((np.array(lo, float), np.array(hi, float), label,
                      paint(label) if color is None else color, texture() if tex is None else tex))

    lane = rng.uniform(3.2, 3.7)
    right, left = -lane / 2, 1.5 * lane  # two lanes; the ego lane is centred on y = 0
    # per side (index 0: right, y < 0; 1: left): parking strip, sidewalk and front yard widths
    park_w = [rng.uniform(2.1, 2.5) if rng.random() < 0.6 else 0.0 for _ in range(2)]
    walk_w = [rng.uniform(1.8, 4.0) for _ in range(2)]
    yard_w = [rng.uniform(1.0, 6.0) if rng.random() < 0.5 else 0.0 for _ in range(2)]
    parking = []
    for s, side in enumerate((-1, 1)):
        edge = right if side < 0 else left

        def y_span(d0, d1):  # distances d0 < d1 from the road edge -> (y_lo, y_hi) on this side
            a, b = edge + side * d0, edge + side * d1
            return min(a, b), max(a, b)

        # parking strips along x; elsewhere the strip is raised sidewalk
        x = x_start
        while park_w[s] and x < x_end:
            length = rng.uniform(6, 25)
            if rng.random() < 0.65:
                parking.append((side, x, min(x + length, x_end)))
            else:
                y0, y1 = y_span(0, park_w[s])
                add((x, y0, 0), (min(x + length, x_end), y1, 0.12), SIDEWALK)
            x += length
        curb = park_w[s]
        y0, y1 = y_span(curb, curb + walk_w[s])
        add((x_start, y0, 0), (x_end, y1, 0.12), SIDEWALK)
        setback = curb + walk_w[s] + yard_w[s]

        # buildings in a row with gaps; a gap shows terrain and vegetation behind
        x = x_start + rng.uniform(-10, 5)
        while x < x_end:
            width = rng.uniform(8, 30)
            if rng.random() < 0.8:
                y0, y1 = y_span(setback, setback + rng.uniform(8, 15))
                add((x, y0, 0), (x + width, y1, rng.uniform(5, 20)), BUILDING)
            else:
                for _ in range(int(rng.integers(1, 4))):
                    bx, d = x + rng.uniform(0, width - 3), setback + rng.uniform(0.5, 6)
                    y0, y1 = y_span(d, d + rng.uniform(1.5, 4))
                    add((bx, y0, 0), (bx + rng.uniform(1.5, 4), y1, rng.uniform(0.8, 3)), VEGETATION)
            x += width + (rng.uniform(2, 8) if rng.random() < 0.4 else 0.0)

        # the yard: bushes and a fence along the sidewalk in some stretches
        if yard_w[s]:
            x = x_start
            while x < x_end:
                length = rng.uniform(5, 20)
                kind = rng.random()
                if kind < 0.35:
                    y0, y1 = y_span(curb + walk_w[s] + 0.1, curb + walk_w[s] + 0.15)
                    add((x, y0, 0), (min(x + length, x_end), y1, rng.uniform(0.9, 1.6)), FENCE)
                elif kind < 0.6:
                    d = curb + walk_w[s] + rng.uniform(0.3, max(0.4, yard_w[s] - 1.0))
                    y0, y1 = y_span(d, min(d + rng.uniform(0.8, 2.0), setback - 0.1))
                    add((x, y0, 0), (x + rng.uniform(1, 3), y1, rng.uniform(0.5, 1.4)), VEGETATION)
                x += length

        # street furniture near the curb: trees, street lights, signs, bins
        x = x_start + rng.uniform(0, 8)
        while x < x_end:
            d = curb + 0.5
            kind = rng.random()
            if kind < 0.4:  # tree: trunk and crown
                trunk_h, crown = rng.uniform(2.2, 3.5), rng.uniform(2.0, 4.0)
                y0, y1 = y_span(d, d + 0.3)
                add((x, y0, 0.12), (x + 0.3, y1, trunk_h), TRUNK)
                yc = (y0 + y1) / 2
                add((x + 0.15 - crown / 2, yc - crown / 2, trunk_h), (x + 0.15 + crown / 2, yc + crown / 2,
                                                                       trunk_h + rng.uniform(2, 4)), VEGETATION)
            elif kind < 0.6:  # street light
                y0, y1 = y_span(d, d + 0.18)
                add((x, y0, 0.12), (x + 0.18, y1, rng.uniform(6, 8)), POLE)
            elif kind < 0.8:  # traffic sign: pole and a plate facing the traffic
                height = rng.uniform(2.2, 2.8)
                y0, y1 = y_span(d, d + 0.08)
                add((x, y0, 0.12), (x + 0.08, y1, height), POLE)
                y0, y1 = y_span(d - 0.25, d + 0.35)
                add((x - 0.03, y0, height), (x + 0.02, y1, height + rng.uniform(0.5, 0.8)), TRAFFIC_SIGN)
            else:  # bin
                y0, y1 = y_span(d, d + 0.6)
                add((x, y0, 0.12), (x + 0.6, y1, 1.1), OTHER_OBJECT)
            x += rng.uniform(5, 15)

        # on the sidewalk: pedestrians and parked bicycles
        x = x_start + rng.uniform(0, 10)
        while x < x_end:
            d = curb + rng.uniform(1.0, max(1.1, walk_w[s] - 0.5))
            if rng.random() < 0.6:
                _person(add, x, edge + side * d, 0.12, rng, PERSON)
            else:
                y0, y1 = y_span(d, d + 0.08)
                add((x, y0, 0.12), (x + 1.7, y1, 1.1), BICYCLE)
            x += rng.uniform(4, 20)

        # parked cars in the parking strips
        for strip_side, x0, x1 in parking:
            if strip_side != side:
                continue
            x = x0 + rng.uniform(0.3, 2.0)
            while x + 4.8 < x1:
                length = _vehicle(add, x, edge + side * park_w[s] / 2, rng, CAR if rng.random() < 0.9 else TRUCK)
                x += length + rng.uniform(0.5, 3.0)

    # moving traffic: the ego lane (y = 0) keeps clear of the ego car, the other lane is free
    for centre, keep_clear in ((0.0, True), (lane, False)):
        x = x_start + rng.uniform(0, 15)
        while x < x_end - 10:
            kind = rng.random()
            if keep_clear and -17 < x < 6:  # a vehicle starting here could reach the ego car
                x = 6 + rng.uniform(2, 10)
                continue
            if kind < 0.12:  # cyclist near the right edge of the lane
                y = centre - lane / 2 + 0.6
                add((x, y - 0.05, 0), (x + 1.7, y + 0.05, 1.0), BICYCLE)
                _person(add, x + 0.6, y, 0.7, rng, BICYCLIST)
                x += 1.7 + rng.uniform(8, 30)
            else:
                x += _vehicle(add, x, centre, rng, TRUCK if kind > 0.88 else CAR) + rng.uniform(6, 40)

    lo, hi, label, color, tex = (np.array(v) for v in zip(*boxes))
    return Street(lo, hi, label.astype(np.int64), color, tex, (right, left), lane / 2,
                  parking, (park_w[0], park_w[1]))


def _vehicle(add, x, y_centre, rng, kind) -> float:
    """Boxes of a car (wheels, body, cabin) or a truck (cab, cargo box) from x along +x; its length."""
    tex = np.array([*rng.uniform(-2, 2, 3), rng.uniform(0, 2 * np.pi)])
    if kind == CAR:
        length, width = rng.uniform(3.9, 4.8), rng.uniform(1.7, 1.9)
        color = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 0.9), rng.uniform(0.45, 0.9)))
        y0, y1 = y_centre - width / 2, y_centre + width / 2
        for wx in (x + 0.6, x + length - 1.25):  # wheels, set in from the body's sides
            add((wx, y0 + 0.05, 0), (wx + 0.65, y1 - 0.05, 0.35), CAR, np.array([0.08, 0.08, 0.08]), tex)
        add((x, y0, 0.3), (x + length, y1, 0.95), CAR, color, tex)
        cabin = (x + length * rng.uniform(0.25, 0.35), x + length * rng.uniform(0.7, 0.8))
        add((cabin[0], y0 + 0.1, 0.95), (cabin[1], y1 - 0.1, rng.uniform(1.4, 1.55)), CAR, color, tex)
        return length
    length, width, height = rng.uniform(6.5, 10), rng.uniform(2.3, 2.55), rng.uniform(3.0, 3.8)
    color = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.6, 0.95)))
    y0, y1 = y_centre - width / 2, y_centre + width / 2
    add((x, y0, 0.0), (x + length - 2.2, y1, height), TRUCK, color, tex)          # cargo box
    add((x + length - 2.0, y0, 0.0), (x + length, y1, height * 0.8), TRUCK, color, tex)  # cab, facing +x
    return length


def _person(add, x, y, z, rng, kind):
    """Legs, torso and head of a pedestrian (or a cyclist's rider, standing at height z)."""
    height, tex = rng.uniform(1.55, 1.9), np.array([*rng.uniform(-2, 2, 3), 0.0])
    color = np.clip(np.array(MATERIAL[kind][0]) * rng.uniform(0.6, 1.4, 3), 0, 1)
    legs = 0.0 if kind == BICYCLIST else 0.47 * height  # a rider's legs are part of the bicycle's box
    top = z + (0.55 * height if kind == BICYCLIST else height)
    if legs:
        add((x, y - 0.18, z), (x + 0.3, y + 0.18, z + legs), kind, color, tex)
    add((x - 0.02, y - 0.22, z + legs), (x + 0.32, y + 0.22, top - 0.22), kind, color, tex)
    add((x + 0.05, y - 0.1, top - 0.22), (x + 0.25, y + 0.1, top), kind, np.array([0.85, 0.7, 0.6]), tex)


def ray_cast(street: Street, origin: np.ndarray, directions: np.ndarray, max_range: float = np.inf):
    """Nearest hit of rays origin + t * directions (unit or not) with the boxes and the ground.

    Returns (t (P,), hit (P,) box index, GROUND or -1 for none, normal (P, 3) facing the ray).
    All rays share `origin`, so a box can only be hit by rays whose azimuth lies within the
    angle its footprint spans as seen from the origin: each box tests only that window of the
    rays, sorted by azimuth once, which makes a 360-degree sweep cost about as much as one box row.
    """
    directions = np.asarray(directions, dtype=np.float64)
    count = len(directions)
    norm = np.linalg.norm(directions, axis=1)
    best_t = np.full(count, np.inf)
    hit = np.full(count, -1)
    axis_hit = np.full(count, 2)
    # the ground plane z = 0 (the origin is above it)
    down = directions[:, 2] < -1e-12
    t_ground = np.where(down, -origin[2] / np.where(down, directions[:, 2], -1.0), np.inf)
    ground = down & (t_ground * norm <= max_range)
    best_t[ground], hit[ground] = t_ground[ground], GROUND

    azimuth = np.arctan2(directions[:, 1], directions[:, 0])
    order = np.argsort(azimuth, kind="stable")
    sorted_azimuth = azimuth[order]
    for index in range(len(street.lo)):
        lo, hi = street.lo[index], street.hi[index]
        for rays in _rays_towards(lo, hi, origin, order, sorted_azimuth):
            d = directions[rays]
            with np.errstate(divide="ignore", invalid="ignore"):
                t1 = (lo - origin) / d
                t2 = (hi - origin) / d
            t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
            # a zero direction component: the ray runs inside the slab or misses it entirely
            flat = d == 0
            outside = flat & ((origin < lo) | (origin > hi))
            t_min = np.where(flat, np.where(outside, np.inf, -np.inf), t_min)
            t_max = np.where(flat, np.where(outside, -np.inf, np.inf), t_max)
            t_near, t_far = t_min.max(axis=1), t_max.min(axis=1)
            closer = (t_near > 1e-9) & (t_near <= t_far) & (t_near < best_t[rays])
            if closer.any():
                chosen = rays[closer]
                best_t[chosen], hit[chosen] = t_near[closer], index
                axis_hit[chosen] = np.argmax(t_min[closer], axis=1)
    normal = np.zeros((count, 3))
    rows = np.arange(count)
    normal[rows, axis_hit] = -np.sign(directions[rows, axis_hit])  # faces the ray
    normal[hit == GROUND] = (0.0, 0.0, 1.0)
    far = best_t * norm > max_range
    best_t[far], hit[far] = np.inf, -1
    return best_t, hit, normal


def _rays_towards(lo, hi, origin, order, sorted_azimuth) -> list[np.ndarray]:
    """Indices of the rays whose azimuth falls within the box footprint's angular span from origin."""
    if lo[0] <= origin[0] <= hi[0] and lo[1] <= origin[1] <= hi[1]:
        return [order]  # above or inside the footprint: any azimuth can reach it
    corners = np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]], [hi[0], hi[1]]]) - origin[:2]
    centre = np.arctan2(*corners.mean(axis=0)[::-1])
    offsets = np.angle(np.exp(1j * (np.arctan2(corners[:, 1], corners[:, 0]) - centre)))  # wrapped to (-pi, pi]
    start, stop = centre + offsets.min() - 1e-9, centre + offsets.max() + 1e-9
    windows = [(start, stop)]
    if start < -np.pi:  # the span crosses the -x axis: split it at +-pi
        windows = [(-np.pi, stop), (start + 2 * np.pi, np.pi)]
    elif stop > np.pi:
        windows = [(start, np.pi), (-np.pi, stop - 2 * np.pi)]
    return [order[np.searchsorted(sorted_azimuth, a, "left"):np.searchsorted(sorted_azimuth, b, "right")]
            for a, b in windows]


def surface_label(street: Street, hit: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Raw id of each hit surface; -1 where nothing was hit."""
    label = np.where(hit >= 0, street.label[np.maximum(hit, 0)], -1)
    on_ground = hit == GROUND
    label[on_ground] = street.ground_label(position[on_ground, 0], position[on_ground, 1])
    return label


def shade(street: Street, hit: np.ndarray, position: np.ndarray, normal: np.ndarray,
          directions: np.ndarray) -> np.ndarray:
    """Colour in [0, 1] of what each camera ray sees: surface colour x texture x sun and sky light,
    or the sky where it hits nothing."""
    label = surface_label(street, hit, position)
    box = np.maximum(hit, 0)
    base = street.color[box]
    pattern = 0.9 + 0.1 * np.sin(2 * np.pi * np.sum(street.texture[box, :3] * position, axis=1) + street.texture[box, 3])
    on_ground = hit == GROUND
    ground_colors = {k: np.array(MATERIAL[k][0]) for k in (ROAD, LANE_MARKING, PARKING, TERRAIN)}
    for kind, rgb in ground_colors.items():
        base = np.where((on_ground & (label == kind))[:, None], rgb, base)
    # asphalt and grass grain: a fine deterministic pattern on the ground
    grain = 0.92 + 0.08 * np.sin(7.3 * position[:, 0]) * np.sin(5.1 * position[:, 1])
    pattern = np.where(on_ground, grain, pattern)
    light = 0.45 + 0.6 * np.clip(normal @ SUN, 0, 1)
    rgb = base * (pattern * light)[:, None]
    elevation = directions[:, 2] / np.linalg.norm(directions, axis=1)
    sky = SKY_HORIZON + np.clip(elevation, 0, 1)[:, None] * (SKY_ZENITH - SKY_HORIZON) * 3
    return np.clip(np.where((hit == -1)[:, None], sky, rgb), 0, 1)


def _mount_position(mount: Mount) -> np.ndarray:
    return np.array([mount.x_m, 0.0, mount.height_m])


def lidar_directions(lidar: Lidar, pitch_down_deg: float) -> np.ndarray:
    """(beams * columns, 3) unit ray directions in the level frame, ring-major (top ring first)."""
    elevation = np.radians(lidar.elevations_deg())
    half = np.radians(lidar.horizontal_fov_deg) / 2
    columns = int(round(lidar.horizontal_fov_deg / lidar.horizontal_resolution_deg))
    azimuth = -half + np.arange(columns) * np.radians(lidar.horizontal_resolution_deg)  # from the right
    e, a = np.meshgrid(elevation, azimuth, indexing="ij")
    rays = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)
    return rays @ _pitch(pitch_down_deg).T


def _pitch(pitch_down_deg: float) -> np.ndarray:
    """Rotation about y that tilts the forward axis down by `pitch_down_deg`."""
    p = np.radians(pitch_down_deg)
    return np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])


@dataclass
class Sweep:
    """One LiDAR sweep in the LiDAR frame (origin at the sensor, level)."""

    points: np.ndarray     # (N, 3) float32, with range noise
    remission: np.ndarray  # (N,) float32 in [0, 1]
    label: np.ndarray      # (N,) SemanticKITTI raw id


def scan(street: Street, lidar: Lidar, mount: Mount, rng: np.random.Generator) -> Sweep:
    """Fire every beam of `lidar` at `mount` into the street; keep the returns within range."""
    origin = _mount_position(mount)
    directions = lidar_directions(lidar, mount.pitch_down_deg)
    t, hit, normal = ray_cast(street, origin, directions, lidar.max_range_m)
    keep = (hit != -1) & (t >= lidar.min_range_m) & (rng.random(len(t)) >= lidar.dropout)
    t, hit, normal, directions = t[keep], hit[keep], normal[keep], directions[keep]
    position = origin + t[:, None] * directions
    label = surface_label(street, hit, position)
    reflectivity = REFLECTIVITY[label]
    incidence = np.abs(np.sum(normal * directions, axis=1))
    remission = np.clip(reflectivity * (0.4 + 0.6 * incidence) + rng.normal(0, 0.02, len(t)), 0, 1)
    measured = t + rng.normal(0, lidar.range_noise_m, len(t))  # noise along the beam
    points = measured[:, None] * directions  # relative to the sensor
    return Sweep(points.astype(np.float32), remission.astype(np.float32), label)


@dataclass(frozen=True)
class Calibration:
    """The KITTI calibration of one domain's rig."""

    camera: Camera
    """Camera 2's intrinsics at the written image size."""
    projections: tuple[np.ndarray, ...]
    """P0..P3, (3, 4) each."""
    velo_to_cam0: np.ndarray
    """Tr, (4, 4): LiDAR frame -> rectified camera-0 frame."""

    def cam2_to_velo(self) -> np.ndarray:
        """(4, 4) pose of camera 2 in the LiDAR frame (its camera-to-world with the LiDAR frame as world)."""
        shift = np.eye(4)
        shift[:3, 3] = np.linalg.solve(self.camera.intrinsics, self.projections[2][:, 3])
        return np.linalg.inv(shift @ self.velo_to_cam0)

    def text(self) -> str:
        rows = [(f"P{i}", p) for i, p in enumerate(self.projections)] + [("Tr", self.velo_to_cam0[:3])]
        return "".join(f"{name}: " + " ".join(f"{v:.12e}" for v in m.ravel()) + "\n" for name, m in rows)


def calibration(domain: Domain, image_scale: float = 1.0) -> Calibration:
    width, height = (int(round(s * image_scale)) for s in KITTI_SIZE)
    camera = Camera(KITTI_INTRINSICS, *KITTI_SIZE).resized(width, height)
    k = camera.intrinsics
    projections = tuple(np.concatenate([k, k @ np.array([[x], [0.0], [0.0]])], axis=1) for x in CAMERA_OFFSETS_M)
    # level LiDAR axes (x forward, y left, z up) -> camera axes (x right, y down, z forward)
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    rotation = axes @ _pitch(domain.camera_mount.pitch_down_deg).T
    offset = _mount_position(domain.camera_mount) - _mount_position(domain.lidar_mount)  # camera 0 in the LiDAR frame
    tr = np.eye(4)
    tr[:3, :3], tr[:3, 3] = rotation, -rotation @ offset
    return Calibration(camera, projections, tr)


def render(street: Street, domain: Domain, calib: Calibration):
    """Camera 2's RGB image (H, W, 3) uint8 and the raw id seen at each pixel (H, W), -1 for sky."""
    camera = calib.camera
    u, v = np.meshgrid(np.arange(camera.width), np.arange(camera.height))
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    pose = calib.cam2_to_velo()
    directions = pixels @ np.linalg.inv(camera.intrinsics).T @ pose[:3, :3].T
    origin = pose[:3, 3] + _mount_position(domain.lidar_mount)  # LiDAR frame -> street frame
    t, hit, normal = ray_cast(street, origin, directions)
    position = origin + np.where(np.isfinite(t), t, 0)[:, None] * directions
    rgb = shade(street, hit, position, normal, directions)
    image = (rgb * 255).round().astype(np.uint8).reshape(camera.height, camera.width, 3)
    return image, surface_label(street, hit, position).reshape(camera.height, camera.width)


def write_frame(sequence_dir: Path, frame: str, *, domain: Domain, calib: Calibration,
                rng: np.random.Generator) -> int:
    """Generate one street and write its sweep, labels and image; return the number of points."""
    street = build_street(rng)
    sweep = scan(street, domain.lidar, domain.lidar_mount, rng)
    image, _ = render(street, domain, calib)
    for sub in ("velodyne", "labels", "image_2"):
        (sequence_dir / sub).mkdir(parents=True, exist_ok=True)
    data = np.concatenate([sweep.points, sweep.remission[:, None]], axis=1).astype("<f4")
    (sequence_dir / "velodyne" / f"{frame}.bin").write_bytes(data.tobytes())
    # the upper 16 bits hold the instance id in SemanticKITTI; 0 here (no instances)
    (sequence_dir / "labels" / f"{frame}.label").write_bytes(sweep.label.astype("<u4").tobytes())
    Image.fromarray(image).save(sequence_dir / "image_2" / f"{frame}.png")
    return len(data)


def split_counts(scenes: int, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, int]:
    """How many of `scenes` frames go to each split; val and test get one each from 3 frames on."""
    val = max(int(round(scenes * val_fraction)), 1) if scenes >= 3 else 0
    test = max(int(round(scenes * test_fraction)), 1) if scenes >= 3 else (1 if scenes == 2 else 0)
    return {"train": scenes - val - test, "val": val, "test": test}


def generate(out: Path, *, domain: str, scenes: int, seed: int, image_scale: float = 1.0,
             progress=None, frames: Iterable[int] | None = None) -> list[str]:
    """Write `scenes` streets of `domain` under `out` in the SemanticKITTI layout.

    Returns the written frames as "<sequence>/<frame>". Deterministic for (seed, domain): each
    frame draws from its own generator, so any subset regenerates identically; `frames` (indices in
    0..scenes-1, in split order train, val, test) writes only those, so processes can share the work.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown outdoor domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if scenes < 1:
        raise ValueError(f"--scenes must be at least 1, got {scenes}")
    rig = DOMAINS[domain]
    calib = calibration(rig, image_scale)
    out = Path(out)
    wanted = None if frames is None else set(frames)
    written, index = [], 0
    for split, count in split_counts(scenes).items():
        sequence_dir = out / "sequences" / SEQUENCES[split]
        if count:
            sequence_dir.mkdir(parents=True, exist_ok=True)
            (sequence_dir / "calib.txt").write_text(calib.text())
        for frame_number in range(count):
            if wanted is not None and index not in wanted:
                index += 1
                continue
            frame = f"{frame_number:06d}"
            rng = np.random.default_rng([seed, sum(map(ord, domain)), index])
            write_frame(sequence_dir, frame, domain=rig, calib=calib, rng=rng)
            written.append(f"{SEQUENCES[split]}/{frame}")
            index += 1
            if progress is not None:
                progress(written[-1])
    return written
