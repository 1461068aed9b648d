"""S3DIS + 2D-3D-S reader on a tiny tree written in the real layout: Annotations text files with the
real defects (0x10 separator, float colours, `wall_3 (1).txt`, blank and short lines, stairs),
2D-3D-S frames with pose JSONs carrying the dataset's keys, uint16 depth in 1/512 m, area_5b."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_readers import ReaderContract

from tttkd.pipeline.project import ProjectionConfig, camera_to_pixel, project_view, world_to_camera
from tttkd.pipeline.s3dis import S3DISReader, read_annotation_file
from tttkd.pipeline.scene import SceneReadError

SIZE = 60  # small square images instead of 1080x1080; K below matches them
K = [[30.0, 0.0, 29.5], [0.0, 30.0, 29.5], [0.0, 0.0, 1.0]]
# a camera looking along world +x from (1, 1, 1.5): x_cam = -y_world, y_cam = -z_world, z_cam = +x_world
R_LOOK_X = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
CENTRE = np.array([1.0, 1.0, 1.5])
UUID = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"


def rt_matrix(rotation, location) -> list:
    """camera_rt_matrix: 3x4 world -> camera."""
    rotation = np.asarray(rotation, dtype=float)
    return np.column_stack([rotation, -rotation @ np.asarray(location, dtype=float)]).tolist()


def write_frame(area_dir: Path, room: str, frame: int, rt, *, uuid=UUID, depth_m=2.0, pose=True, depth=True):
    stem = f"camera_{uuid}_{room}_frame_{frame}_domain_"
    for sub in ("rgb", "depth", "pose"):
        (area_dir / "data" / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(area_dir / "data" / "rgb" / f"{stem}rgb.png")
    if depth:
        raw = np.full((SIZE, SIZE), round(depth_m * 512), np.uint16)
        raw[:, :10] = 65535  # missing
        Image.fromarray(raw).save(area_dir / "data" / "depth" / f"{stem}depth.png")
    if pose:
        room_type, room_num = room.rsplit("_", 1)
        area_num = area_dir.name.split("_")[1][0]
        (area_dir / "data" / "pose" / f"{stem}pose.json").write_text(json.dumps({
            "camera_k_matrix": K, "field_of_view_rads": 1.0, "camera_original_rotation": [1.57, 0.0, 0.0],
            "rotation_from_original_to_point": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "point_uuid": uuid,
            "camera_location": [1.0, 1.0, 1.5], "frame_num": frame, "camera_rt_matrix": rt,
            "final_camera_rotation": [1.57, 0.0, -1.57], "camera_uuid": uuid,
            "room": f"{room_type}_{room_num}_{area_num}",
        }))


def make_s3dis_fixture(root: Path) -> Path:
    """Area_1/office_1 (every annotation defect), Area_5/office_2 (images in area_5a and area_5b)."""
    points = root / "Stanford3dDataset_v1.2"
    for area in (2, 3, 4, 6):
        (points / f"Area_{area}").mkdir(parents=True)
    grid = np.stack(np.meshgrid(np.arange(41) * 0.05, np.arange(41) * 0.05, indexing="ij"), -1).reshape(-1, 2)

    office = points / "Area_1" / "office_1" / "Annotations"
    office.mkdir(parents=True)
    (points / "Area_1" / "Area_1_alignmentAngle.txt").write_text("## Global alignment angle per disjoint space\n"
                                                               "## Disjoint Space Name Global Alignment Angle\n"
                                                               "office_1 0\nhallway_1 90\n")
    (points / "Area_1" / "hallway_1").mkdir()  # a room whose Annotations folder is missing
    floor = "".join(f"{x:.3f} {y:.3f} 0.000 200 201 202\n" for x, y in grid)  # 1681 points, z = 0
    ceiling = "".join(f"{x:.3f} {y:.3f} 3.000 106.000000 107.000000 108.000000\n" for x, y in grid)  # float colours
    (office / "floor_1.txt").write_text(floor)
    (office / "ceiling_1.txt").write_text(ceiling)
    (office / "wall_1.txt").write_bytes(b"0.000 0.500 1.000 10 20 30\n0.000 0.600 1.000 11\x1021 31\r\n")  # 0x10, CRLF
    (office / "wall_3 (1).txt").write_text("0.000 0.700 1.000 12 22 32\n")  # the Area_5/office_36 duplicate
    (office / "stairs_1.txt").write_text("1.000 1.000 0.600 40 41 42\n")
    (office / "chair_1.txt").write_text("1.500 1.500 0.400 50 51 52\n\n1.0 2.0\n1 2 3 4 5 6 7\n1.2.3 1 1 1 1 1\n"
                                         "1.600 1.500 0.400 60 61 62")  # blank, short, long, no number; no final newline

    room5 = points / "Area_5" / "office_2" / "Annotations"
    room5.mkdir(parents=True)
    (room5 / "table_1.txt").write_text("".join(f"{x:.3f} {y:.3f} 0.700 1 2 3\n" for x, y in grid))

    area_1 = root / "area_1"
    look = rt_matrix(R_LOOK_X, CENTRE)
    write_frame(area_1, "office_1", 0, look)
    for frame in range(1, 5):
        write_frame(area_1, "office_1", frame, rt_matrix(np.eye(3), [1.0, 1.0, frame]))
    write_frame(area_1, "office_1", 5, look, pose=False)  # no pose JSON: skipped
    write_frame(area_1, "office_1", 6, (2 * np.array(look)).tolist())  # not rigid: skipped
    write_frame(area_1, "office_10", 0, look, uuid="ffff")  # "office_1" is a prefix of its name
    write_frame(area_1, "conferenceRoom_1", 0, look, uuid="eeee")  # sees office_1 through a door
    # area_5b's frame: p_s3dis = M p_5b + o, M = [[0,1,0],[-1,0,0],[0,0,1]], o = (-4.09703582, 6.22617759, 0).
    # Camera at p_5b = (1, 2, 1.5), looking along +y_5b = (1, 0, 0) in S3DIS: x_cam = +x_5b, y_cam = -z_5b
    write_frame(root / "area_5b", "office_2", 0, rt_matrix([[1, 0, 0], [0, 0, -1], [0, 1, 0]], [1.0, 2.0, 1.5]))
    write_frame(root / "area_5a", "office_2", 1, look, depth=False)
    return root


@pytest.fixture
def s3dis_root(tmp_path) -> Path:
    return make_s3dis_fixture(tmp_path)


class TestS3DISReader(ReaderContract):
    @pytest.fixture
    def reader(self, s3dis_root):
        return S3DISReader(s3dis_root), "Area_1_office_1"

    def test_labels_come_from_file_names(self, reader):
        reader, scene_id = reader
        with pytest.warns(UserWarning, match="chair_1.txt"):
            scene = reader.read_scene(scene_id)
        names = reader.class_names
        assert names[:3] == ("ceiling", "floor", "wall") and names[-1] == "clutter" and len(names) == 13
        # files in sorted order: ceiling_1, chair_1, floor_1, stairs_1, wall_1, wall_3 (1)
        expected = ["ceiling"] * 1681 + ["chair"] * 2 + ["floor"] * 1681 + ["clutter"] + ["wall"] * 2 + ["wall"]
        assert [names[i] for i in scene.label] == expected

    def test_defects_are_read_not_fatal(self, reader):
        reader, scene_id = reader
        with pytest.warns(UserWarning):
            scene = reader.read_scene(scene_id)
        np.testing.assert_array_equal(scene.color[:1681], np.tile([106, 107, 108], (1681, 1)))  # "106.000000"
        np.testing.assert_array_equal(scene.color[1681:1683], [[50, 51, 52], [60, 61, 62]])  # short lines dropped
        np.testing.assert_array_equal(scene.color[-3:], [[10, 20, 30], [11, 21, 31], [12, 22, 32]])  # 0x10 + CRLF
        np.testing.assert_allclose(scene.coord[-2], [0.0, 0.6, 1.0])
        rows, skipped = read_annotation_file(reader.points_root / "Area_1/office_1/Annotations/chair_1.txt")
        assert len(rows) == 2
        assert skipped == {"blank lines": 1, "lines without 6 fields": 2, "lines with a field that is no number": 1}

    def test_normals_face_the_room_centre(self, reader):
        reader, scene_id = reader
        with pytest.warns(UserWarning):
            scene = reader.read_scene(scene_id)
        np.testing.assert_allclose(scene.normal[:1681], np.tile([0, 0, -1], (1681, 1)), atol=1e-5)  # ceiling: down
        np.testing.assert_allclose(scene.normal[1683:3364], np.tile([0, 0, 1], (1681, 1)), atol=1e-5)  # floor: up

    def test_views_of_a_room_are_only_its_own_and_bad_frames_are_counted(self, reader):
        reader, scene_id = reader
        view_set = reader.read_views(scene_id)
        assert sorted(v.view_id for v in view_set.views) == [f"camera_{UUID}_office_1_frame_{j}" for j in range(5)]
        assert view_set.skipped == {"missing pose": 1, "invalid pose": 1}

    def test_a_known_point_projects_to_its_hand_computed_pixel(self, reader):
        reader, scene_id = reader
        view = {v.view_id: v for v in reader.read_views(scene_id).views}[f"camera_{UUID}_office_1_frame_0"]
        # P - C = (2, -0.5, -0.5) -> camera (0.5, 0.5, 2) -> u = v = 29.5 + 30 * 0.25 = 37
        point = np.array([[3.0, 0.5, 1.0]])
        np.testing.assert_allclose(world_to_camera(point, view.cam_to_world), [[0.5, 0.5, 2.0]], atol=1e-12)
        np.testing.assert_allclose(camera_to_pixel(world_to_camera(point, view.cam_to_world), view.camera),
                                   [[37.0, 37.0]], atol=1e-9)
        np.testing.assert_allclose(view.cam_to_world[:3, 3], CENTRE, atol=1e-12)

    def test_depth_is_in_512ths_of_a_metre_and_65535_is_no_measurement(self, reader):
        reader, scene_id = reader
        view = {v.view_id: v for v in reader.read_views(scene_id).views}[f"camera_{UUID}_office_1_frame_0"]
        assert view.depth_scale == 512.0 and view.depth_camera.width == SIZE
        depth = np.asarray(Image.open(view.depth_path))
        assert depth.dtype == np.uint16 and depth[30, 30] == 1024
        # at depth 2 m (pixel 37) and at depth 2 m but where the depth image holds 65535 (pixel u = 9 + ... < 10)
        points = np.array([[3.0, 0.5, 1.0], [3.0, 1.0 + 20.5 / 15, 1.5]])  # second: u = 29.5 - 30*20.5/30 = 9
        kwargs = dict(config=ProjectionConfig(border_px=0), depth=depth, depth_camera=view.depth_camera)
        seen = project_view(points, view.cam_to_world, view.camera, depth_scale=view.depth_scale, **kwargs)
        np.testing.assert_allclose(seen.uv, [[37.0, 37.0]], atol=1e-5)
        assert project_view(points, view.cam_to_world, view.camera, depth_scale=1000.0, **kwargs).point_index.size == 0

    def test_area_5b_poses_come_into_the_s3dis_frame(self, s3dis_root):
        view_set = S3DISReader(s3dis_root).read_views("Area_5_office_2")
        views = {v.view_id: v for v in view_set.views}
        assert sorted(views) == [f"camera_{UUID}_office_2_frame_0", f"camera_{UUID}_office_2_frame_1"]
        view_5b = views[f"camera_{UUID}_office_2_frame_0"]
        # camera centre: M (1, 2, 1.5) + o = (2, -1, 1.5) + o
        np.testing.assert_allclose(view_5b.cam_to_world[:3, 3], [2 - 4.09703582, -1 + 6.22617759, 1.5], atol=1e-9)
        # a point 2 m ahead (S3DIS +x), 0.5 m right (S3DIS -y) and 0.5 m down: pixel (37, 37)
        centre = np.array([2 - 4.09703582, -1 + 6.22617759, 1.5])
        point = centre + np.array([[2.0, -0.5, -0.5]])
        np.testing.assert_allclose(camera_to_pixel(world_to_camera(point, view_5b.cam_to_world), view_5b.camera),
                                   [[37.0, 37.0]], atol=1e-6)
        # area_5a needs no transform; its frame has no depth image
        view_5a = views[f"camera_{UUID}_office_2_frame_1"]
        np.testing.assert_allclose(view_5a.cam_to_world[:3, 3], CENTRE, atol=1e-12)
        assert view_5a.depth_path is None

    def test_max_views_sampling_is_deterministic(self, s3dis_root):
        def ids(**kwargs):
            return [v.view_id for v in S3DISReader(s3dis_root, **kwargs).read_views("Area_1_office_1").views]

        everything = ids(max_views=None)
        assert len(everything) == 5
        three = ids(max_views=3)
        assert len(three) == 3 and set(three) <= set(everything) and three == ids(max_views=3)
        assert any(ids(max_views=3, seed=seed) != three for seed in range(1, 6))
        assert ids() == everything  # the default 50 keeps all of 5

    def test_split_lists(self, s3dis_root):
        reader = S3DISReader(s3dis_root)
        assert reader.scene_ids("train") == ["Area_1_hallway_1", "Area_1_office_1"]
        assert reader.scene_ids("val") == reader.scene_ids("test") == ["Area_5_office_2"]
        with pytest.raises(ValueError, match="unknown S3DIS split"):
            reader.scene_ids("training")
        (s3dis_root / "Stanford3dDataset_v1.2" / "Area_3").rmdir()
        with pytest.raises(SceneReadError, match="Area_3: missing"):
            reader.scene_ids("train")

    def test_root_may_be_the_points_folder_itself(self, s3dis_root):
        reader = S3DISReader(s3dis_root / "Stanford3dDataset_v1.2", images_root=s3dis_root)
        assert reader.scene_ids("val") == ["Area_5_office_2"]
        assert len(reader.read_views("Area_5_office_2").views) == 2

    def test_missing_annotations_folder_names_the_path(self, s3dis_root):
        expected = str(s3dis_root / "Stanford3dDataset_v1.2" / "Area_1" / "hallway_1" / "Annotations")
        with pytest.raises(SceneReadError, match=expected.replace("\\", "\\\\")):
            S3DISReader(s3dis_root).read_scene("Area_1_hallway_1")

    def test_aligned_version_is_refused(self, tmp_path):
        (tmp_path / "Stanford3dDataset_v1.2_Aligned_Version" / "Area_1" / "office_1" / "Annotations").mkdir(parents=True)
        reader = S3DISReader(tmp_path / "Stanford3dDataset_v1.2_Aligned_Version")
        with pytest.raises(SceneReadError, match="Aligned_Version rotates each room"):
            reader.read_scene("Area_1_office_1")
