"""The shift-family suite runner: cells per (family, seed, row), resume, the mean ± std table, the demo table."""

import json
import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr

from tttkd.adapt import AdaptConfig
from tttkd.suite import (SuiteConfig, cell_path, cpu_suite, load_cells, mean_std, run_suite, write_json_atomic)
from tttkd.train import TrainConfig


class ReadyWorkspace:
    """Caches and checkpoints made by the session fixtures instead of generated and trained ones."""

    device = "cpu"

    def __init__(self, cache, checkpoint):
        self.cache_path, self.checkpoint = cache, checkpoint
        self.calls = []

    def cache(self, domain, seed):
        return self.cache_path

    def model(self, domain, seed, kind):
        self.calls.append((domain, seed, kind))
        return self.checkpoint


@pytest.fixture(scope="module")
def split_cache(synth_cache, tmp_path_factory):
    cache = tmp_path_factory.mktemp("suite") / "cache.zarr"
    shutil.copytree(synth_cache, cache)
    scenes = zarr.open_group(cache, mode="r+", zarr_format=3)["scenes"]
    for scene_id, split in (("scene0000_00", "train"), ("scene0001_00", "val"), ("scene0002_00", "val")):
        scenes[scene_id].attrs["split"] = split
    return cache


def tiny(**changes) -> SuiteConfig:
    config = SuiteConfig(name="test", scenes=3, val_fraction=0.5, views=3, seeds=(0, 1), families=("sensor",),
                         rows=("Source-Only", "TTT-KD"), train=TrainConfig(model="small", epochs=1),
                         adapt=AdaptConfig(steps=2, lr=0.1, rotations=1, kd_points=256))
    return replace(config, **changes)


def run(config, out, split_cache, joint_checkpoint, **kwargs):
    return run_suite(config, out, workspace=ReadyWorkspace(split_cache, joint_checkpoint), log=lambda m: None,
                     **kwargs)


def cell_string(table: str, row: str, column: int) -> str:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
    return line.split("|")[column + 2].strip()


def test_suite_cells_reproduce_and_the_table_comes_from_the_per_seed_cells(split_cache, joint_checkpoint, tmp_path):
    config = tiny()
    first = run(config, tmp_path / "x", split_cache, joint_checkpoint)
    assert (first.done, first.total, first.stopped) == (4, 4, False) and len(first.ran) == 4
    cells = load_cells(tmp_path / "x")
    assert {(c["family"], c["seed"], c["row"]) for c in cells} == {
        ("sensor", s, r) for s in (0, 1) for r in ("Source-Only", "TTT-KD")}
    ttt = {c["seed"]: c for c in cells if c["row"] == "TTT-KD" and c["family"] == "sensor"}
    # TTT-KD scenes are saved one by one and add up to the cell: its mIoU is that of the summed confusions
    assert sorted(ttt[0]["target_scenes"]) == ["scene0001_00", "scene0002_00"]
    assert set(ttt[0]["result"]["per_scene_miou"]) == {"scene0001_00", "scene0002_00"}
    assert set(ttt[0]["result"]["miou_by_step"]) == {"0", "1", "2"}
    assert ttt[0]["changed"] == ["coord_noise_m", "color_noise", "density_per_m2", "missing_normals"]
    # the seed draws the adaptation samples: seeds differ (a rerun of a seed gives the same cell: next test)
    assert ttt[0]["result"]["kd_loss_by_step"] != ttt[1]["result"]["kd_loss_by_step"]

    # the Markdown table's mean ± std equal those recomputed from the per-seed JSON
    table = (tmp_path / "x" / "results.md").read_text()
    assert "| row | sensor |" in table
    for row in ("Source-Only", "TTT-KD"):
        for column, family in enumerate(("sensor",)):
            values = [100 * c["result"]["miou"] for c in cells if c["row"] == row and c["family"] == family]
            assert len(values) == 2
            assert cell_string(table, row, column) == f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"
    record = json.loads((tmp_path / "x" / "results.json").read_text())
    assert record["table"]["TTT-KD"]["sensor"]["seeds"] == [0, 1]
    assert record["families"]["sensor"]["parameters"]["missing_normals"] == 0.3
    assert (tmp_path / "x" / "miou_vs_steps_sensor.png").stat().st_size > 10_000


def test_a_rerun_skips_finished_cells_and_redoes_half_written_ones_identically(split_cache, joint_checkpoint,
                                                                               tmp_path):
    config = tiny(seeds=(0,), families=("none",))
    out = tmp_path / "out"
    assert run(config, out, split_cache, joint_checkpoint).done == 2
    source_only = cell_path(out, 0, "none", "Source-Only")
    ttt = cell_path(out, 0, "none", "TTT-KD")
    before = {p: p.read_bytes() for p in (source_only, ttt)}
    again = run(config, out, split_cache, joint_checkpoint)
    assert again.ran == [] and again.done == 2 and all(p.read_bytes() == b for p, b in before.items())
    # a cell cut short mid-write, and a TTT-KD scene lost with it: both are redone, nothing else
    source_only.write_text(before[source_only].decode()[:100])
    ttt.unlink()
    part = ttt.with_suffix("") / "scene0002_00.json"
    part.unlink()
    (ttt.parent / "tent.json.tmp123").write_text("{")  # a temporary file a killed run left
    workspace = ReadyWorkspace(split_cache, joint_checkpoint)
    redo = run_suite(config, out, workspace=workspace, log=lambda m: None)
    assert sorted(redo.ran) == sorted(str(p.relative_to(out)) for p in (source_only, ttt))
    scores = lambda text: {k: json.loads(text)["result"][k] for k in ("miou", "confusion_by_step")}
    assert part.exists() and scores(source_only.read_text()) == scores(before[source_only])
    assert json.loads(ttt.read_text())["result"]["confusion_by_step"] == json.loads(before[ttt])["result"]["confusion_by_step"]
    # cells of another protocol are never mixed in
    with pytest.raises(ValueError, match="made with another protocol"):
        run(replace(config, adapt=replace(config.adapt, lr=1.0)), out, split_cache, joint_checkpoint)


def test_processes_sharing_a_cells_scenes_give_the_cell_one_process_gives(split_cache, joint_checkpoint, tmp_path):
    config = tiny(seeds=(0,), rows=("TTT-KD", "control: TTT-KD, shuffled targets"))
    run(config, tmp_path / "one", split_cache, joint_checkpoint)
    shared = run(replace(config, jobs=2), tmp_path / "two", split_cache, joint_checkpoint)
    assert shared.done == 2 and not shared.stopped
    for row in config.rows:
        one, two = (json.loads(cell_path(tmp_path / d, 0, "sensor", row).read_text())["result"] for d in ("one", "two"))
        assert set(two["per_scene_miou"]) == {"scene0001_00", "scene0002_00"}
        for key in ("confusion_by_step", "per_scene_miou", "miou_by_step", "updates"):
            assert two[key] == one[key], (row, key)
    # jobs is how the work is shared, not what it computes: the same protocol, so cells mix
    assert replace(config, jobs=4).protocol() == config.protocol()
    assert replace(config, scene_gpus=("0", "1")).protocol() == config.protocol()


def test_scenes_spread_over_gpus_run_each_in_a_process_that_sees_only_its_gpu(split_cache, joint_checkpoint,
                                                                              tmp_path, monkeypatch):
    # on CPU the scene still runs on the CPU; what is checked is the process each scene ran in
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    config = tiny(seeds=(0,), rows=("TTT-KD",))
    run(config, tmp_path / "one", split_cache, joint_checkpoint)
    assert run(replace(config, scene_gpus=("5", "7")), tmp_path / "gpus", split_cache, joint_checkpoint).done == 1
    cell = cell_path(tmp_path / "gpus", 0, "sensor", "TTT-KD")
    visible = {json.loads(p.read_text())["cuda_visible_devices"] for p in cell.with_suffix("").glob("*.json")}
    assert visible == {"5", "7"}  # the two scenes, one on each GPU's process
    assert json.loads(cell.read_text())["result"]["confusion_by_step"] == json.loads(
        cell_path(tmp_path / "one", 0, "sensor", "TTT-KD").read_text())["result"]["confusion_by_step"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # this process's own GPU is left as it was


def test_cells_name_the_trained_instance_they_used_and_the_table_says_when_a_seed_mixes_two(
        split_cache, joint_checkpoint, tmp_path):
    from tttkd.pipeline.teacher import file_sha256

    config = tiny(seeds=(0,))
    out = tmp_path / "out"
    run(config, out, split_cache, joint_checkpoint)
    cells = load_cells(out)
    assert {c["model_sha256"] for c in cells} == {file_sha256(joint_checkpoint)}
    assert "trained instances" not in (out / "results.md").read_text()
    # a cell redone with a model retrained elsewhere (another digest): reported, not hidden
    path = cell_path(out, 0, "sensor", "TTT-KD")
    record = json.loads(path.read_text())
    record["model_sha256"], record["parts_model_sha256"] = "f" * 64, ["f" * 64]
    write_json_atomic(path, record)
    source_only = json.loads(cell_path(out, 0, "sensor", "Source-Only").read_text())
    assert source_only["model_sha256"] == file_sha256(joint_checkpoint)
    from tttkd.suite import write_summary

    summary = write_summary(out, config)
    assert summary["mixed_model_instances"] == []  # Source-Only and TTT-KD use different model roles
    record["row"] = "control: TTT-KD, shuffled targets"  # same role (joint) as TTT-KD, the recorded digest
    write_json_atomic(cell_path(out, 0, "sensor", record["row"]), {
        **record, "model_sha256": file_sha256(joint_checkpoint), "parts_model_sha256": [file_sha256(joint_checkpoint)]})
    summary = write_summary(out, replace(config, rows=config.rows + (record["row"],)))
    assert summary["mixed_model_instances"] == ["seed 0, joint: 2 trained instances"]
    assert "seed 0, joint: 2 trained instances" in (out / "results.md").read_text()

    # an offline cell whose scenes were adapted by two instances (one call, then a retrained model)
    out = tmp_path / "parts"
    run(config, out, split_cache, joint_checkpoint)
    ttt = cell_path(out, 0, "sensor", "TTT-KD")
    part = ttt.with_suffix("") / "scene0002_00.json"
    assert json.loads(part.read_text())["model_sha256"] == file_sha256(joint_checkpoint)
    moved = json.loads(part.read_text())
    write_json_atomic(part, {**moved, "model_sha256": "e" * 64})
    ttt.unlink()
    run(config, out, split_cache, joint_checkpoint)
    assert sorted(json.loads(ttt.read_text())["parts_model_sha256"]) == sorted([file_sha256(joint_checkpoint), "e" * 64])
    assert write_summary(out, config)["mixed_model_instances"] == ["seed 0, joint: 2 trained instances"]


def test_processes_of_one_seed_each_sharing_an_out_folder_make_one_table_of_all_seeds(split_cache, joint_checkpoint,
                                                                                    tmp_path):
    from tttkd.suite import with_defaults

    for seed in (0, 1):
        run(tiny(seeds=(seed,), rows=("Source-Only",)), tmp_path, split_cache, joint_checkpoint)
    table = (tmp_path / "results.md").read_text()
    assert "mean ± std over seeds 0, 1" in table and "(n=" not in table.split("###")[1]
    # cells written before `setting` and `adapt.tf32` existed are read as what they were
    path = cell_path(tmp_path, 0, "sensor", "Source-Only")
    record = json.loads(path.read_text())
    old = json.loads(json.dumps(record["protocol"]))
    del old["setting"], old["adapt"]["tf32"]
    write_json_atomic(path, {**record, "protocol": old})
    assert with_defaults(old) == record["protocol"]
    again = run(tiny(seeds=(0,), rows=("Source-Only",)), tmp_path, split_cache, joint_checkpoint)
    assert again.ran == [] and again.done == 1


def test_max_minutes_stops_cleanly_before_a_unit_that_would_not_fit(split_cache, joint_checkpoint, tmp_path):
    stopped = run(tiny(families=("sensor", "none")), tmp_path, split_cache, joint_checkpoint, max_minutes=0)
    assert stopped.stopped and stopped.done == 0 and stopped.total == 8 and load_cells(tmp_path) == []
    assert (tmp_path / "results.md").exists()


def test_the_clock_remembers_the_longest_unit_of_each_kind_per_device_across_calls(tmp_path):
    from tttkd.suite import Clock

    record = tmp_path / "durations.json"
    first = Clock(10, record, "gpu-x")
    first.took("train", 300.0)
    first.took("train", 100.0)
    assert first.fits("train") and first.fits("ttt-kd")
    later = Clock(6, record, "gpu-x")  # a later call of 6 minutes, 2 of them gone: a 5-minute training waits
    later.deadline -= 120
    assert not later.fits("train") and later.fits("ttt-kd")
    assert Clock(6, record, "cpu").fits("train")  # another device's durations do not count
    # a unit recorded as longer than a whole call still starts first in one, or it would never run again
    short = Clock(4, record, "gpu-x")
    assert short.fits("train") and short.longest["train"] == 0.9 * 240
    record.write_text("{not json")
    assert Clock(4, record, "gpu-x").fits("train")  # a damaged record is ignored, never fatal


def test_atomic_write_leaves_no_partial_file_and_mean_std_uses_the_sample_std(tmp_path):
    path = tmp_path / "c" / "cell.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["cell.json"]
    assert mean_std([0.2, 0.4]) == pytest.approx((30.0, 100 * np.std([0.2, 0.4], ddof=1)))
    assert mean_std([0.25]) == (25.0, 0.0)


def test_presets_follow_the_protocol():
    from tttkd.suite import gpu_suite

    gpu = gpu_suite()
    assert (gpu.train.model, gpu.adapt.lr, gpu.adapt.steps, gpu.adapt.rotations, gpu.adapt.kd_points) == (
        "minkunet34c", 1.0, 100, 8, 16384)
    assert round(gpu.scenes * gpu.val_fraction) >= 16 and len(gpu.seeds) == 3
    assert cpu_suite().train.model == "small" and cpu_suite().protocol() != gpu.protocol()


def test_configs_that_differ_never_share_data_caches_or_models_in_one_work_folder(synth_cache, joint_checkpoint,
                                                                                 tmp_path):
    from tttkd.suite import Clock, Workspace, gpu_suite

    def paths(config):
        space = Workspace(config, tmp_path, device="cpu", log=lambda m: None, clock=Clock(None), bars=False)
        return (space.root("a", 0), space.store("a", 0), space.run_dir("a", 0, "joint"),
                space.run_dir("a", 0, "source_only"))

    base = cpu_suite()
    same = paths(replace(base, workers=7, train=replace(base.train, workers=5)))  # workers change no result
    assert same == paths(base) and len(set(same)) == 4
    data, store, joint, source_only = paths(base)
    # another teacher or max_views: same generated rooms, another cache and other models
    for other in (replace(base, teacher="efficientnet_lite2"), replace(base, max_views=2)):
        o_data, o_store, o_joint, o_source_only = paths(other)
        assert o_data == data and o_store != store and {o_joint, o_source_only}.isdisjoint({joint, source_only})
    # other rooms, or another training config: nothing (or only the models) shared
    for other in (replace(base, scenes=9), replace(base, views=5), replace(base, val_fraction=0.5), gpu_suite()):
        assert set(paths(other)).isdisjoint(paths(base))
    o_data, o_store, o_joint, _ = paths(replace(base, train=replace(base.train, epochs=9)))
    assert (o_data, o_store) == (data, store) and o_joint != joint
    assert all(tmp_path in p.parents for p in paths(replace(base, teacher="../../evil")))

    # files put where they do not belong are refused before reuse: a lite0 cache under lite2's key,
    # a checkpoint of another training config under this config's run
    config = replace(base, scenes=3, teacher="efficientnet_lite2")
    space = Workspace(config, tmp_path, device="cpu", log=lambda m: None, clock=Clock(None), bars=False)
    space.generated.add(0)  # the rooms count as generated: no generation here
    shutil.copytree(synth_cache, space.store("a", 0))
    with pytest.raises(ValueError, match="a cache of .*efficientnet_lite0"):
        space.cache("a", 0)
    space = Workspace(replace(config, teacher="efficientnet_lite0"), tmp_path, device="cpu", log=lambda m: None,
                      clock=Clock(None), bars=False)
    space.generated.add(0)
    shutil.copytree(synth_cache, space.store("a", 0))
    assert space.cache("a", 0) == space.store("a", 0)  # a matching, complete cache is reused as it is
    space.run_dir("a", 0, "joint").mkdir(parents=True)
    shutil.copy(joint_checkpoint, space.run_dir("a", 0, "joint") / "last.pt")
    with pytest.raises(ValueError, match="trained with another config"):
        space.model("a", 0, "joint")


def test_demo_table_fits_100_columns_and_gives_the_change_against_source_only():
    from tttkd.cli.demo import short_table

    rows = {"Source-Only": 0.2, "Joint-Train": 0.18, "TENT": 0.25, "TTT-KD": 0.3125}
    lines = short_table(rows).splitlines()
    assert max(len(line) for line in lines) <= 100
    ttt = next(line for line in lines if line.startswith("TTT-KD "))
    assert re.search(r"31\.2\s+\+11\.2", ttt) and re.search(r"18\.0\s+-2\.0", next(
        line for line in lines if line.startswith("Joint-Train")))


def test_the_outdoor_suite_runs_table_2s_rows_from_generated_streets_to_the_table(tmp_path):
    """The real workspace on CPU: two LiDAR domains of 5 streets (3 train, 1 val, 1 test frames),
    their caches, the scn_unet models, the 2D head, every Table 2 row and the control."""
    from tttkd.suite import OUTDOOR_ROWS, Workspace, Clock, outdoor_suite
    from tttkd.pipeline.cache import FeatureCache

    base = outdoor_suite()
    assert (base.train.model, base.train.data.input_features, base.train.data.voxel_size_m) == ("scn_unet", "xyz", 0.05)
    assert (base.adapt.steps, base.adapt.lr, base.adapt.rotations) == (25, 0.1, 4) and len(base.seeds) == 3
    config = replace(base, name="tiny-outdoor", scenes=5, seeds=(0,), workers=2,
                     train=replace(base.train, epochs=2, batch_size=2),
                     adapt=AdaptConfig(steps=2, lr=0.1, rotations=2, kd_points=512))
    out = tmp_path / "out"
    result = run_suite(config, out, device="cpu", log=lambda m: None)
    assert (result.done, result.total) == (12, 12)
    cells = load_cells(out)
    assert {c["row"] for c in cells if c["family"] == "lidar"} == set(OUTDOOR_ROWS)
    oracle = next(c for c in cells if c["row"] == "Oracle")
    space = Workspace(config, out / "work", device="cpu", log=lambda m: None, clock=Clock(None), bars=False)
    assert oracle["result"]["checkpoint"] == str(space.run_dir("target", 0, "joint") / "last.pt")
    assert oracle["changed"] == ["lidar", "lidar_mount"] and oracle["domain"]["lidar"]["beams"] == 64
    assert all(c["target_scenes"] == ["08_000000"] and c["setting"] == "outdoor" for c in cells)  # the test frame
    # the caches hold the train and test frames only; the 2D head sits beside the source's Joint-Train
    assert FeatureCache(space.store("target", 0)).scene_ids() == ["00_000000", "00_000001", "00_000002", "08_000000"]
    assert (space.run_dir("source", 0, "joint") / "head2d.pt").is_file()
    # the table puts Table 2's numbers beside ours, the control has none
    table = (out / "results.md").read_text()
    assert "| row | lidar | none (in-distribution) | paper (SCN), Table 2: A2D2 → SemanticKITTI |" in table
    assert cell_string(table, "TTT-KD", 2) == "49.7" and cell_string(table, "xMUDA", 2) == "38.0"
    assert cell_string(table, "control: TTT-KD, shuffled targets", 2) == "-"
    assert json.loads((out / "results.json").read_text())["paper"]["MM-TTA"] == 42.5
    with pytest.raises(ValueError, match="unknown shift family 'sensor' of the outdoor suite; choose from lidar, none"):
        run_suite(replace(config, families=("sensor",)), out, device="cpu", log=lambda m: None)


def _suite_process(config, out, work, log_path):
    """One suite process of the test below (module level: spawned processes import it)."""
    with open(log_path, "w") as log:
        run_suite(config, out, work=work, device="cpu", log=lambda m: print(m, file=log, flush=True))


def test_processes_sharing_a_work_folder_generate_extract_and_train_each_thing_once(tmp_path):
    """Two processes, one seed, other families, one --work and --out (as one GPU each would run them):
    each domain is generated and extracted once and each model trained once, so both families'
    rows use the same trained instance."""
    from multiprocessing import get_context

    from tttkd.suite import outdoor_suite

    base = outdoor_suite()
    config = replace(base, name="tiny-outdoor", scenes=5, seeds=(0,), workers=1,
                     rows=("Source-Only", "Joint-Train", "TTT-KD"),
                     train=replace(base.train, epochs=2, batch_size=2),
                     adapt=AdaptConfig(steps=1, lr=0.1, rotations=1, kd_points=256))
    out, work = tmp_path / "out", tmp_path / "work"
    context = get_context("spawn")
    processes = [context.Process(target=_suite_process, args=(replace(config, families=(family,)), out, work,
                                                              tmp_path / f"{family}.log"))
                 for family in ("lidar", "none")]
    for process in processes:
        process.start()
    for process in processes:
        process.join(600)
    assert [p.exitcode for p in processes] == [0, 0]
    logs = "".join((tmp_path / f"{family}.log").read_text() for family in ("lidar", "none"))
    assert logs.count("training Joint-Train on source") == 1 and logs.count("training Source-Only on source") == 1
    assert logs.count("extracting source") == 1 and logs.count("extracting target") == 1
    generated = re.findall(r"generating outdoor scenes of (.*)", logs)
    assert sorted(d for line in generated for d in line.split(", ")) == ["source", "target"]
    cells = load_cells(out)
    assert {(c["family"], c["row"]) for c in cells} == {(f, r) for f in ("lidar", "none") for r in config.rows}
    digests = {c["family"]: c["model_sha256"] for c in cells if c["row"] == "Joint-Train"}
    assert digests["lidar"] == digests["none"]
    # whichever process wrote the table last, it holds both families
    assert "| row | lidar | none (in-distribution) |" in (out / "results.md").read_text()


def test_scene_gpus_on_a_cpu_device_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from tttkd.cli.main import app

    result = CliRunner().invoke(app, ["bench", "accuracy", "--suite", "cpu", "--scene-gpus", "0,1", "--device", "cpu",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "--scene-gpus 0,1: takes GPUs, and the device is cpu" in result.output
    assert not (tmp_path / "x").exists()  # refused before any work


def test_the_table_gives_a_single_seeds_value_without_a_spread_and_marks_missing_seeds():
    from tttkd.suite import markdown_summary

    table = {"TTT-KD": {"sensor": {"mean": 80.31, "std": 1.5, "n": 2}, "all": {"mean": 17.4, "std": 0.0, "n": 1}}}
    text = markdown_summary(table, ["sensor", "all"], title="t", seeds=2)
    assert "| TTT-KD | 80.3 ± 1.5 | 17.4 (n=1) |" in text
    one = markdown_summary({"TTT-KD": {"all": {"mean": 17.4, "std": 0.0, "n": 1}}}, ["all"], title="t", seeds=1)
    assert "| TTT-KD | 17.4 |" in one


def test_the_steps_table_is_each_steps_mean_and_sample_std_over_the_per_seed_cells():
    from tttkd.suite import SHUFFLED, steps_table, summarise

    def cell(seed, row, by_step):
        return {"seed": seed, "family": "sensor", "row": row,
                "result": {"miou": by_step["100"], "miou_by_step": by_step}}

    cells = [cell(0, "TTT-KD", {"0": 0.70, "10": 0.80, "100": 0.72}),  # cells hold fractions, tables points
             cell(1, "TTT-KD", {"0": 0.72, "10": 0.82, "100": 0.76}),
             cell(0, SHUFFLED, {"0": 0.70, "10": 0.60, "100": 0.14}),
             cell(0, "Joint-Train", {"100": 0.70})]  # one score, no steps: not a line of its own
    text = steps_table(summarise(cells, ["sensor"]), ["sensor"])
    assert "| family | row | 0 | 10 | 100 |" in text
    assert "| sensor | TTT-KD | 71.0 ± 1.4 | 81.0 ± 1.4 | 74.0 ± 2.8 |" in text
    assert f"| sensor | {SHUFFLED} | 70.0 | 60.0 | 14.0 |" in text and "Joint-Train" not in text
    assert steps_table(summarise(cells[3:], ["sensor"]), ["sensor"]) == ""


def test_input_features_of_another_kind_is_a_one_line_error_and_xyz_cells_are_a_protocol_of_their_own(tmp_path):
    from typer.testing import CliRunner

    from tttkd.cli.main import app

    result = CliRunner().invoke(app, ["bench", "accuracy", "--suite", "cpu", "--input-features", "rgb", "--device",
                                      "cpu", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--input-features 'rgb': choose color_normal or xyz" in result.output
    config = cpu_suite()
    xyz = replace(config, train=replace(config.train, data=replace(config.train.data, input_features="xyz")))
    assert xyz.protocol()["train"]["data"]["input_features"] == "xyz" and xyz.protocol() != config.protocol()
