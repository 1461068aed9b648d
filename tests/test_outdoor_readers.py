"""SemanticKITTI and A2D2 readers (xMUDA protocol) on fixtures written byte for byte in the real
formats: a float32 x 4 `.bin` sweep with its uint32 `.label`, `calib.txt` and an image_2 PNG; an
A2D2 lidar `.npz` with `points`/`row`/`col`, a colour-coded label PNG, `class_list.json` and
`cams_lidars.json`. Pixels and labels are checked against values computed by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_readers import ReaderContract

from tttkd.pipeline.a2d2 import A2D2Reader, distorted_pixels, read_front_camera
from tttkd.pipeline.project import ProjectionConfig, camera_to_pixel, project_view, world_to_camera
from tttkd.pipeline.scene import IGNORE_LABEL, SceneReadError
from tttkd.pipeline.semantickitti import SemanticKITTIReader

# --- SemanticKITTI --------------------------------------------------------------------------------

KITTI_W, KITTI_H = 100, 80
KITTI_K = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 40.0], [0.0, 0.0, 1.0]])
T2 = np.array([0.06, 0.0, 0.0])  # camera 2 sits 6 cm from camera 0; P2's 4th column is K @ T2 = (6, 0, 0)
# LiDAR -> rectified camera 0: cam x = -lidar y, cam y = -lidar z, cam z = lidar x, then (0, -0.08, -0.27)
TR = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.08], [1.0, 0.0, 0.0, -0.27]])

# (x, y, z) in the LiDAR frame, raw semantic id, kept by xMUDA's crop, its pixel (u, v) by hand:
#   camera 2 coordinates = (-y + 0.06, -z - 0.08, x - 0.27); u = 50 + 100 X / Z, v = 40 + 100 Y / Z
KITTI_POINTS = [
    ((10.0, 0.0, 0.0), 10, True, (50 + 6 / 9.73, 40 - 8 / 9.73)),  # car
    ((-5.0, 0.0, 0.0), 10, False, None),  # behind the car: x <= 0
    ((2.0, 5.0, 0.0), 40, False, None),  # u = 50 - 494 / 1.73 < 0: left of the image
    ((20.0, -3.0, 1.0), 252, True, (50 + 306 / 19.73, 40 - 108 / 19.73)),  # moving-car -> car
    ((5.0, 0.0, -2.0), 40, False, None),  # v = 40 + 192 / 4.73 = 80.6 >= 80: below the image
    ((30.0, 1.0, 0.5), 49, True, (50 - 94 / 29.73, 40 - 58 / 29.73)),  # other-ground -> ignored
    ((15.0, 0.0, 0.0), 71, True, (50 + 6 / 14.73, 40 - 8 / 14.73)),  # trunk -> nature
    ((25.0, 0.0, 0.0), 99, True, (50 + 6 / 24.73, 40 - 8 / 24.73)),  # other-object -> other-objects
    ((12.0, 0.5, 0.0), 31, True, (50 - 44 / 11.73, 40 - 8 / 11.73)),  # bicyclist -> bike
    ((8.0, 0.0, 0.0), 60, True, (50 + 6 / 7.73, 40 - 8 / 7.73)),  # lane-marking -> road
]
# class indices in car, truck, bike, person, road, parking, sidewalk, building, nature, other-objects
KITTI_EXPECTED_LABELS = [0, 0, IGNORE_LABEL, 8, 9, 2, 4]


def calib_text(p2: np.ndarray, tr: np.ndarray) -> str:
    """calib.txt as SemanticKITTI ships it: five lines of 12 numbers in %e, P0..P3 then Tr."""
    p0 = np.column_stack([KITTI_K, np.zeros(3)])
    lines = [("P0", p0), ("P1", p0), ("P2", p2), ("P3", p2), ("Tr", tr)]
    return "".join(f"{key}: " + " ".join(f"{v:.12e}" for v in m.reshape(-1)) + "\n" for key, m in lines)


def make_kitti_fixture(root: Path, seq: str = "08", frame: str = "000123") -> str:
    seq_dir = root / "sequences" / seq
    for sub in ("velodyne", "labels", "image_2"):
        (seq_dir / sub).mkdir(parents=True)
    xyz = np.array([p for p, *_ in KITTI_POINTS], dtype=np.float32)
    remission = np.linspace(0.1, 0.9, len(xyz), dtype=np.float32)
    np.column_stack([xyz, remission]).astype("<f4").tofile(seq_dir / "velodyne" / f"{frame}.bin")
    instance = np.arange(len(xyz), dtype=np.uint32) << 16  # must be masked away
    (np.array([s for _, s, *_ in KITTI_POINTS], dtype=np.uint32) | instance).astype("<u4").tofile(
        seq_dir / "labels" / f"{frame}.label")
    p2 = np.column_stack([KITTI_K, KITTI_K @ T2])
    (seq_dir / "calib.txt").write_text(calib_text(p2, TR))
    Image.fromarray(np.full((KITTI_H, KITTI_W, 3), 70, np.uint8)).save(seq_dir / "image_2" / f"{frame}.png")
    return f"{seq}_{frame}"


@pytest.fixture
def kitti_root(tmp_path) -> Path:
    root = tmp_path / "semantickitti"
    make_kitti_fixture(root, "08")
    make_kitti_fixture(root, "00", "000007")
    for seq in ("01", "02", "03", "04", "05", "06", "09", "10", "07"):  # the other sequences of the splits, empty
        (root / "sequences" / seq / "image_2").mkdir(parents=True)
    return root


class TestSemanticKITTIReader(ReaderContract):
    @pytest.fixture
    def reader(self, kitti_root):
        return SemanticKITTIReader(kitti_root), "00_000007"


def test_kitti_keeps_only_points_in_front_and_inside_the_image(kitti_root):
    scene = SemanticKITTIReader(kitti_root).read_scene("08_000123")
    kept = np.array([p for p, _, keep, _ in KITTI_POINTS if keep], dtype=np.float32)
    np.testing.assert_array_equal(scene.coord, kept)  # LiDAR frame, unchanged, in file order
    assert scene.coord.dtype == np.float32
    assert not scene.color.any() and not scene.normal.any()  # xyz only


def test_kitti_labels_take_the_low_16_bits_through_xmudas_merge(kitti_root):
    scene = SemanticKITTIReader(kitti_root).read_scene("08_000123")
    np.testing.assert_array_equal(scene.label, KITTI_EXPECTED_LABELS)


def test_kitti_view_projects_points_to_hand_computed_pixels(kitti_root):
    """Catches a pose without P2's 4th column (camera 2's offset) or built from Tr the wrong way round."""
    reader = SemanticKITTIReader(kitti_root)
    scene = reader.read_scene("08_000123")
    (view,) = reader.read_views("08_000123").views
    assert (view.camera.width, view.camera.height) == (KITTI_W, KITTI_H)
    np.testing.assert_allclose(view.camera.intrinsics, KITTI_K)
    uv = camera_to_pixel(world_to_camera(scene.coord.astype(np.float64), view.cam_to_world), view.camera)
    expected = np.array([pixel for *_, keep, pixel in KITTI_POINTS if keep])
    np.testing.assert_allclose(uv, expected, atol=1e-4)
    seen = project_view(scene.coord, view.cam_to_world, view.camera, config=ProjectionConfig(border_px=0))
    # no depth image: the z-buffer of the points; the car point at 10 m shares pixel (51, 39) with the
    # lane marking at 8 m (kept point 6) and is hidden, every other point is seen
    assert sorted(seen.point_index) == [1, 2, 3, 4, 5, 6]


def test_kitti_splits_are_xmudas(kitti_root):
    reader = SemanticKITTIReader(kitti_root)
    assert reader.scene_ids("test") == ["08_000123"]
    assert reader.scene_ids("train") == ["00_000007"]
    assert reader.scene_ids("val") == []
    with pytest.raises(ValueError, match="unknown SemanticKITTI split 'hidden'"):
        reader.scene_ids("hidden")
    (kitti_root / "sequences" / "09" / "image_2").rmdir()  # a missing sequence of a split is left out
    assert reader.scene_ids("train") == ["00_000007"]
    (kitti_root / "sequences" / "07" / "image_2").rmdir()
    with pytest.raises(SceneReadError, match="none of the 'val' split's sequences 07 has an image_2/ folder"):
        reader.scene_ids("val")


def test_kitti_reads_the_dataset_folder_of_the_odometry_zips(tmp_path):
    make_kitti_fixture(tmp_path / "dataset")
    assert SemanticKITTIReader(tmp_path).read_scene("08_000123").num_points == len(KITTI_EXPECTED_LABELS)


def test_kitti_sweep_without_labels_is_all_ignored(kitti_root):
    (kitti_root / "sequences" / "08" / "labels" / "000123.label").unlink()
    scene = SemanticKITTIReader(kitti_root).read_scene("08_000123")
    assert scene.num_points == len(KITTI_EXPECTED_LABELS) and (scene.label == IGNORE_LABEL).all()


def test_kitti_bad_inputs_name_the_file(kitti_root):
    reader = SemanticKITTIReader(kitti_root)
    seq = kitti_root / "sequences" / "08"
    calib = (seq / "calib.txt").read_text()

    (seq / "calib.txt").write_text("\n".join(line for line in calib.splitlines() if not line.startswith("Tr")))
    with pytest.raises(SceneReadError, match=r"calib\.txt: no 'Tr' line"):
        reader.read_scene("08_000123")
    (seq / "calib.txt").write_text(calib.replace("P2:", "P2: 1.0"))
    with pytest.raises(SceneReadError, match=r"calib\.txt: line 'P2' has 13 numbers"):
        reader.read_views("08_000123")
    (seq / "calib.txt").write_text(calib)

    sweep = (seq / "velodyne" / "000123.bin").read_bytes()
    (seq / "velodyne" / "000123.bin").write_bytes(sweep[:-4])
    with pytest.raises(SceneReadError, match=r"000123\.bin: 156 bytes, not a multiple of 16"):
        reader.read_scene("08_000123")
    (seq / "velodyne" / "000123.bin").write_bytes(sweep[:-16])  # one point fewer than labels
    with pytest.raises(SceneReadError, match=r"000123\.label: 10 labels for the 9 points"):
        reader.read_scene("08_000123")
    (seq / "velodyne" / "000123.bin").write_bytes(sweep)

    labels = np.fromfile(seq / "labels" / "000123.label", dtype="<u4")
    labels[3] = 1000 | (7 << 16)
    labels.tofile(seq / "labels" / "000123.label")
    with pytest.raises(SceneReadError, match=r"000123\.label: semantic id 1000 \(1 points\) is not a SemanticKITTI"):
        reader.read_scene("08_000123")

    with pytest.raises(SceneReadError, match="'08-000123' is not a SemanticKITTI scene id"):
        reader.read_scene("08-000123")


# --- A2D2 -----------------------------------------------------------------------------------------

A2D2_W, A2D2_H = 64, 40  # small images instead of 1920x1208; K below matches them
A2D2_K = [[40.0, 0.0, 31.5], [0.0, 40.0, 19.5], [0.0, 0.0, 1.0]]
DRIVE, STAMP = "20180810_142822", "20180810142822"
COLOURS = {"#ff0000": "Car 1", "#b432b4": "Sidewalk", "#93fdc2": "Nature object", "#ff00ff": "RD normal street",
           "#87ceff": "Sky", "#ff8000": "Truck 1"}
SKY, UNKNOWN = (0x87, 0xCE, 0xFF), (0x12, 0x34, 0x56)

# The camera sits at (1.7, 0, 0.9) in the vehicle frame looking along +x. A vehicle point (x, y, z) is
# at depth Z = x - 1.7 and pixel u = 31.5 - 40 y / Z, v = 19.5 + 40 (0.9 - z) / Z; rounded half up.
# (vehicle xyz, (col, row) as A2D2 stores them, label-image colour at the rounded pixel, class index)
A2D2_POINTS = [
    ((11.7, 0.5, 1.4), (29.5, 17.5), (255, 0, 0), 0),  # Car 1 -> car, pixel (30, 18)
    ((6.7, -1.0, 0.4), (39.5, 23.5), (0xB4, 0x32, 0xB4), 6),  # Sidewalk -> sidewalk, (40, 24)
    ((21.7, 2.0, 0.9), (27.5, 19.5), (0x93, 0xFD, 0xC2), 8),  # Nature object -> nature, (28, 20)
    ((3.7, 0.0, -0.1), (31.5, 39.5), (255, 0, 255), 4),  # RD normal street -> road, (32, 40) clipped to row 39
    ((5.7, 1.0, 0.9), (21.5, 19.5), UNKNOWN, IGNORE_LABEL),  # a colour of no class, (22, 20): counted
    ((11.7, -0.5, 0.4), (33.5, 21.5), SKY, IGNORE_LABEL),  # Sky: ignored by xMUDA's merge, (34, 22)
]


def cams_lidars(distortion=(0.0, 0.0, 0.0, 0.0, 0.0)) -> dict:
    """cams_lidars.json with the keys and nesting A2D2 ships (other sensors left out)."""
    camera = {"view": {"origin": [1.7, 0.0, 0.9], "x-axis": [1.0, 0.0, 0.0], "y-axis": [0.0, 1.0, 0.0]},
              "Lens": "Telecam", "CamMatrix": A2D2_K, "CamMatrixOriginal": A2D2_K,
              "Distortion": [list(distortion)], "Resolution": [A2D2_W, A2D2_H], "tstamp_delay": 0}
    return {"vehicle": {"view": {"origin": [0.0, 0.0, 0.0], "x-axis": [1.0, 0.0, 0.0], "y-axis": [0.0, 1.0, 0.0]}},
            "lidars": {}, "cameras": {"front_center": camera}}


def write_a2d2_frame(scenes: Path, frame: str, points, *, image=None, with_row=True):
    """One sweep: camera PNG, lidar npz (with the extra arrays A2D2 stores) and label PNG."""
    for sub in ("camera", "lidar", "label"):
        (scenes / DRIVE / sub / "cam_front_center").mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full((A2D2_H, A2D2_W, 3), 60, np.uint8)

    def path(sub: str, ext: str) -> Path:  # A2D2 names a file after its folder: <stamp>_<sub>_frontcenter_<frame>
        return scenes / DRIVE / sub / "cam_front_center" / f"{STAMP}_{sub}_frontcenter_{frame}.{ext}"

    Image.fromarray(image).save(path("camera", "png"))
    labels = np.empty((A2D2_H, A2D2_W, 3), np.uint8)
    labels[:] = SKY
    for _, (col, row), colour, _ in points:
        labels[min(int(np.floor(row + 0.5)), A2D2_H - 1), int(np.floor(col + 0.5))] = colour
    Image.fromarray(labels).save(path("label", "png"))
    xyz = np.array([p for p, *_ in points], dtype=np.float64)
    arrays = {"points": xyz, "reflectance": np.ones(len(xyz)), "timestamp": np.arange(len(xyz)),
              "distance": np.linalg.norm(xyz, axis=1), "depth": xyz[:, 0] - 1.7, "lidar_id": np.zeros(len(xyz), int)}
    if with_row:
        arrays["row"] = np.array([rc[1] for _, rc, *_ in points])
        arrays["col"] = np.array([rc[0] for _, rc, *_ in points])
    np.savez_compressed(path("lidar", "npz"), **arrays)


@pytest.fixture
def a2d2_root(tmp_path) -> Path:
    root = tmp_path / "a2d2"
    scenes = root / "camera_lidar_semantic"
    write_a2d2_frame(scenes, "000000091", A2D2_POINTS)
    reader = A2D2Reader(root)
    for drive in reader._splits["train"]:  # the other training drives, empty
        (scenes / drive / "camera" / "cam_front_center").mkdir(parents=True, exist_ok=True)
    (scenes / "class_list.json").write_text(json.dumps(COLOURS))
    (root / "cams_lidars.json").write_text(json.dumps(cams_lidars()))
    return root


@pytest.mark.filterwarnings("ignore:.*not in class_list.json")  # the fixture's one point of no class
class TestA2D2Reader(ReaderContract):
    @pytest.fixture
    def reader(self, a2d2_root):
        return A2D2Reader(a2d2_root), f"{DRIVE}_000000091"


def test_a2d2_labels_come_from_the_label_image_through_the_merge(a2d2_root):
    with pytest.warns(UserWarning, match=r"label_frontcenter_000000091\.png: 1 of 6 points on a colour"):
        scene = A2D2Reader(a2d2_root).read_scene(f"{DRIVE}_000000091")
    np.testing.assert_array_equal(scene.label, [c for *_, c in A2D2_POINTS])
    np.testing.assert_allclose(scene.coord, [p for p, *_ in A2D2_POINTS], atol=1e-6)  # every point, vehicle frame
    assert not scene.color.any() and not scene.normal.any()


def test_a2d2_view_projects_points_onto_their_row_and_col(a2d2_root):
    """Catches a pose with the A2D2 view axes taken as OpenCV axes, or the camera origin left out."""
    reader = A2D2Reader(a2d2_root)
    with pytest.warns(UserWarning):
        scene = reader.read_scene(f"{DRIVE}_000000091")
    (view,) = reader.read_views(f"{DRIVE}_000000091").views
    assert view.image_path.name == f"{STAMP}_camera_frontcenter_000000091.png"  # no distortion: the file itself
    uv = camera_to_pixel(world_to_camera(scene.coord.astype(np.float64), view.cam_to_world), view.camera)
    np.testing.assert_allclose(uv, [rc for _, rc, *_ in A2D2_POINTS], atol=1e-5)


def test_a2d2_points_in_another_frame_are_refused(a2d2_root):
    message = r"lidar_frontcenter_000000091\.npz: its points land .* pass points_frame='vehicle'"
    with pytest.raises(SceneReadError, match=message):
        A2D2Reader(a2d2_root, points_frame="camera").read_scene(f"{DRIVE}_000000091")


def test_a2d2_splits_are_xmudas(a2d2_root):
    reader = A2D2Reader(a2d2_root)
    assert reader.scene_ids("train") == [f"{DRIVE}_000000091"]
    with pytest.raises(SceneReadError, match="none of the 'test' split's drives 20180807_145028 has a camera"):
        reader.scene_ids("test")
    with pytest.raises(ValueError, match="unknown A2D2 split 'val'"):
        reader.scene_ids("val")


def test_a2d2_bad_inputs_name_the_file(a2d2_root):
    scenes = a2d2_root / "camera_lidar_semantic"
    reader = A2D2Reader(a2d2_root)
    write_a2d2_frame(scenes, "000000092", A2D2_POINTS, with_row=False)
    with pytest.raises(SceneReadError, match=r"lidar_frontcenter_000000092\.npz: no 'row'/'col' arrays"):
        reader.read_scene(f"{DRIVE}_000000092")
    (scenes / "class_list.json").write_text(json.dumps({**COLOURS, "#010203": "Spaceship"}))
    with pytest.raises(SceneReadError, match=r"class_list\.json: class 'Spaceship' is neither merged nor ignored"):
        reader.read_scene(f"{DRIVE}_000000091")
    (a2d2_root / "cams_lidars.json").unlink()
    with pytest.raises(SceneReadError, match=r"cams_lidars\.json: missing"):
        reader.read_views(f"{DRIVE}_000000091")
    with pytest.raises(SceneReadError, match=r"000000093\.png for scene 20180810_142822_000000093, expected one"):
        reader.read_scene(f"{DRIVE}_000000093")


def test_a2d2_distortion_model_against_hand_values(tmp_path):
    path = tmp_path / "cams_lidars.json"
    path.write_text(json.dumps(cams_lidars((0.1, 0.0, 0.02, 0.04, 0.0))))
    camera = read_front_camera(path)
    # pixel (51.5, 19.5): x = 20 / 40 = 0.5, y = 0; r2 = 0.25; radial 1.025;
    # xd = 0.5125 + p2 (r2 + 2 x^2) = 0.5125 + 0.04 * 0.75 = 0.5425; yd = p1 r2 = 0.005
    expected = [[31.5 + 40 * 0.5425, 19.5 + 40 * 0.005]]
    np.testing.assert_allclose(distorted_pixels(np.array([[51.5, 19.5]]), camera), expected)


def test_a2d2_labels_and_image_are_undistorted(a2d2_root):
    """Catches labels read at the undistorted pixel of a distorted label image, and an image fed to the
    teacher without undistortion."""
    (a2d2_root / "cams_lidars.json").write_text(json.dumps(cams_lidars((0.1, 0.0, 0.0, 0.0, 0.0))))
    scenes = a2d2_root / "camera_lidar_semantic"
    # a vehicle point at depth 10 stored at (col, row) = (55, 20): x = 23.5 / 40 = 0.5875, y = 0.0125,
    # r2 = 0.34531, radial 1.034531: its label comes from the original pixel (55.81, 20.02) -> (56, 20)
    point = ((11.7, -5.875, 0.775), (55.0, 20.0), (0xB4, 0x32, 0xB4), 0)
    ramp = np.repeat((np.arange(A2D2_W) * 3).astype(np.uint8)[None, :, None], 3, axis=2).repeat(A2D2_H, axis=0)
    write_a2d2_frame(scenes, "000000094", [point], image=ramp)
    label_png = scenes / DRIVE / "label" / "cam_front_center" / f"{STAMP}_label_frontcenter_000000094.png"
    labels = np.array(Image.open(label_png))
    labels[20, 56] = (255, 0, 0)  # Car 1 at the source pixel; Sidewalk at the undistorted one
    Image.fromarray(labels).save(label_png)
    reader = A2D2Reader(a2d2_root, undistorted_dir=a2d2_root / "undist")
    assert reader.read_scene(f"{DRIVE}_000000094").label.tolist() == [0]

    (view,) = reader.read_views(f"{DRIVE}_000000094").views
    name = f"{STAMP}_camera_frontcenter_000000094.png"
    assert view.image_path == a2d2_root / "undist" / DRIVE / "camera" / "cam_front_center" / name
    undistorted = np.array(Image.open(view.image_path))
    source_u = 31.5 + 40 * 0.5875 * 1.0345313  # bilinear on a ramp of 3 per column is exact
    assert abs(int(undistorted[20, 55, 0]) - 3 * source_u) <= 0.5
    assert undistorted[20, 63].tolist() == [0, 0, 0]  # its source lies right of the original image
    stamp = view.image_path.stat().st_mtime_ns
    assert reader.read_views(f"{DRIVE}_000000094").views[0].image_path.stat().st_mtime_ns == stamp  # written once
    assert not list(view.image_path.parent.glob(".*partial*"))


def test_prep_dry_run_surveys_semantickitti(kitti_root, tmp_path):
    """`tttkd-prep extract --dataset semantickitti --dry-run`: one line per sweep, a broken one named."""
    from typer.testing import CliRunner

    from tttkd.cli.prep import app

    bin_path = kitti_root / "sequences" / "00" / "velodyne" / "000007.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    args = ["extract", "--dataset", "semantickitti", "--root", str(kitti_root), "--out", str(tmp_path / "s.zarr"),
            "--dry-run", "--split"]
    result = CliRunner().invoke(app, args + ["test"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "08_000123" in result.output and "1 scenes ready, 0 with problems" in result.output
    result = CliRunner().invoke(app, args + ["all"], terminal_width=200)
    assert "00_000007" in result.output and "1 with problems" in result.output
    assert not (tmp_path / "s.zarr").exists()
