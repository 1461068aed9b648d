"""The paper's training augmentations (§4.1, the same for every dataset), each a pure function
of a `PointSet` and a numpy Generator, each switchable in `AugmentConfig`.

Geometric ones move `coord` (and rotate `normal` with it); cropping drops points and keeps every
per-point array, labels and cache rows aligned because all of them live in the same PointSet.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class PointSet:
    coord: np.ndarray     # (N, 3) float32 metres
    color: np.ndarray     # (N, 3) float32, 0..255
    normal: np.ndarray    # (N, 3) float32
    label: np.ndarray     # (N,) int64, -1 = ignore
    seen_row: np.ndarray  # (N,) int64 row of the point in its scene's cached features, -1 if unseen
    source: np.ndarray    # (N,) int64 which scene of a Mix3D pair the point comes from (0 or 1)

    def take(self, index: np.ndarray) -> PointSet:
        return PointSet(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(a: PointSet, b: PointSet) -> PointSet:
        return PointSet(**{f.name: np.concatenate([getattr(a, f.name), getattr(b, f.name)]) for f in fields(a)})

    def __len__(self) -> int:
        return len(self.coord)


@dataclass(frozen=True)
class AugmentConfig:
    mirror: bool = True
    """Flip x and y, each with p = 0.5."""
    rotate: bool = True
    """Uniform rotation about the up (z) axis."""
    scale: tuple[float, float] | None = (0.9, 1.1)
    elastic: tuple[tuple[float, float], ...] | None = ((0.2, 0.4), (0.8, 1.6))
    """(granularity m, magnitude m) pairs of elastic distortion (Pointcept's ScanNet values)."""
    jitter_m: tuple[float, float] | None = (0.005, 0.02)
    """(sigma, clip) of Gaussian coordinate jitter."""
    crop: tuple[float, float] | None = (0.8, 1.0)
    """Random crop: keep an axis-aligned x/y box covering this fraction range of the scene's extent."""
    translate_m: float | None = 0.2
    brightness: float | None = 0.1
    """Additive brightness, a fraction of 255."""
    contrast: tuple[float, float] | None = (0.8, 1.2)
    rgb_shift: float | None = 0.05
    """Per-channel additive shift, a fraction of 255."""
    mix3d_p: float = 0.5
    """Probability of overlaying a second scene (Mix3D)."""


OUTDOOR_AUGMENTATION = AugmentConfig(elastic=None, jitter_m=None, crop=None, brightness=None, contrast=None,
                                     rgb_shift=None, mix3d_p=0.0)
"""LiDAR sweeps as xMUDA augments them (A2D2SCN / SemanticKITTISCN: flip_y 0.5, rot_z 2π, noisy_rot
0.1, transl): flips, a rotation about up, a random scale (in place of noisy_rot's random linear
map) and a translation; no elastic distortion, crop, colour or Mix3D. Elastic distortion at
Pointcept's indoor granularity would also cost ~0.75 s a sample on a 100 m street (8M noise cells)."""

NO_AUGMENTATION = AugmentConfig(mirror=False, rotate=False, scale=None, elastic=None, jitter_m=None, crop=None,
                                translate_m=None, brightness=None, contrast=None, rgb_shift=None, mix3d_p=0.0)


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)


def mirror(p: PointSet, rng) -> PointSet:
    flip = np.where(rng.random(3) < 0.5, -1.0, 1.0).astype(np.float32)
    flip[2] = 1.0
    return replace(p, coord=p.coord * flip, normal=p.normal * flip)


def rotate(p: PointSet, rng, angle: float | None = None) -> PointSet:
    r = rotation_z(rng.uniform(0, 2 * np.pi) if angle is None else angle)
    return replace(p, coord=p.coord @ r.T, normal=p.normal @ r.T)


def scale(p: PointSet, rng, low_high) -> PointSet:
    return replace(p, coord=p.coord * np.float32(rng.uniform(*low_high)))


def _smooth_noise(rng, dims) -> np.ndarray:
    """(*dims, 3) Gaussian noise, blurred: two passes of a 3-tap box blur along each axis."""
    noise = rng.standard_normal((*dims, 3)).astype(np.float32)
    for axis in range(3):
        for _ in range(2):
            padded = np.concatenate([noise.take([0], axis), noise, noise.take([-1], axis)], axis=axis)
            n = noise.shape[axis]
            noise = (padded.take(range(0, n), axis) + padded.take(range(1, n + 1), axis)
                     + padded.take(range(2, n + 2), axis)) / 3
    return noise


def elastic(p: PointSet, rng, params) -> PointSet:
    """Smooth random displacement: noise on a coarse grid, blurred, trilinearly interpolated.

    The interpolation gathers the 8 corners from the flattened grid with one linear index each and
    multiplies the per-axis weights directly: 2x faster than `elastic_reference` (the loader's
    largest cost) and bit-identical to it (same float64 weights, same accumulation order)."""
    coord = p.coord.copy()
    for granularity, magnitude in params:
        lo = coord.min(0)
        dims = ((coord.max(0) - lo) / granularity).astype(int) + 3
        flat = _smooth_noise(rng, dims).reshape(-1, 3)
        position = (coord - lo) / granularity
        base = np.clip(np.floor(position).astype(int), 0, dims - 2)
        frac = position - base
        weights = (1 - frac, frac)  # per axis: weight of the lower and of the upper grid node
        stride = np.array([dims[1] * dims[2], dims[2], 1])
        start = base @ stride
        displacement = np.zeros_like(coord)
        for corner in range(8):
            ox, oy, oz = corner & 1, (corner >> 1) & 1, (corner >> 2) & 1
            weight = weights[ox][:, 0] * weights[oy][:, 1] * weights[oz][:, 2]
            displacement += weight[:, None] * np.take(flat, start + (ox * stride[0] + oy * stride[1] + oz * stride[2]), 0)
        coord += displacement * magnitude
    return replace(p, coord=coord)


def elastic_reference(p: PointSet, rng, params) -> PointSet:
    """The original per-corner loop of `elastic` (same result): the reference input path of
    `tttkd bench train` and of the loader tests."""
    coord = p.coord.copy()
    for granularity, magnitude in params:
        lo = coord.min(0)
        dims = ((coord.max(0) - lo) / granularity).astype(int) + 3
        noise = _smooth_noise(rng, dims)
        position = (coord - lo) / granularity
        base = np.clip(np.floor(position).astype(int), 0, dims - 2)
        frac = position - base
        displacement = np.zeros_like(coord)
        for corner in range(8):
            offset = np.array([(corner >> k) & 1 for k in range(3)])
            weight = np.prod(np.where(offset, frac, 1 - frac), axis=1)
            idx = base + offset
            displacement += weight[:, None] * noise[idx[:, 0], idx[:, 1], idx[:, 2]]
        coord += displacement * magnitude
    return replace(p, coord=coord)


def jitter(p: PointSet, rng, sigma_clip) -> PointSet:
    sigma, clip = sigma_clip
    noise = np.clip(rng.normal(0, sigma, p.coord.shape), -clip, clip).astype(np.float32)
    return replace(p, coord=p.coord + noise)


def crop(p: PointSet, rng, fraction) -> PointSet:
    lo, hi = p.coord[:, :2].min(0), p.coord[:, :2].max(0)
    size = (hi - lo) * rng.uniform(*fraction, 2)
    start = lo + rng.random(2) * (hi - lo - size)
    keep = np.all((p.coord[:, :2] >= start) & (p.coord[:, :2] <= start + size), axis=1)
    return p.take(np.flatnonzero(keep)) if keep.any() else p


def translate(p: PointSet, rng, max_m) -> PointSet:
    return replace(p, coord=p.coord + rng.uniform(-max_m, max_m, 3).astype(np.float32))


def brightness(p: PointSet, rng, amount) -> PointSet:
    return replace(p, color=np.clip(p.color + rng.uniform(-amount, amount) * 255, 0, 255))


def contrast(p: PointSet, rng, low_high) -> PointSet:
    mean = p.color.mean(0, keepdims=True)
    return replace(p, color=np.clip((p.color - mean) * rng.uniform(*low_high) + mean, 0, 255))


def rgb_shift(p: PointSet, rng, amount) -> PointSet:
    return replace(p, color=np.clip(p.color + rng.uniform(-amount, amount, 3) * 255, 0, 255).astype(np.float32))


def augment(p: PointSet, config: AugmentConfig, rng: np.random.Generator, *, reference: bool = False) -> PointSet:
    """Apply the enabled augmentations in a fixed order: geometry, then crop, then colour
    (`reference`: the original elastic loop, for benchmarks and tests; same result)."""
    if config.elastic:
        p = (elastic_reference if reference else elastic)(p, rng, config.elastic)
    if config.rotate:
        p = rotate(p, rng)
    if config.mirror:
        p = mirror(p, rng)
    if config.scale:
        p = scale(p, rng, config.scale)
    if config.jitter_m:
        p = jitter(p, rng, config.jitter_m)
    if config.crop:
        p = crop(p, rng, config.crop)
    if config.translate_m:
        p = translate(p, rng, config.translate_m)
    if config.brightness:
        p = brightness(p, rng, config.brightness)
    if config.contrast:
        p = contrast(p, rng, config.contrast)
    if config.rgb_shift:
        p = rgb_shift(p, rng, config.rgb_shift)
    return replace(p, coord=p.coord.astype(np.float32), color=p.color.astype(np.float32))


def mix3d(a: PointSet, b: PointSet) -> PointSet:
    """Mix3D (Nekrasov et al., 2021): overlay two scenes, each centred on the origin in x/y."""
    def centred(p: PointSet) -> PointSet:
        centre = np.zeros(3, np.float32)
        centre[:2] = (p.coord[:, :2].min(0) + p.coord[:, :2].max(0)) / 2
        return replace(p, coord=p.coord - centre)
    b = centred(b)
    return PointSet.concat(centred(a), replace(b, source=np.ones_like(b.source)))
