"""Every bad input: one line naming the scene or file and what is wrong, and the job goes on.

A bad view (missing or undecodable image or depth, bad pose, bad intrinsics, an image of another
shape) is skipped and counted by reason in the scene's views_skipped; a bad scene (no points, labels
outside the class map, no view sees it, out of memory) fails with one line and the other scenes go
on. Each test corrupts real files of the embedded ScanNet-layout scenes on disk.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tttkd.checkpoint import teacher_of
from tttkd.cli.main import app as tttkd_app
from tttkd.cli.prep import app as prep_app
from tttkd.model import build_model, model_config
from tttkd.pipeline import cache
from tttkd.pipeline.extract import PrepConfig, extract_scene
from tttkd.pipeline.job import run_extraction
from tttkd.pipeline.manifests import load_classes
from tttkd.pipeline.ply import read_ply, write_ply
from tttkd.pipeline.scannet import ScanNetReader
from tttkd.pipeline.scene import Scene
from tttkd.pipeline.synth import generate
from tttkd.pipeline.teacher import load_teacher

runner = CliRunner()
A, B = "scene0000_00", "scene0001_00"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs") / "base"
    generate(root, domain="a", scenes=2, seed=0, views=3)
    return root


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("efficientnet_lite0", device="cpu")


@pytest.fixture
def root(base, tmp_path) -> Path:
    """A fresh copy of the base scenes for a test to corrupt."""
    return Path(shutil.copytree(base, tmp_path / "data"))


def frames(root, scene_id=A) -> Path:
    return root / "scannet_frames_25k" / scene_id


def extract(root, teacher, scene_id=A, reader=None, **config):
    store = root.parent / "c.zarr"
    if not store.exists():
        cache.open_for_writing(store, {"teacher": "efficientnet_lite0"})
    config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=2, **config)
    return extract_scene(reader or ScanNetReader(root), scene_id, teacher=teacher, config=config, store=store,
                         split=None)


def only_view(root, teacher, frame: str):
    """The scene extracted from one of its views alone (the others' colour images removed): the reference."""
    for image in frames(root, A).glob("color/*.jpg"):
        if image.stem != frame:
            image.unlink()
    return extract(root, teacher)


def one_line(reason: str) -> bool:
    return reason and "\n" not in reason


def test_missing_and_unreadable_colour_images_are_skipped_and_counted(root, teacher):
    color = frames(root) / "color"
    (color / "000000.jpg").write_bytes(b"\x89PNG but not really an image" * 4)  # the first: its header gave the camera
    (color / "000100.jpg").unlink()
    (color / "000100.jpg").symlink_to(color / "gone.jpg")  # listed, but missing
    result = extract(root, teacher)
    assert result.status == "done", result.reason
    assert result.num_views == 1 and result.views_skipped == {"unreadable image": 1, "missing image": 1}
    assert "color/000000.jpg: not a readable image" in result.view_errors["unreadable image"]
    assert "color/000100.jpg: no such file" in result.view_errors["missing image"]


def test_truncated_colour_image_and_colour_images_of_other_sizes(root, base, teacher):
    """A truncated JPEG is skipped; a JPEG of another aspect ratio is skipped (its intrinsics would be
    wrong); one at half size is used with rescaled intrinsics and sees what the full-size one sees."""
    color = frames(root) / "color"
    data = (color / "000000.jpg").read_bytes()
    (color / "000000.jpg").write_bytes(data[: len(data) // 2])  # the header still reads
    with Image.open(color / "000100.jpg") as image:
        image.resize((640, 360)).save(color / "000100.jpg")
    with Image.open(color / "000200.jpg") as image:
        image.resize((320, 240)).save(color / "000200.jpg")
    result = extract(root, teacher)
    assert result.status == "done", result.reason
    assert result.views_skipped == {"unreadable image": 1, "image size mismatch": 1} and result.num_views == 1
    assert "000000.jpg: not a readable image (image file is truncated" in result.view_errors["unreadable image"]
    assert "000100.jpg: decoded at 160x90" in result.view_errors["image size mismatch"]
    reference = only_view(Path(shutil.copytree(base, root.parent / "ref")), teacher, "000200")
    assert reference.status == "done" and reference.num_views == 1
    assert abs(result.num_seen - reference.num_seen) <= 0.05 * reference.num_seen


def test_unreadable_depth_and_depth_of_other_sizes(root, base, teacher):
    """A truncated depth PNG (the first: its header gave the depth camera) and one of another aspect
    ratio are skipped; one at half size is used with rescaled depth intrinsics and agrees with the
    full-size one (with the 640x480 camera on it, most points would fail the depth test)."""
    depth = frames(root) / "depth"
    data = (depth / "000000.png").read_bytes()
    (depth / "000000.png").write_bytes(data[:200])
    with Image.open(depth / "000100.png") as image:
        image.resize((640, 360), Image.NEAREST).save(depth / "000100.png")
    with Image.open(depth / "000200.png") as image:
        image.resize((320, 240), Image.NEAREST).save(depth / "000200.png")
    result = extract(root, teacher)
    assert result.status == "done", result.reason
    assert result.views_skipped == {"unreadable depth": 1, "depth size mismatch": 1} and result.num_views == 1
    assert "depth/000000.png: not a readable image" in result.view_errors["unreadable depth"]
    assert "depth/000100.png: 640x360 pixels" in result.view_errors["depth size mismatch"]
    reference = only_view(Path(shutil.copytree(base, root.parent / "ref")), teacher, "000200")
    assert result.num_seen > 1000 and abs(result.num_seen - reference.num_seen) <= 0.1 * reference.num_seen


def test_nan_inf_and_non_rigid_poses_are_skipped_and_counted(root, teacher):
    pose = frames(root) / "pose"
    (pose / "000000.txt").write_text("nan 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    matrix = np.loadtxt(pose / "000100.txt")
    matrix[:3, :3] *= 2  # a scaled rotation: not rigid
    np.savetxt(pose / "000100.txt", matrix)
    result = extract(root, teacher)
    assert result.status == "done" and result.num_views == 1 and result.views_skipped == {"invalid pose": 2}
    (pose / "000200.txt").write_text(("inf " * 4 + "\n") * 4)
    result = extract(root, teacher)
    assert result.status == "failed" and one_line(result.reason)
    assert f"scene {A}: no usable views ({{'invalid pose': 3}})" in result.reason


@pytest.mark.parametrize("name, text, problem", [
    ("intrinsics_color.txt", "0 0 0 0\n0 0 0 0\n0 0 0 0\n0 0 0 1\n", "not a camera matrix (fx=0, fy=0"),
    ("intrinsics_depth.txt", "577 0 319.5 0\n0 0 239.5 0\n0 0 1 0\n0 0 0 1\n", "not a camera matrix (fx=577, fy=0"),
    ("intrinsics_color.txt", "1170 0 647.5\n0 1170 483.5\n", "a 2x3 matrix, expected 4x4"),
    ("intrinsics_color.txt", "fx fy cx cy\n", "intrinsics_color.txt: could not convert"),
])
def test_zero_or_malformed_intrinsics_fail_the_scene_naming_the_file(root, teacher, name, text, problem):
    (frames(root) / name).write_text(text)
    result = extract(root, teacher)
    assert result.status == "failed" and one_line(result.reason)
    assert f"{name}: " in result.reason and problem in result.reason
    assert extract(root, teacher, scene_id=B).status == "done"


def test_non_invertible_intrinsics_of_one_custom_frame_skip_that_frame(root, teacher, tmp_path):
    """Readers with intrinsics per frame (custom): a frame whose K cannot be inverted is skipped."""
    from tttkd.pipeline.custom import CustomReader

    scene = tmp_path / "custom" / "room"
    (scene / "images").mkdir(parents=True)
    shutil.copy(root / "scans" / A / f"{A}_vh_clean_2.ply", scene / "points.ply")
    k = np.loadtxt(frames(root) / "intrinsics_depth.txt")[:3, :3]  # the synth images' own camera
    frame_list = []
    for index, frame in enumerate(("000000", "000100", "000200")):
        shutil.copy(frames(root) / "color" / f"{frame}.jpg", scene / "images")
        frame_k = np.diag([0.0, 0.0, 1.0]) if index == 1 else k
        frame_list.append({"image": f"images/{frame}.jpg", "K": frame_k.tolist(),
                           "cam_to_world": np.loadtxt(frames(root) / "pose" / f"{frame}.txt").tolist()})
    (scene / "cameras.json").write_text(json.dumps({"frames": frame_list}))
    reader = CustomReader(tmp_path / "custom")
    result = extract(root, teacher, scene_id="room", reader=reader)
    assert result.status == "done", result.reason
    assert result.num_views == 2 and result.views_skipped == {"invalid intrinsics": 1}
    assert "images/000100.jpg: intrinsics not invertible (fx=0, fy=0" in result.view_errors["invalid intrinsics"]


def write_mesh(root, scene_id, vertices: np.ndarray, labels: np.ndarray):
    scan = root / "scans" / scene_id
    write_ply(scan / f"{scene_id}_vh_clean_2.ply", vertices)
    write_ply(scan / f"{scene_id}_vh_clean_2.labels.ply", labels)


def test_empty_scene_fails_naming_its_mesh(root, teacher):
    vertices, _ = read_ply(root / "scans" / A / f"{A}_vh_clean_2.ply")
    labels, _ = read_ply(root / "scans" / A / f"{A}_vh_clean_2.labels.ply")
    write_mesh(root, A, vertices[:0], labels[:0])
    result = extract(root, teacher)
    assert result.status == "failed" and one_line(result.reason)
    assert f"{A}_vh_clean_2.ply: no vertices (an empty scan)" in result.reason


def test_a_scene_no_view_sees_fails_with_one_line(root, teacher):
    for path in (frames(root) / "pose").glob("*.txt"):
        pose = np.loadtxt(path)
        pose[:3, 3] += 1000.0  # valid rigid poses, a kilometre away from the room
        np.savetxt(path, pose)
    result = extract(root, teacher)
    assert result.status == "failed" and one_line(result.reason)
    assert f"scene {A}: none of its 3 views sees any of its" in result.reason and "check the poses" in result.reason


@pytest.mark.parametrize("value", [300, -1])
def test_labels_outside_the_nyu40_map_fail_naming_the_labels_file(root, teacher, value):
    vertices, _ = read_ply(root / "scans" / A / f"{A}_vh_clean_2.ply")
    labels, _ = read_ply(root / "scans" / A / f"{A}_vh_clean_2.labels.ply")
    signed = np.empty(len(labels), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("label", "i4")])
    for name in ("x", "y", "z", "label"):
        signed[name] = labels[name]
    signed["label"][[5, 9]] = value  # the old reader clipped these to 0 or 255: silently unlabelled
    write_mesh(root, A, vertices, signed)
    result = extract(root, teacher)
    assert result.status == "failed" and one_line(result.reason)
    assert f"{A}_vh_clean_2.labels.ply: label {value} (2 vertices) is not a nyu40 id 0..40" in result.reason


def test_a_label_index_beyond_the_readers_class_list_fails(root, teacher):
    """Labels a reader returns are checked against its class list, whichever reader it is."""

    class FiveClassReader(ScanNetReader):  # a reader whose class list does not cover its labels
        class_names = ("wall", "floor", "cabinet", "bed", "chair")

    result = extract(root, teacher, reader=FiveClassReader(root))
    assert result.status == "failed" and one_line(result.reason)
    assert f"scene {A}: label " in result.reason and "is not a class index 0..4 of the reader's 5 classes" in result.reason
    # Pointcept's segment20.npy with an index past the 20 classes: refused by the reader, naming the file
    points = root / "pointcept" / "val" / A
    points.mkdir(parents=True)
    np.save(points / "coord.npy", np.random.default_rng(0).random((50, 3), dtype=np.float32))
    np.save(points / "color.npy", np.zeros((50, 3), np.uint8))
    np.save(points / "segment20.npy", np.full(50, 25, np.int64))
    result = extract(root, teacher, reader=ScanNetReader(root, points="pointcept", points_root=root / "pointcept"))
    assert result.status == "failed" and "segment20.npy: value 25 is not a class index 0..19" in result.reason


@pytest.mark.parametrize("error", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_out_of_memory_fails_that_scene_and_the_next_one_goes_on(root, teacher, monkeypatch, error):
    real_features = type(teacher).features
    calls = []

    def huge_scene(self, images):  # the first scene's batch is too big for the device
        calls.append(len(images))
        if len(calls) == 1:
            raise error
        return real_features(self, images)

    monkeypatch.setattr(type(teacher), "features", huge_scene)
    first, second = extract(root, teacher, scene_id=A), extract(root, teacher, scene_id=B)
    assert first.status == "failed" and one_line(first.reason)
    where = "host" if isinstance(error, MemoryError) else "GPU"
    assert f"scene {A}: out of {where} memory (" in first.reason
    assert "lower --batch-size, or split the scene" in first.reason
    assert second.status == "done" and second.num_seen > 0


def test_the_job_reports_each_bad_scene_in_one_line_and_extracts_the_others(base, tmp_path):
    """Through the Dask job: an empty scene, a scene with zero intrinsics and a good one."""
    root = Path(shutil.copytree(base, tmp_path / "data"))
    empty = "scene0002_00"  # a copy of scene A whose mesh is empty
    shutil.copytree(root / "scans" / A, root / "scans" / empty)
    for path in (root / "scans" / empty).iterdir():
        path.rename(path.with_name(path.name.replace(A, empty)))
    shutil.copytree(frames(root, A), frames(root, empty))
    vertices, _ = read_ply(root / "scans" / empty / f"{empty}_vh_clean_2.ply")
    labels, _ = read_ply(root / "scans" / empty / f"{empty}_vh_clean_2.labels.ply")
    write_mesh(root, empty, vertices[:0], labels[:0])
    (frames(root, A) / "intrinsics_color.txt").write_text("0 0 0 0\n" * 4)
    (frames(root, B) / "color" / "000100.jpg").write_bytes(b"")
    config = PrepConfig(dataset="scannet", root=root, teacher="efficientnet_lite0", batch_size=2)
    report = run_extraction(config, out=tmp_path / "c.zarr", scene_ids=[A, B, empty], workers=1, device="cpu",
                            progress=False)
    assert report.done == [B] and sorted(report.failed) == [A, empty]
    assert all(one_line(reason) for reason in report.failed.values())
    assert "intrinsics_color.txt: not a camera matrix" in report.failed[A]
    assert f"{empty}_vh_clean_2.ply: no vertices" in report.failed[empty]
    assert report.views_skipped == {"unreadable image": 1}
    attrs = cache.FeatureCache(tmp_path / "c.zarr").scene_attrs(B)
    assert attrs["views_skipped"] == {"unreadable image": 1} and "000100.jpg" in attrs["view_errors"]["unreadable image"]


@pytest.mark.parametrize("scene_id", ["../x", "a/b", ".hidden"])
def test_a_scene_id_with_a_path_in_it_is_one_line_error(base, tmp_path, scene_id):
    args = ["extract", "--root", str(base), "--model", "efficientnet_lite0", "--device", "cpu",
            "--out", str(tmp_path / "c.zarr"), "--scenes", scene_id]
    result = runner.invoke(prep_app, args)
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert f"invalid scene id {scene_id!r}" in result.output
    assert not (tmp_path / "c.zarr").exists()
    result = runner.invoke(prep_app, args + ["--dry-run"])
    assert result.exit_code == 1 and f"invalid scene id {scene_id!r}" in result.output


@pytest.mark.parametrize("option, value, key", [("--image-scale", "0.5", "image_scale"),
                                                  ("--depth-tolerance", "0.25", "projection"),
                                                  ("--model", "efficientnet_lite1", "teacher")])
def test_a_store_of_another_scale_projection_or_teacher_is_one_line_error(base, tmp_path, option, value, key):
    store = tmp_path / "c.zarr"
    config = PrepConfig(dataset="scannet", root=base, teacher="efficientnet_lite0")
    run_extraction(config, out=store, scene_ids=[], device="cpu", progress=False)  # an empty store of that config
    args = ["extract", "--root", str(base), "--device", "cpu", "--out", str(store), "--scenes", A]
    if option != "--model":
        args += ["--model", "efficientnet_lite0"]
    result = runner.invoke(prep_app, [*args, option, value])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert f"c.zarr: was written with {key}=" in result.output and "write to another --out" in result.output
    assert cache.FeatureCache(store).scene_ids() == []


def small_cache(path: Path, *, class_names: list[str], feature_dim: int = 8) -> Path:
    """A one-scene cache whose provenance lists `class_names` (as a cache of another class map would)."""
    rng = np.random.default_rng(0)
    provenance = {"teacher": "efficientnet_lite0", "feature_dim": feature_dim, "dataset": "scannet",
                  "class_names": class_names, "image_scale": 0.25, "stride": 8, "weights_sha256": "0" * 64}
    cache.open_for_writing(path, provenance)
    n = 400
    scene = Scene(A, rng.random((n, 3), dtype=np.float32) * 3, rng.integers(0, 255, (n, 3), dtype=np.uint8),
                  np.tile(np.float32([0, 0, 1]), (n, 1)), rng.integers(0, len(class_names), n).astype(np.int16))
    cache.write_scene(path, scene, seen_index=np.arange(n), feature=rng.random((n, feature_dim)),
                      view_count=np.ones(n), attrs={"split": None})
    return path


def scannet_checkpoint(path: Path, cache_path: Path, *, feature_dim: int = 8) -> Path:
    """A checkpoint of a small model trained (as far as its record says) on the 20 ScanNet classes."""
    from tttkd.data import DataConfig
    from tttkd.train import TrainConfig

    names = load_classes("scannet")["names"]
    config = model_config("small", num_classes=len(names), kd_dim=feature_dim)
    provenance = {**cache.FeatureCache(cache_path).provenance, "feature_dim": feature_dim}
    torch.save({"model": build_model(config).state_dict(), "model_config": asdict(config),
                "train_config": asdict(TrainConfig(model="small", data=DataConfig(voxel_size_m=0.1))),
                "class_names": names, "dataset": "scannet", "teacher": teacher_of(provenance)}, path)
    return path


def test_adapt_on_a_cache_of_another_class_list_or_teacher_dimension_is_one_line_error(tmp_path):
    names = load_classes("scannet")["names"]
    good = small_cache(tmp_path / "good.zarr", class_names=names)
    checkpoint = scannet_checkpoint(tmp_path / "joint.pt", good)
    other = ["walls" if n == "wall" else n for n in names]  # same size, another class map
    adapt = ["adapt", "--source", "scannet", "--target", "x", "--checkpoint", str(checkpoint), "--split", "all",
             "--method", "ttt-kd", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "results")]
    for cache_path, message in [
        (small_cache(tmp_path / "other.zarr", class_names=other), "other.zarr: its 20 classes lack wall of scannet"),
        (small_cache(tmp_path / "dim.zarr", class_names=names, feature_dim=16), "dim.zarr: cache has feature_dim=16"),
    ]:
        result = runner.invoke(tttkd_app, adapt + ["--cache", str(cache_path)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith("error: ")
        assert sum(line.startswith("error") for line in result.output.splitlines()) == 1


@pytest.mark.parametrize("names", [lambda n: n[:13], lambda n: ["walls"] + n[1:]],
                         ids=["fewer classes", "a renamed class"])
def test_train_resume_on_a_cache_of_another_class_list_is_one_line_error(tmp_path, names):
    """A class list of another length (the head would not load) or of the same length with other
    names (it would load and silently learn other meanings)."""
    scannet = load_classes("scannet")["names"]
    other = small_cache(tmp_path / "other.zarr", class_names=names(scannet))
    (tmp_path / "run").mkdir()
    scannet_checkpoint(tmp_path / "run" / "last.pt", other)
    result = runner.invoke(tttkd_app, ["train", "--cache", str(other), "--out", str(tmp_path / "run"), "--resume",
                                       "--split", "all", "--val-split", "none", "--model", "small", "--workers", "0",
                                       "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert "other.zarr: cache of 'scannet' has " in result.output and "another --out" in result.output
