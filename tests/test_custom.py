"""The `custom` reader on scenes written in its documented layout: a binary PLY with faces and an NPZ
variant, cameras.json with OpenCV and OpenGL poses, depth images, bad frames and malformed files."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_readers import ReaderContract

from tttkd.pipeline.custom import CustomReader
from tttkd.pipeline.ply import write_ply
from tttkd.pipeline.project import camera_to_pixel, world_to_camera
from tttkd.pipeline.scene import IGNORE_LABEL, SceneReadError

CLASSES = ["wall", "floor", "chair"]
COORD = np.array([[4, 1.7, 0.3], [0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 2, 0]], np.float32)
COLOR = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9], [100, 110, 120]], np.uint8)
NORMAL = np.array([[0, 0, 2], [0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], np.float32)  # one unnormalised, one unknown
LABEL = np.array([2, 0, 255, 1, -1], np.int32)  # 255 and -1: unlabelled

# An OpenCV camera at (1, 2, 0) looking along world +x: camera x = world -y, camera y = world -z.
POSE = np.array([[0, 0, 1, 1], [-1, 0, 0, 2], [0, -1, 0, 0], [0, 0, 0, 1]], np.float64)
K = [[100.0, 0, 39.5], [0, 120.0, 29.5], [0, 0, 1]]  # for the 80x60 images
# COORD[0] relative to the camera: (3, -0.3, 0.3) -> camera (0.3, -0.3, 3) -> u = 100 * 0.1 + 39.5, v = 120 * -0.1 + 29.5
PIXEL_OF_POINT_0 = (49.5, 17.5)


def write_scene(root: Path, scene_id: str, *, variant: str = "ply", frames: list | None = None, top: dict | None = None) -> Path:
    folder = root / scene_id
    (folder / "images").mkdir(parents=True)
    (folder / "depth").mkdir()
    if variant == "ply":
        vertex = np.zeros(len(COORD), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("nx", "f4"), ("ny", "f4"),
                                             ("nz", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("label", "u1")])
        vertex["x"], vertex["y"], vertex["z"] = COORD.T
        vertex["nx"], vertex["ny"], vertex["nz"] = NORMAL.T
        vertex["red"], vertex["green"], vertex["blue"] = COLOR.T
        vertex["label"] = LABEL.astype(np.uint8)  # -1 becomes 255, the uint8 "unlabelled"
        write_ply(folder / "points.ply", vertex, np.array([[1, 2, 3]]))  # a face element, ignored
    else:
        np.savez(folder / "points.npz", coord=COORD, color=COLOR, normal=NORMAL, label=LABEL)
    for name in ("0001", "0002"):
        Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(folder / "images" / f"{name}.jpg")
        Image.fromarray(np.full((30, 40), 3000, np.uint16)).save(folder / "depth" / f"{name}.png")
    if frames is None:
        frames = [{"image": "images/0001.jpg", "depth": "depth/0001.png", "K": K, "cam_to_world": POSE.tolist()},
                  {"image": "images/0002.jpg", "K": K, "cam_to_world": POSE[:3].tolist()}]  # 3x4 accepted
    cameras = {"depth_scale": 5000, "frames": frames, **(top or {})}
    (folder / "cameras.json").write_text(json.dumps(cameras, indent=1))
    return folder


def make_root(root: Path, variant: str) -> str:
    (root / "classes.json").write_text(json.dumps(CLASSES))
    write_scene(root, "room_1", variant=variant)
    (root / "train.txt").write_text("room_1\n")
    return "room_1"


class TestCustomPly(ReaderContract):
    variant = "ply"

    @pytest.fixture
    def reader(self, tmp_path):
        scene_id = make_root(tmp_path, self.variant)
        return CustomReader(tmp_path), scene_id

    def test_points_colours_normals_and_labels(self, reader):
        reader, scene_id = reader
        scene = reader.read_scene(scene_id)
        assert reader.class_names == tuple(CLASSES)
        np.testing.assert_array_equal(scene.coord, COORD)
        np.testing.assert_array_equal(scene.color, COLOR)
        np.testing.assert_array_equal(scene.normal[0], [0, 0, 1])  # renormalised
        np.testing.assert_array_equal(scene.normal[4], [0, 0, 0])  # unknown stays zero
        np.testing.assert_array_equal(scene.label, [2, 0, IGNORE_LABEL, 1, IGNORE_LABEL])

    def test_a_known_point_projects_to_the_hand_computed_pixel(self, reader):
        reader, scene_id = reader
        view_set = reader.read_views(scene_id)
        assert [v.view_id for v in view_set.views] == ["0001", "0002"] and view_set.skipped == {}
        coord = reader.read_scene(scene_id).coord
        for view in view_set.views:
            uv = camera_to_pixel(world_to_camera(coord[:1].astype(np.float64), view.cam_to_world), view.camera)
            np.testing.assert_allclose(uv[0], PIXEL_OF_POINT_0, atol=1e-5)

    def test_depth_image_scale_and_camera(self, reader):
        reader, scene_id = reader
        with_depth, without = reader.read_views(scene_id).views
        assert with_depth.depth_scale == 5000.0 and without.depth_path is None
        # K rescaled to the 40x30 depth image: fx / 2, pixel centres kept at integers
        np.testing.assert_allclose(with_depth.depth_camera.intrinsics, [[50, 0, 19.5], [0, 60, 14.5], [0, 0, 1]])

    def test_reader_pickles(self, reader):
        reader, scene_id = reader
        assert pickle.loads(pickle.dumps(reader)).read_views(scene_id).views[0].view_id == "0001"


class TestCustomNpz(TestCustomPly):
    variant = "npz"


def frame(name="0001", **changes):
    return {"image": f"images/{name}.jpg", "K": K, "cam_to_world": POSE.tolist(), **changes}


def test_opengl_poses_and_calibration_size_give_the_same_pixel(tmp_path):
    opengl = POSE @ np.diag([1.0, -1, -1, 1])  # the same camera with y up, looking down -z
    k_full = [[200.0, 0, 79.5], [0, 240.0, 59.5], [0, 0, 1]]  # K of a 160x120 calibration
    write_scene(tmp_path, "room", frames=[frame(cam_to_world=opengl.tolist(), K=k_full, K_size=[160, 120])],
                top={"axes": "opengl"})
    view = CustomReader(tmp_path).read_views("room").views[0]
    np.testing.assert_allclose(view.cam_to_world, POSE, atol=1e-12)
    uv = camera_to_pixel(world_to_camera(COORD[:1].astype(np.float64), view.cam_to_world), view.camera)
    np.testing.assert_allclose(uv[0], PIXEL_OF_POINT_0, atol=1e-5)


def test_bad_frames_are_skipped_and_counted(tmp_path):
    scaled = POSE.copy()
    scaled[:3, :3] *= 2  # not rigid
    frames = [
        frame("0001"),
        frame("a", cam_to_world=np.full((4, 4), -np.inf).tolist()),  # tracking lost
        frame("b", cam_to_world=scaled.tolist()),
        frame("0009"),  # no such image
        frame("c", depth="depth/0404.png"),  # no such depth image
        frame("0002"),
    ]
    folder = write_scene(tmp_path, "room", frames=frames)
    for name in ("a", "b", "c"):
        Image.new("RGB", (80, 60)).save(folder / "images" / f"{name}.jpg")
    view_set = CustomReader(tmp_path).read_views("room")
    assert [v.view_id for v in view_set.views] == ["0001", "0002"]
    assert view_set.skipped == {"invalid pose": 2, "missing image": 1, "missing depth": 1}


@pytest.mark.parametrize(("change", "message"), [
    ({"image": None}, r"frames\[0\]: missing key 'image'"),
    ({"cam_to_world": None}, r"frames\[0\]: missing key 'cam_to_world'"),
    ({"K": None}, r"frames\[0\]: missing key 'K'"),
    ({"K": [[1, 0, 0], [0, 1, 0]]}, r"frames\[0\]\.K: shape \(2, 3\), expected \(3, 3\)"),
    ({"K": [[1, 0, 0], [0, 1, 0], [0, "x", 1]]}, r"frames\[0\]\.K: expected a matrix of numbers"),
    ({"cam_to_world": [[1, 0], [0, 1]]}, r"frames\[0\]\.cam_to_world: shape \(2, 2\)"),
    ({"K_size": [80]}, r"frames\[0\]\.K_size: expected \[width, height\]"),
])
def test_malformed_frames_name_the_file_and_key(tmp_path, change, message):
    entry = frame(**{k: v for k, v in change.items() if v is not None})
    for key in [k for k, v in change.items() if v is None]:
        del entry[key]
    write_scene(tmp_path, "room", frames=[entry])
    with pytest.raises(SceneReadError, match=r"room/cameras\.json: " + message):
        CustomReader(tmp_path).read_views("room")


def test_malformed_files_name_the_file(tmp_path):
    folder = write_scene(tmp_path, "room", variant="npz")
    reader = CustomReader(tmp_path)
    (folder / "cameras.json").write_text("{\"frames\": [")
    with pytest.raises(SceneReadError, match=r"room/cameras\.json: not valid JSON"):
        reader.read_views("room")
    (folder / "cameras.json").write_text(json.dumps({"frames": [], "depth_scale": 0}))
    with pytest.raises(SceneReadError, match=r"cameras\.json: depth_scale must be a positive number"):
        reader.read_views("room")
    (folder / "cameras.json").unlink()
    with pytest.raises(SceneReadError, match=r"room/cameras\.json"):
        reader.read_views("room")
    np.savez(folder / "points.npz", xyz=COORD)
    with pytest.raises(SceneReadError, match=r"points\.npz: missing key 'coord'"):
        reader.read_scene("room")
    np.savez(folder / "points.npz", coord=COORD, color=COLOR[:3])
    with pytest.raises(SceneReadError, match=r"points\.npz: color has shape \(3, 3\), expected \(5, 3\)"):
        reader.read_scene("room")
    (folder / "points.npz").unlink()
    with pytest.raises(SceneReadError, match=r"room: no points\.ply or points\.npz"):
        reader.read_scene("room")
    (folder / "points.ply").write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n1 2\n")
    with pytest.raises(SceneReadError, match=r"points\.ply: vertex element has no x, y, z"):
        reader.read_scene("room")
    (tmp_path / "classes.json").write_text(json.dumps({"names": CLASSES}))
    with pytest.raises(SceneReadError, match=r"classes\.json: expected a JSON list"):
        CustomReader(tmp_path)


def test_labels_need_classes_json_and_must_be_in_range(tmp_path):
    folder = write_scene(tmp_path, "room", variant="npz")
    assert CustomReader(tmp_path).class_names == ()
    assert (CustomReader(tmp_path).read_scene("room").label == IGNORE_LABEL).all()  # no class list: all ignored
    (tmp_path / "classes.json").write_text(json.dumps(["wall", "floor"]))  # label 2 is out of range now
    with pytest.raises(SceneReadError, match=r"points\.npz: label 2 but .*classes\.json lists 2 classes"):
        CustomReader(tmp_path).read_scene("room")
    np.savez(folder / "points.npz", coord=COORD, label=LABEL.astype(np.float32))
    with pytest.raises(SceneReadError, match=r"label has dtype float32"):
        CustomReader(tmp_path).read_scene("room")


def test_splits_all_and_from_files(tmp_path):
    write_scene(tmp_path, "b_room", variant="npz")
    write_scene(tmp_path, "a_room")
    (tmp_path / "notes").mkdir()  # no points: not a scene
    reader = CustomReader(tmp_path)
    assert reader.scene_ids("all") == ["a_room", "b_room"]
    with pytest.raises(SceneReadError, match=r"val\.txt: no split list 'val'"):
        reader.scene_ids("val")
    (tmp_path / "val.txt").write_text("b_room\n\n")
    assert reader.scene_ids("val") == ["b_room"]


def test_points_without_normals_get_estimated_ones(tmp_path):
    pytest.importorskip("tttkd.pipeline.normals")
    folder = write_scene(tmp_path, "room", variant="npz")
    rng = np.random.default_rng(0)
    wall = np.column_stack([np.full(300, 2.0), rng.uniform(0, 1, 300), rng.uniform(0, 1, 300)]).astype(np.float32)
    np.savez(folder / "points.npz", coord=wall)  # a wall at x = 2: normals along x, black points
    scene = CustomReader(tmp_path).read_scene("room")
    found = np.linalg.norm(scene.normal, axis=1) > 0
    assert found.mean() > 0.9
    np.testing.assert_allclose(np.abs(scene.normal[found, 0]), 1.0, atol=1e-3)
    assert (scene.color == 0).all()
