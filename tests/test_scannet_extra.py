"""ScanNet additions: `.sens` streams written byte by byte in SensorData's layout (header, frame index,
on-demand decoding, export to the 25k layout, the reader's frames_source="sens"), and Pointcept's
preprocessed .npy scenes paired with 25k frames."""

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_readers import ReaderContract

from tttkd.pipeline.project import camera_to_pixel, world_to_camera
from tttkd.pipeline.scannet import ScanNetReader
from tttkd.pipeline.scene import IGNORE_LABEL, SceneReadError
from tttkd.pipeline.sens import EXPORT_MARKER, SensFile, export_frames

SCENE = "scene0042_00"
COLOR_K = np.array([[50.0, 0, 31.5, 0], [0, 50, 23.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)  # 64x48 colour
DEPTH_K = np.array([[25.0, 0, 15.5, 0], [0, 25, 11.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)  # 32x24 depth
FRAME_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def frame_pose(index: int) -> np.ndarray:
    if index == 1:
        return np.full((4, 4), -np.inf, np.float32)  # tracking lost
    pose = np.eye(4, dtype=np.float32)
    pose[:3, 3] = (0.0, 0.0, -2.0 - index)  # frame 0 at z = -2, frame 2 at z = -4, looking down +z
    return pose


def frame_depth(index: int) -> np.ndarray:
    return (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) + 1000 * (index + 1)).astype(np.uint16)


def write_sens(path: Path, *, version: int = 4, num_frames: int = 3) -> None:
    """A .sens file in ScanNet's SensorData layout, field by field."""
    out = bytearray()
    out += struct.pack("<I", version)
    name = b"StructureSensor"
    out += struct.pack("<Q", len(name)) + name
    for matrix in (COLOR_K, np.eye(4), DEPTH_K, np.eye(4)):  # intrinsic/extrinsic colour, intrinsic/extrinsic depth
        out += struct.pack("<16f", *np.asarray(matrix, np.float32).ravel())
    out += struct.pack("<ii", 2, 1)  # JPEG colour, zlib_ushort depth
    out += struct.pack("<IIII", 64, 48, 32, 24)
    out += struct.pack("<f", 1000.0)
    out += struct.pack("<Q", num_frames)
    for index in range(num_frames):
        jpeg = io.BytesIO()
        Image.fromarray(np.full((48, 64, 3), FRAME_COLORS[index], np.uint8)).save(jpeg, format="JPEG", quality=95)
        depth = zlib.compress(frame_depth(index).astype("<u2").tobytes())
        out += struct.pack("<16f", *frame_pose(index).ravel())
        out += struct.pack("<QQ", 1000 * index, 1000 * index + 7)  # colour, depth timestamps
        out += struct.pack("<QQ", len(jpeg.getvalue()), len(depth))
        out += jpeg.getvalue() + depth
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))


@pytest.fixture
def sens_root(tmp_path) -> Path:
    write_sens(tmp_path / "scans" / SCENE / f"{SCENE}.sens")
    return tmp_path


def test_header_and_frame_index_read_back(sens_root):
    sens = SensFile(sens_root / "scans" / SCENE / f"{SCENE}.sens")
    header = sens.header
    assert (header.version, header.sensor_name) == (4, "StructureSensor")
    assert (header.color_compression, header.depth_compression) == ("jpeg", "zlib_ushort")
    assert (header.color_width, header.color_height, header.depth_width, header.depth_height) == (64, 48, 32, 24)
    assert header.depth_shift == 1000.0 and len(sens) == 3
    np.testing.assert_array_equal(header.intrinsic_color, COLOR_K)
    np.testing.assert_array_equal(header.intrinsic_depth, DEPTH_K)
    np.testing.assert_array_equal(header.extrinsic_depth, np.eye(4))
    np.testing.assert_array_equal(sens.cam_to_world[0], frame_pose(0))
    np.testing.assert_array_equal(sens.cam_to_world[2], frame_pose(2))
    assert np.isneginf(sens.cam_to_world[1]).all()
    np.testing.assert_array_equal(sens.timestamps[2], [2000, 2007])


def test_frames_decode_on_demand(sens_root):
    sens = SensFile(sens_root / "scans" / SCENE / f"{SCENE}.sens")
    for index in (2, 0):  # any order: offsets come from the index
        np.testing.assert_array_equal(sens.depth(index), frame_depth(index))
        image = np.asarray(sens.color(index).convert("RGB"))
        assert image.shape == (48, 64, 3)
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), FRAME_COLORS[index], atol=3)
    assert sens.color_bytes(1)[:2] == b"\xff\xd8"  # a JPEG's start-of-image marker
    assert pickle.loads(pickle.dumps(sens)).depth(1)[0, 0] == 2000


def test_wrong_version_and_truncation_name_the_file(tmp_path):
    write_sens(tmp_path / "v3.sens", version=3)
    with pytest.raises(SceneReadError, match=r"v3\.sens: \.sens version 3"):
        SensFile(tmp_path / "v3.sens")
    write_sens(tmp_path / "cut.sens")
    data = (tmp_path / "cut.sens").read_bytes()
    (tmp_path / "cut.sens").write_bytes(data[:-10])
    with pytest.raises(SceneReadError, match=r"cut\.sens: truncated .*frame 2 of 3"):
        SensFile(tmp_path / "cut.sens")


def test_export_is_read_by_the_scannet_reader(sens_root):
    out = sens_root / "exported" / SCENE
    assert export_frames(sens_root / "scans" / SCENE / f"{SCENE}.sens", out, frame_skip=1) == 3
    assert sorted(p.name for p in (out / "color").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    sens = SensFile(sens_root / "scans" / SCENE / f"{SCENE}.sens")
    assert (out / "color" / "000002.jpg").read_bytes() == sens.color_bytes(2)  # copied, not re-encoded
    np.testing.assert_array_equal(np.asarray(Image.open(out / "depth" / "000002.png")), frame_depth(2))
    view_set = ScanNetReader(sens_root, frames_dir="exported").read_views(SCENE)
    assert [v.view_id for v in view_set.views] == ["000000", "000002"]
    assert view_set.skipped == {"invalid pose": 1}
    view = view_set.views[1]
    np.testing.assert_allclose(view.cam_to_world, frame_pose(2))
    np.testing.assert_allclose(view.camera.intrinsics, COLOR_K[:3, :3])
    assert (view.camera.width, view.camera.height) == (64, 48)
    np.testing.assert_allclose(view.depth_camera.intrinsics, DEPTH_K[:3, :3])
    assert view.depth_scale == 1000.0


def test_frames_source_sens_exports_once_every_frame_skip(sens_root):
    cache = sens_root / "cache"
    reader = ScanNetReader(sens_root, frames_source="sens", frame_skip=2, sens_cache=cache)
    view_set = reader.read_views(SCENE)
    assert [v.view_id for v in view_set.views] == ["000000", "000002"]  # frame 1 is not a multiple of 2
    assert view_set.skipped == {}
    folder = cache / "skip2" / SCENE
    assert (folder / EXPORT_MARKER).is_file()
    assert [p.name for p in cache.joinpath("skip2").iterdir()] == [SCENE]  # no partial folder left behind
    # a point 2 m in front of frame 0's camera lands on the hand-computed pixel of the 64x48 image
    view = view_set.views[0]
    uv = camera_to_pixel(world_to_camera(np.array([[0.2, -0.1, 0.0]]), view.cam_to_world), view.camera)
    np.testing.assert_allclose(uv, [[50 * 0.1 + 31.5, 50 * -0.05 + 23.5]], atol=1e-9)
    # the second read uses the export: it works without the stream
    (sens_root / "scans" / SCENE / f"{SCENE}.sens").unlink()
    again = pickle.loads(pickle.dumps(reader)).read_views(SCENE)
    assert [v.image_path for v in again.views] == [v.image_path for v in view_set.views]
    with pytest.raises(SceneReadError, match=r"scene0043_00\.sens: no \.sens stream"):
        reader.read_views("scene0043_00")


def test_frames_source_sens_counts_the_invalid_pose(sens_root):
    view_set = ScanNetReader(sens_root, frames_source="sens", frame_skip=1, sens_cache=sens_root / "c").read_views(SCENE)
    assert [v.view_id for v in view_set.views] == ["000000", "000002"]
    assert view_set.skipped == {"invalid pose": 1}


def test_half_written_export_is_refused(sens_root):
    (sens_root / "c" / "skip20" / SCENE / "color").mkdir(parents=True)
    with pytest.raises(SceneReadError, match=EXPORT_MARKER):
        ScanNetReader(sens_root, frames_source="sens", sens_cache=sens_root / "c").read_views(SCENE)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="frames_source"):
        ScanNetReader(tmp_path, frames_source="stream")
    with pytest.raises(ValueError, match="frame_skip"):
        ScanNetReader(tmp_path, frames_source="sens", frame_skip=0)
    with pytest.raises(ValueError, match="points"):
        ScanNetReader(tmp_path, points="pth")


# -- Pointcept's preprocessed scenes ------------------------------------------------------------------

POINTCEPT_COORD = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0.5, 0.5, 1]], np.float32)


def write_pointcept_scene(folder: Path, *, labels: bool = True, normals: bool = True) -> None:
    """One scene as Pointcept's preprocess_scannet.py saves it (np.save, its dtypes)."""
    folder.mkdir(parents=True)
    np.save(folder / "coord.npy", POINTCEPT_COORD)
    np.save(folder / "color.npy", np.array([[10, 0, 0], [20, 0, 0], [30, 0, 0], [40, 0, 0], [255, 128, 1]], np.uint8))
    if normals:
        np.save(folder / "normal.npy", np.array([[0, 0, 1]] * 4 + [[0, 0, 0]], np.float32))
    if labels:
        np.save(folder / "segment20.npy", np.array([0, 4, -1, 19, 12], dtype=np.int64))  # int, -1 ignore


def write_25k_frames(root: Path, scene_id: str) -> None:
    frames = root / "scannet_frames_25k" / scene_id
    for sub in ("color", "depth", "pose"):
        (frames / sub).mkdir(parents=True)
    np.savetxt(frames / "intrinsics_color.txt", np.array([[1170.0, 0, 647.5, 0], [0, 1170, 483.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    np.savetxt(frames / "intrinsics_depth.txt", np.array([[577.0, 0, 319.5, 0], [0, 578, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    pose = np.eye(4)
    pose[2, 3] = -2.0
    Image.fromarray(np.full((480, 640, 3), 128, np.uint8)).save(frames / "color" / "000000.jpg")
    Image.fromarray(np.full((480, 640), 2000, np.uint16)).save(frames / "depth" / "000000.png")
    np.savetxt(frames / "pose" / "000000.txt", pose)


class TestPointceptScenes(ReaderContract):
    @pytest.fixture
    def reader(self, tmp_path):
        write_pointcept_scene(tmp_path / "pointcept" / "train" / SCENE)
        write_25k_frames(tmp_path / "scannet", SCENE)
        return ScanNetReader(tmp_path / "scannet", points="pointcept", points_root=tmp_path / "pointcept"), SCENE

    def test_segment20_is_the_class_index(self, reader):
        reader, scene_id = reader
        scene = reader.read_scene(scene_id)
        names = reader.class_names
        assert [names[i] if i >= 0 else None for i in scene.label] == ["wall", "chair", None, "otherfurniture", "desk"]
        np.testing.assert_array_equal(scene.coord, POINTCEPT_COORD)
        np.testing.assert_array_equal(scene.color[:, 0], [10, 20, 30, 40, 255])
        np.testing.assert_array_equal(scene.normal[4], [0, 0, 0])  # in no face: stays unknown

    def test_frames_come_from_the_25k_folder(self, reader):
        reader, scene_id = reader
        view = reader.read_views(scene_id).views[0]
        assert view.image_path.parent.parent.parent.name == "scannet_frames_25k"
        assert view.camera.intrinsics[0, 0] == pytest.approx(1170 * 640 / 1296)

    def test_split_folders_list_scenes_and_test_scenes_have_no_labels(self, reader, tmp_path):
        reader, _ = reader
        write_pointcept_scene(tmp_path / "pointcept" / "test" / "scene0707_00", labels=False)
        assert reader.scene_ids("test") == ["scene0707_00"]
        assert (reader.read_scene("scene0707_00").label == IGNORE_LABEL).all()
        assert len(reader.scene_ids("val")) == 312  # no val folder: the shipped official list

    def test_malformed_arrays_name_the_file(self, reader, tmp_path):
        reader, scene_id = reader
        folder = tmp_path / "pointcept" / "train" / scene_id
        np.save(folder / "segment20.npy", np.array([0, 1, 2, 25, -1]))
        with pytest.raises(SceneReadError, match=r"segment20\.npy: value 25"):
            reader.read_scene(scene_id)
        np.save(folder / "segment20.npy", np.zeros(4, np.int64))
        with pytest.raises(SceneReadError, match=r"segment20\.npy: shape \(4,\), expected \(5,\)"):
            reader.read_scene(scene_id)

    def test_reader_pickles(self, reader):
        reader, scene_id = reader
        copy = pickle.loads(pickle.dumps(reader))
        np.testing.assert_array_equal(copy.read_scene(scene_id).label, reader.read_scene(scene_id).label)


def test_pointcept_scene_without_normals_gets_estimated_ones(tmp_path):
    pytest.importorskip("tttkd.pipeline.normals")
    folder = tmp_path / "train" / SCENE
    write_pointcept_scene(folder, normals=False)
    rng = np.random.default_rng(0)
    plane = np.column_stack([rng.uniform(0, 1, 200), rng.uniform(0, 1, 200), np.zeros(200)]).astype(np.float32)
    np.save(folder / "coord.npy", plane)  # a flat floor: normals along z
    np.save(folder / "color.npy", np.zeros((200, 3), np.uint8))
    np.save(folder / "segment20.npy", np.ones(200, np.int64))
    scene = ScanNetReader(tmp_path, points="pointcept").read_scene(SCENE)
    found = np.linalg.norm(scene.normal, axis=1) > 0
    assert found.mean() > 0.9
    np.testing.assert_allclose(np.abs(scene.normal[found, 2]), 1.0, atol=1e-3)
