"""The embedded outdoor generator: LiDAR beams as configured, labels of the surfaces hit, images
that agree with the points through calib.txt, the SemanticKITTI bytes, determinism."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from tttkd.pipeline import streets
from tttkd.pipeline.project import camera_to_pixel, world_to_camera
from tttkd.pipeline.scene import Camera


def narrow(lidar, **fields):
    """The sensor over the front 120 degrees at 0.5 degree columns: the same beams, fewer rays."""
    return dataclasses.replace(lidar, horizontal_resolution_deg=0.5, horizontal_fov_deg=120, **fields)


def elevations_deg(points, pitch_down_deg=0.0):
    level = points.astype(np.float64) @ streets._pitch(pitch_down_deg)  # undo the mount's tilt
    return np.degrees(np.arctan2(level[:, 2], np.hypot(level[:, 0], level[:, 1])))


@pytest.mark.parametrize("lidar, mount", [(streets.HDL64E, streets.Mount(0.0, 1.73)),
                                          (streets.VLP16, streets.Mount(1.2, 1.25, 5.0))])
def test_sweep_has_exactly_the_configured_beam_elevations(lidar, mount):
    """Catches wrong beam spacing, a field of view off by the mount's pitch, or noise that bends rays."""
    sweep = streets.scan(streets.build_street(np.random.default_rng(0)), narrow(lidar), mount, np.random.default_rng(1))
    elevation = elevations_deg(sweep.points, mount.pitch_down_deg)
    expected = np.linspace(lidar.fov_up_deg, lidar.fov_down_deg, lidar.beams)
    nearest = np.abs(elevation[:, None] - expected[None, :])
    assert nearest.min(axis=1).max() < 0.01  # every point lies on one of the beams (range noise is along the ray)
    assert len(np.unique(nearest.argmin(axis=1))) == lidar.beams  # and every beam returns
    assert np.ptp(sweep.points[:, 2]) > 5  # not a degenerate sweep


def test_64_beam_sweep_is_denser_than_16_beam_on_the_same_street():
    street = streets.build_street(np.random.default_rng(2))
    dense = streets.scan(street, narrow(streets.HDL64E), streets.Mount(0.0, 1.73), np.random.default_rng(0))
    sparse = streets.scan(street, narrow(streets.VLP16), streets.Mount(1.2, 1.25, 5.0), np.random.default_rng(0))
    assert len(dense.points) > 3 * len(sparse.points)
    # the source sensor sits lower: its ground returns lie 1.25 m below it, the target's 1.73 m
    ground = lambda s: s.points[np.isin(s.label, (streets.ROAD, streets.LANE_MARKING)), 2]
    assert abs(np.median(ground(sparse)) + 1.25) < 0.05 and abs(np.median(ground(dense)) + 1.73) < 0.05


def test_each_point_carries_the_label_of_the_solid_it_hit():
    """Catches a label taken from the wrong box (an off-by-one in the hit index) or the wrong ground region."""
    street = streets.build_street(np.random.default_rng(3))
    mount = streets.Mount(0.0, 1.73)
    sweep = streets.scan(street, narrow(streets.HDL64E, range_noise_m=0.0), mount, np.random.default_rng(0))
    world = sweep.points.astype(np.float64) + [mount.x_m, 0.0, mount.height_m]
    eps = 2e-3
    inside = np.all((world[:, None] >= street.lo[None] - eps) & (world[:, None] <= street.hi[None] + eps), axis=2)
    on_face = inside & np.any((np.abs(world[:, None] - street.lo[None]) < eps)
                              | (np.abs(world[:, None] - street.hi[None]) < eps), axis=2)  # (N, B)
    on_ground = np.abs(world[:, 2]) < eps
    box_ok = np.any(on_face & (street.label[None] == sweep.label[:, None]), axis=1)
    ground_ok = on_ground & (street.ground_label(world[:, 0], world[:, 1]) == sweep.label)
    assert np.all(box_ok | ground_ok)
    present = set(np.unique(sweep.label).tolist())
    assert {streets.ROAD, streets.SIDEWALK, streets.BUILDING, streets.CAR} <= present, present


def test_both_domains_see_a_street_with_the_same_camera():
    """Only the LiDAR differs: through each domain's own Tr, the camera lands at the same place, so one
    street renders to the same image (a Tr built from the wrong mount would move it)."""
    street = streets.build_street(np.random.default_rng(4))
    images = [streets.render(street, streets.DOMAINS[d], streets.calibration(streets.DOMAINS[d], 0.25))[0]
              for d in ("source", "target")]
    assert np.mean(np.all(images[0] == images[1], axis=-1)) > 0.999  # rounding may flip an edge pixel
    tr = [streets.calibration(streets.DOMAINS[d]).velo_to_cam0 for d in ("source", "target")]
    assert not np.allclose(tr[0], tr[1])  # while the LiDAR -> camera transforms differ


def read_calib(path):
    rows = {}
    for line in path.read_text().splitlines():
        key, values = line.split(":", 1)
        rows[key] = np.array(values.split(), dtype=np.float64).reshape(3, 4)
    return rows


@pytest.fixture(scope="module")
def target_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("streets")
    frames = streets.generate(root, domain="target", scenes=3, seed=7, image_scale=0.5)
    return root, frames


def test_layout_bytes_and_calibration(target_root):
    root, frames = target_root
    assert frames == ["00/000000", "07/000000", "08/000000"]  # xMUDA: train 00, val 07, test 08
    for frame in frames:
        seq, name = frame.split("/")
        base = root / "sequences" / seq
        raw = (base / "velodyne" / f"{name}.bin").read_bytes()
        assert len(raw) % 16 == 0 and len(raw) > 16 * 10_000
        assert (base / "labels" / f"{name}.label").stat().st_size == len(raw) // 16 * 4
        points = np.frombuffer(raw, "<f4").reshape(-1, 4)
        assert np.all((points[:, 3] >= 0) & (points[:, 3] <= 1)) and points[:, 3].std() > 0.05
        labels = np.fromfile(base / "labels" / f"{name}.label", "<u4") & 0xFFFF
        assert set(np.unique(labels)) <= set(streets.MATERIAL)
        image = Image.open(base / "image_2" / f"{name}.png")
        assert image.mode == "RGB" and image.size == (621, 188)  # KITTI's 1242 x 375 at half scale
        calib = read_calib(base / "calib.txt")
        assert sorted(calib) == ["P0", "P1", "P2", "P3", "Tr"]
        assert np.allclose(calib["P2"][:, :3], calib["P0"][:, :3]) and calib["P2"][0, 3] > 0  # camera 2 left of 0


def test_image_and_points_agree_through_the_calibration(target_root):
    """Project the sweep with P2 @ Tr from calib.txt: car points land on pixels painted in their car's colour,
    and each point's class is the class the camera sees at its pixel."""
    root, _ = target_root
    base = root / "sequences" / "00"
    points = np.fromfile(base / "velodyne" / "000000.bin", "<f4").reshape(-1, 4)[:, :3].astype(np.float64)
    labels = (np.fromfile(base / "labels" / "000000.label", "<u4") & 0xFFFF).astype(np.int64)
    image = np.asarray(Image.open(base / "image_2" / "000000.png")).astype(np.float64)
    calib = read_calib(base / "calib.txt")
    intrinsics = calib["P2"][:, :3]
    cam2_from_velo = np.eye(4)
    cam2_from_velo[:3] = calib["Tr"]
    cam2_from_velo[:3, 3] += np.linalg.solve(intrinsics, calib["P2"][:, 3])
    camera = Camera(intrinsics, image.shape[1], image.shape[0])
    cam = world_to_camera(points, np.linalg.inv(cam2_from_velo))
    front = np.flatnonzero(cam[:, 2] > 1.0)
    pixel = np.rint(camera_to_pixel(cam[front], camera)).astype(int)
    inside = (pixel[:, 0] >= 0) & (pixel[:, 0] < camera.width) & (pixel[:, 1] >= 0) & (pixel[:, 1] < camera.height)
    index, pixel = front[inside], pixel[inside]
    assert len(index) > 2000

    # the frame regenerates from its seed: the street tells which car each point is on
    street = streets.build_street(np.random.default_rng([7, sum(map(ord, "target")), 0]))
    domain = streets.DOMAINS["target"]
    _, seen = streets.render(street, domain, streets.calibration(domain, 0.5))
    assert np.mean(seen[pixel[:, 1], pixel[:, 0]] == labels[index]) > 0.9

    world = points[index] + [domain.lidar_mount.x_m, 0.0, domain.lidar_mount.height_m]
    cars = np.flatnonzero(street.label == streets.CAR)
    painted = cars[street.color[cars].sum(axis=1) > 0.5]  # bodies and cabins, not the black wheels
    on_box = np.all((world[:, None] >= street.lo[painted] - 0.05) & (world[:, None] <= street.hi[painted] + 0.05), axis=2)
    car_points = np.flatnonzero((labels[index] == streets.CAR) & (on_box.sum(axis=1) == 1))
    assert len(car_points) > 50
    box = painted[on_box[car_points].argmax(axis=1)]
    chroma = lambda rgb: rgb / np.maximum(rgb.sum(axis=-1, keepdims=True), 1e-6)
    pixel_rgb = image[pixel[car_points, 1], pixel[car_points, 0]]
    distance = np.abs(chroma(pixel_rgb) - chroma(street.color[box])).max(axis=1)
    assert np.median(distance) < 0.03 and np.mean(distance < 0.08) > 0.85


def test_same_seed_same_bytes_other_seed_other_street(tmp_path):
    for name, seed in (("x", 5), ("y", 5), ("z", 6)):
        streets.generate(tmp_path / name, domain="source", scenes=1, seed=seed, image_scale=0.25)
    for path in ("velodyne/000000.bin", "labels/000000.label", "image_2/000000.png", "calib.txt"):
        assert (tmp_path / "x/sequences/00" / path).read_bytes() == (tmp_path / "y/sequences/00" / path).read_bytes()
    other = "velodyne/000000.bin"
    assert (tmp_path / "x/sequences/00" / other).read_bytes() != (tmp_path / "z/sequences/00" / other).read_bytes()


def test_processes_sharing_the_frames_write_what_one_process_writes(tmp_path):
    whole = streets.generate(tmp_path / "one", domain="target", scenes=3, seed=2, image_scale=0.25)
    parts = [streets.generate(tmp_path / "two", domain="target", scenes=3, seed=2, image_scale=0.25, frames=frames)
             for frames in (range(0, 3, 2), range(1, 3, 2))]
    assert parts == [["00/000000", "08/000000"], ["07/000000"]] and sorted(sum(parts, [])) == sorted(whole)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 3 * 3 + 3  # a .bin, a .label and an image per frame, a calib.txt per sequence
    for path in files:
        assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "two" / path).read_bytes(), path


def test_unknown_domain_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown outdoor domain 'kitti'; choose one of source, target"):
        streets.generate(tmp_path, domain="kitti", scenes=1, seed=0)


def test_the_semantickitti_reader_reads_the_generated_layout(target_root):
    """The generator writes what the reader expects: xMUDA splits by sequence, every point of a merged class,
    and the reader's camera (from P2 and Tr) puts car points on car pixels of the rendered image."""
    from tttkd.pipeline.semantickitti import SemanticKITTIReader

    root, _ = target_root
    reader = SemanticKITTIReader(root)
    assert [reader.scene_ids(s) for s in ("train", "val", "test")] == [["00_000000"], ["07_000000"], ["08_000000"]]
    scene = reader.read_scene("08_000000")
    assert scene.num_points > 5000 and np.all(scene.label >= 0)  # every generated raw id maps to a merged class
    assert {"car", "road", "sidewalk", "building", "nature"} <= {reader.class_names[i] for i in np.unique(scene.label)}
    (view,) = reader.read_views("08_000000").views
    street = streets.build_street(np.random.default_rng([7, sum(map(ord, "target")), 2]))
    domain = streets.DOMAINS["target"]
    _, seen = streets.render(street, domain, streets.calibration(domain, 0.5))
    pixel = np.rint(camera_to_pixel(world_to_camera(scene.coord.astype(np.float64), view.cam_to_world),
                                    view.camera)).astype(int)
    pixel = np.clip(pixel, 0, [view.camera.width - 1, view.camera.height - 1])
    car = scene.label == reader.class_names.index("car")
    assert np.mean(seen[pixel[car, 1], pixel[car, 0]] == streets.CAR) > 0.9


def test_cli_writes_a_domain_and_refuses_an_unknown_one(tmp_path):
    from typer.testing import CliRunner

    from tttkd.cli.prep import app

    runner = CliRunner()
    result = runner.invoke(app, ["synth-outdoor", "--out", str(tmp_path), "--domain", "source", "--scenes", "1",
                                 "--image-scale", "0.25"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sequences/00/velodyne/000000.bin").stat().st_size > 16 * 1000
    result = runner.invoke(app, ["synth-outdoor", "--out", str(tmp_path), "--domain", "kitti"])
    assert result.exit_code == 1 and "unknown outdoor domain 'kitti'; choose one of source, target" in result.output
