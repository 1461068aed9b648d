"""PCA normals from voxel-block neighbourhoods (pipeline/normals.py) against analytic surfaces."""

import numpy as np

from tttkd.pipeline.normals import estimate_normals


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.arccos(np.clip(cos, -1, 1))


def test_points_on_a_tilted_plane_get_its_normal(rng):
    # a plane far from the origin: catches a covariance that loses precision or a wrong eigenvector
    plane_normal = np.array([1.0, -2.0, 3.0]) / np.sqrt(14)
    u = np.cross(plane_normal, [0, 0, 1.0])
    u /= np.linalg.norm(u)
    v = np.cross(plane_normal, u)
    st = rng.uniform(-1, 1, size=(20000, 2))
    coord = np.array([30.0, -12.0, 4.0]) + st[:, :1] * u + st[:, 1:] * v
    normal = estimate_normals(coord.astype(np.float32), radius_m=0.1)
    assert normal.dtype == np.float32 and normal.shape == (20000, 3)
    assert np.all(normal[:, 2] >= 0)  # default orientation: n_z >= 0
    assert angle(normal, np.tile(plane_normal, (20000, 1))).max() < 1e-3


def test_points_on_a_sphere_get_radial_normals_facing_the_centre(rng):
    direction = rng.normal(size=(30000, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    centre = np.array([1.0, 2.0, 0.5])
    coord = centre + 1.0 * direction
    normal = estimate_normals(coord, radius_m=0.1, towards=centre)
    # inward everywhere (the viewpoint rule), and close to radial: the neighbourhood is the whole
    # 3x3x3 block of 10 cm voxels, so a point's normal is that of a 30 cm patch around its voxel
    error = angle(normal, -direction)
    assert np.all(np.einsum("ij,ij->i", normal, -direction) > 0)
    assert error.mean() < 0.05 and error.max() < 0.15


def test_orientation_towards_a_viewpoint_flips_each_side_of_a_box(rng):
    # two parallel walls of a room, x = 0 and x = 4: facing the centre, their normals are opposite
    yz = rng.uniform(0, 2, size=(5000, 2))
    wall_a = np.column_stack([np.zeros(5000), yz])
    wall_b = np.column_stack([np.full(5000, 4.0), yz])
    normal = estimate_normals(np.concatenate([wall_a, wall_b]), towards=(2.0, 1.0, 1.0))
    np.testing.assert_allclose(normal[:5000], np.tile([1, 0, 0], (5000, 1)), atol=1e-5)
    np.testing.assert_allclose(normal[5000:], np.tile([-1, 0, 0], (5000, 1)), atol=1e-5)


def test_isolated_points_get_zero_normals():
    # 4 points together (below min_neighbours=5) and one far away: all zero, and unit elsewhere
    grid = np.stack(np.meshgrid(np.arange(10) * 0.02, np.arange(10) * 0.02, indexing="ij"), -1).reshape(-1, 2)
    plane = np.column_stack([grid, np.zeros(100)])
    lonely = np.array([[5.0, 5, 5], [5.01, 5, 5], [5.0, 5.01, 5], [5.0, 5, 5.01], [9.0, 9, 9]])
    normal = estimate_normals(np.concatenate([plane, lonely]), radius_m=0.1, min_neighbours=5)
    np.testing.assert_array_equal(normal[100:], 0)
    np.testing.assert_allclose(normal[:100], np.tile([0, 0, 1], (100, 1)), atol=1e-6)
    assert estimate_normals(np.zeros((0, 3))).shape == (0, 3)
