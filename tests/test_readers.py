"""Dataset readers: one contract every reader passes, plus ScanNet's own quirks on a fixture in the
real layout (binary mesh PLY with faces, labels PLY, 25k frames, full-sensor intrinsics, -inf pose)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tttkd.pipeline.ply import read_ply, write_ply
from tttkd.pipeline.scannet import ScanNetReader
from tttkd.pipeline.scene import IGNORE_LABEL, SceneReadError


class ReaderContract:
    """Subclass with a `reader` fixture returning (reader, a scene id of the split 'train')."""

    def test_scene_arrays_have_the_documented_types(self, reader):
        reader, scene_id = reader
        scene = reader.read_scene(scene_id)
        n = scene.num_points
        assert n > 0 and scene.scene_id == scene_id
        assert scene.coord.dtype == np.float32 and scene.coord.shape == (n, 3)
        assert scene.color.dtype == np.uint8 and scene.label.dtype == np.int16
        assert scene.label.min() >= IGNORE_LABEL and scene.label.max() < len(reader.class_names)
        lengths = np.linalg.norm(scene.normal, axis=1)
        assert np.all((np.abs(lengths - 1) < 1e-3) | (lengths == 0))

    def test_views_have_rigid_poses_and_existing_images(self, reader):
        reader, scene_id = reader
        view_set = reader.read_views(scene_id)
        assert view_set.views
        for view in view_set.views:
            assert Path(view.image_path).is_file()
            rotation = view.cam_to_world[:3, :3]
            np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
            with Image.open(view.image_path) as image:
                assert image.size == (view.camera.width, view.camera.height)

    def test_split_lists_the_scene(self, reader):
        reader, scene_id = reader
        assert scene_id in reader.scene_ids("train")

    def test_unknown_scene_fails_with_its_path(self, reader):
        reader, _ = reader
        with pytest.raises((SceneReadError, FileNotFoundError), match="scene9999_00"):
            reader.read_scene("scene9999_00")


def make_scannet_fixture(root: Path) -> str:
    """A two-triangle 'scan' and three frames, written exactly as ScanNet ships them."""
    scene_id = "scene0042_00"
    scan = root / "scans" / scene_id
    scan.mkdir(parents=True)
    coord = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0.5, 0.5, 0]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    vertex = np.zeros(5, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                ("blue", "u1"), ("alpha", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = coord.T
    vertex["red"] = [10, 20, 30, 40, 50]
    write_ply(scan / f"{scene_id}_vh_clean_2.ply", vertex, faces)
    labels = np.zeros(5, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                ("blue", "u1"), ("alpha", "u1"), ("label", "u2")])
    labels["label"] = [1, 3, 22, 39, 0]  # wall, cabinet, ceiling (not a benchmark class), otherfurniture, unlabelled
    write_ply(scan / f"{scene_id}_vh_clean_2.labels.ply", labels, faces)
    frames = root / "scannet_frames_25k" / scene_id
    for sub in ("color", "depth", "pose"):
        (frames / sub).mkdir(parents=True)
    np.savetxt(frames / "intrinsics_color.txt", np.array([[1170.0, 0, 647.5, 0], [0, 1170, 483.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    np.savetxt(frames / "intrinsics_depth.txt", np.array([[577.0, 0, 319.5, 0], [0, 578, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    pose = np.eye(4)
    pose[2, 3] = -2.0
    for frame, p in (("000000", pose), ("000100", np.full((4, 4), -np.inf)), ("000300", pose)):  # gap: no 000200
        Image.fromarray(np.full((480, 640, 3), 128, np.uint8)).save(frames / "color" / f"{frame}.jpg")
        Image.fromarray(np.full((480, 640), 2000, np.uint16)).save(frames / "depth" / f"{frame}.png")
        np.savetxt(frames / "pose" / f"{frame}.txt", p)
    (root / "scannetv2_train.txt").write_text(scene_id + "\n")
    return scene_id


class TestScanNetReader(ReaderContract):
    @pytest.fixture
    def reader(self, tmp_path):
        return ScanNetReader(tmp_path), make_scannet_fixture(tmp_path)

    def test_nyu40_ids_map_to_the_20_benchmark_classes(self, reader):
        reader, scene_id = reader
        scene = reader.read_scene(scene_id)
        names = reader.class_names
        assert len(names) == 20
        assert [names[i] if i >= 0 else None for i in scene.label] == ["wall", "cabinet", None, "otherfurniture", None]
        np.testing.assert_array_equal(scene.color[:, 0], [10, 20, 30, 40, 50])

    def test_normals_come_from_the_mesh_faces(self, reader):
        reader, scene_id = reader
        normal = reader.read_scene(scene_id).normal
        np.testing.assert_allclose(normal[:4], np.tile([0, 0, 1], (4, 1)), atol=1e-6)
        np.testing.assert_array_equal(normal[4], [0, 0, 0])  # in no face

    def test_invalid_pose_is_skipped_and_counted(self, reader):
        reader, scene_id = reader
        view_set = reader.read_views(scene_id)
        assert [v.view_id for v in view_set.views] == ["000000", "000300"]
        assert view_set.skipped == {"invalid pose": 1}

    def test_full_sensor_intrinsics_are_scaled_to_the_640x480_jpegs(self, reader):
        reader, scene_id = reader
        view = reader.read_views(scene_id).views[0]
        assert view.camera.intrinsics[0, 0] == pytest.approx(1170 * 640 / 1296)
        assert view.depth_camera.intrinsics[0, 0] == pytest.approx(577.0)

    def test_scene_ids_with_path_separators_are_refused(self, reader):
        reader, _ = reader
        with pytest.raises(ValueError, match="invalid scene id"):
            reader.read_scene("../../etc")


class TestSynthIsReadAsScanNet(ReaderContract):
    @pytest.fixture
    def reader(self, synth_root):
        return ScanNetReader(synth_root), "scene0000_00"


def test_ply_round_trip_binary_and_ascii(tmp_path):
    # binary: every property and the faces come back bit-exact, from a little-endian file
    vertex = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("label", "u2")])
    vertex["x"], vertex["y"], vertex["z"] = [1.5, -2.25, 3e-3], [0.1, 1e6, -7.0], [-0.5, 0.0, 2.0 ** -20]
    vertex["red"], vertex["label"] = [0, 128, 255], [7, 8, 65535]
    faces = np.array([[0, 1, 2], [2, 1, 0]])
    write_ply(tmp_path / "a.ply", vertex, faces)
    data = (tmp_path / "a.ply").read_bytes()
    header, body = data.split(b"end_header\n")
    assert b"format binary_little_endian 1.0" in header
    assert len(body) == 3 * (4 * 3 + 1 + 2) + 2 * (1 + 3 * 4)
    back, back_faces = read_ply(tmp_path / "a.ply")
    assert back.dtype.names == vertex.dtype.names
    for name in vertex.dtype.names:
        np.testing.assert_array_equal(back[name], vertex[name])
    np.testing.assert_array_equal(back_faces, faces)
    write_ply(tmp_path / "c.ply", vertex)
    assert read_ply(tmp_path / "c.ply")[1] is None
    # ascii: columns map to their properties; faces only where the file has them
    (tmp_path / "b.ply").write_text("ply\nformat ascii 1.0\ncomment made by hand\nelement vertex 2\nproperty float x\n"
                                    "property float y\nproperty float z\nproperty uchar label\nend_header\n"
                                    "1 2 3 4\n-4.5 5 6 200\n")
    back, back_faces = read_ply(tmp_path / "b.ply")
    np.testing.assert_array_equal(back["x"], [1, -4.5])
    np.testing.assert_array_equal(back["y"], [2, 5])
    np.testing.assert_array_equal(back["z"], [3, 6])
    np.testing.assert_array_equal(back["label"], [4, 200])
    assert back["label"].dtype == np.uint8
    assert back_faces is None
    (tmp_path / "d.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                                    "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                                    "end_header\n0 0 0\n1 0 0\n0 1 0\n3 2 0 1\n")
    back, back_faces = read_ply(tmp_path / "d.ply")
    np.testing.assert_array_equal(back["x"], [0, 1, 0])
    np.testing.assert_array_equal(back_faces, [[2, 0, 1]])
    assert back_faces.dtype == np.int64
