"""The embedded dataset: deterministic, ScanNet classes, domains that differ, images that agree with points."""

import numpy as np
from PIL import Image

from tttkd.pipeline import synth
from tttkd.pipeline.project import ProjectionConfig, project_view
from tttkd.pipeline.scannet import ScanNetReader


def test_same_seed_same_bytes_other_seed_other_room(tmp_path):
    for name, seed in (("x", 5), ("y", 5), ("z", 6)):
        synth.generate(tmp_path / name, domain="a", scenes=1, seed=seed, views=1)
    ply = "scans/scene0000_00/scene0000_00_vh_clean_2.ply"
    assert (tmp_path / "x" / ply).read_bytes() == (tmp_path / "y" / ply).read_bytes()
    assert (tmp_path / "x" / ply).read_bytes() != (tmp_path / "z" / ply).read_bytes()


def test_rooms_hold_at_least_eight_scannet_classes(synth_root):
    reader = ScanNetReader(synth_root)
    present = set()
    for scene_id in reader.scene_ids("train") + reader.scene_ids("val"):
        present |= {reader.class_names[i] for i in np.unique(reader.read_scene(scene_id).label) if i >= 0}
    assert {"wall", "floor"} <= present
    assert len(present) >= 8, present


def test_domain_b_shifts_palette_noise_density_and_proportions(tmp_path):
    a = synth.write_scene(tmp_path / "a", "s", domain=synth.DOMAINS["a"], rng=np.random.default_rng(3), views=1, invalid_pose=False)
    b = synth.write_scene(tmp_path / "b", "s", domain=synth.DOMAINS["b"], rng=np.random.default_rng(3), views=1, invalid_pose=False)
    assert b < 0.7 * a  # halved density
    reader_a, reader_b = ScanNetReader(tmp_path / "a"), ScanNetReader(tmp_path / "b")
    scene_a, scene_b = reader_a.read_scene("s"), reader_b.read_scene("s")
    wall_a = scene_a.color[scene_a.label == 0].mean(0)
    wall_b = scene_b.color[scene_b.label == 0].mean(0)
    assert np.abs(wall_a - wall_b).max() > 20  # palette and lighting
    # sensor noise: floor points scatter around z = 0 in b, not in a
    assert scene_b.coord[scene_b.label == 1, 2].std() > 3 * scene_a.coord[scene_a.label == 1, 2].std()


def test_depth_images_agree_with_the_points(synth_root):
    """The renderer and the point sampler share geometry: visible points sit on the depth surface."""
    reader = ScanNetReader(synth_root)
    scene = reader.read_scene("scene0000_00")
    view = reader.read_views("scene0000_00").views[0]
    depth = np.asarray(Image.open(view.depth_path))
    projection = project_view(scene.coord, view.cam_to_world, view.camera, config=ProjectionConfig(),
                              depth=depth, depth_camera=view.depth_camera)
    assert len(projection.point_index) > 1000
    # depth at each visible point's pixel vs. the point's own depth: equal up to pixel quantisation
    from tttkd.pipeline.project import camera_to_pixel, world_to_camera

    cam = world_to_camera(scene.coord[projection.point_index].astype(np.float64), view.cam_to_world)
    pixel = np.rint(camera_to_pixel(cam, view.depth_camera)).astype(int)
    measured = depth[pixel[:, 1], pixel[:, 0]] / 1000.0
    relative = np.abs(measured - cam[:, 2]) / measured
    assert np.median(relative) < 0.01 and np.mean(relative < 0.05) > 0.9
