"""Point normals for clouds that ship without them (S3DIS): the normal channel of the paper's 6
input channels indoors (§3.1: colour + normal).

Method: principal component analysis of a neighbourhood (the normal is the eigenvector of the
smallest eigenvalue of the neighbourhood's covariance). The neighbourhood of a point is every
point in the 3 x 3 x 3 block of voxels of edge `radius_m` centred on the point's own voxel, so all
points of one voxel share a normal. This keeps the whole computation vectorised and O(N), with no
KD-tree:
  1. hash each point's integer voxel coordinates to one int64 key;
  2. per occupied voxel, sum count, x and x x^T (np.bincount with weights);
  3. per occupied voxel, add those sums over its 27 neighbour voxels (looked up by key with
     np.searchsorted);
  4. covariance = E[x x^T] - E[x] E[x]^T, then one batched 3 x 3 eigen-decomposition per voxel.
Coordinates are centred on their mean first and summed in float64, so E[x x^T] - E[x] E[x]^T loses
nothing measurable at room scale (tens of metres).

A normal's sign is not defined by PCA; it is fixed by one documented rule (see `estimate_normals`).
"""

from __future__ import annotations

import numpy as np

# The upper triangle of a symmetric 3 x 3 matrix: the 6 second moments summed per voxel.
_ROWS = np.array([0, 0, 0, 1, 1, 2])
_COLS = np.array([0, 1, 2, 1, 2, 2])


def estimate_normals(
    coord: np.ndarray,
    *,
    radius_m: float = 0.1,
    min_neighbours: int = 5,
    towards: tuple[float, float, float] | np.ndarray | None = None,
) -> np.ndarray:
    """(N, 3) float32 unit normals of the points `coord` (N, 3), zero where a point has too few
    neighbours.

    Args:
        coord: (N, 3) points, metres.
        radius_m: voxel edge; a point's neighbourhood is the 3 x 3 x 3 voxels around its own,
            i.e. points up to `radius_m` (and at most 2 * sqrt(3) * radius_m) away.
        min_neighbours: fewer points than this in the neighbourhood (the point itself included)
            gives a zero normal.
        towards: orientation. With a viewpoint (x, y, z), each normal is flipped to point towards
            it (n . (towards - p) >= 0); for a room, its centre orients floors up, ceilings down
            and walls inwards. Without one, normals are flipped so that n_z >= 0 (exact for
            horizontal surfaces; the sign of a vertical surface's normal is then arbitrary).
    """
    coord = np.asarray(coord, dtype=np.float64)
    n = len(coord)
    assert coord.ndim == 2 and coord.shape[1] == 3, "coord must be (N, 3)"
    normal = np.zeros((n, 3), dtype=np.float32)
    if n == 0:
        return normal
    centred = coord - coord.mean(axis=0)

    # 1. voxel keys; a margin of one voxel on each side keeps key + offset_key collision-free
    voxel = np.floor(centred / radius_m).astype(np.int64)
    voxel -= voxel.min(axis=0) - 1
    dims = voxel.max(axis=0) + 2
    assert np.prod(dims.astype(np.float64)) < 2**62, "cloud too large for int64 voxel keys at this radius"
    key = (voxel[:, 0] * dims[1] + voxel[:, 1]) * dims[2] + voxel[:, 2]
    unique_key, point_voxel = np.unique(key, return_inverse=True)
    point_voxel = point_voxel.reshape(-1)
    num_voxels = len(unique_key)

    # 2. per-voxel sums: count (V,), sum x (V, 3), sum x x^T upper triangle (V, 6)
    count = np.bincount(point_voxel, minlength=num_voxels).astype(np.float64)
    first = np.stack([np.bincount(point_voxel, centred[:, a], minlength=num_voxels) for a in range(3)], axis=1)
    second = np.stack([
        np.bincount(point_voxel, centred[:, r] * centred[:, c], minlength=num_voxels) for r, c in zip(_ROWS, _COLS)
    ], axis=1)

    # 3. neighbourhood sums: add each of the 27 neighbour voxels that is occupied
    block_count = np.zeros_like(count)
    block_first = np.zeros_like(first)
    block_second = np.zeros_like(second)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                neighbour_key = unique_key + (dx * dims[1] + dy) * dims[2] + dz
                slot = np.searchsorted(unique_key, neighbour_key)
                slot = np.minimum(slot, num_voxels - 1)
                found = np.flatnonzero(unique_key[slot] == neighbour_key)
                block_count[found] += count[slot[found]]
                block_first[found] += first[slot[found]]
                block_second[found] += second[slot[found]]

    # 4. covariance and its smallest eigenvector, per voxel with enough points
    enough = np.flatnonzero(block_count >= max(min_neighbours, 3))  # a plane needs 3 points
    mean = block_first[enough] / block_count[enough, None]
    moment = block_second[enough] / block_count[enough, None]
    covariance = np.empty((len(enough), 3, 3))
    covariance[:, _ROWS, _COLS] = moment - mean[:, _ROWS] * mean[:, _COLS]
    covariance[:, _COLS, _ROWS] = covariance[:, _ROWS, _COLS]
    _, eigenvectors = np.linalg.eigh(covariance)  # eigenvalues ascending
    voxel_normal = np.zeros((num_voxels, 3))
    voxel_normal[enough] = eigenvectors[:, :, 0]

    normal64 = voxel_normal[point_voxel]
    if towards is not None:
        facing = np.einsum("ij,ij->i", normal64, np.asarray(towards, dtype=np.float64) - coord)
    else:
        facing = normal64[:, 2]
    normal64[facing < 0] *= -1
    normal[:] = normal64
    return normal
