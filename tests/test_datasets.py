"""Every dataset reader behind `tttkd-prep extract --dataset NAME`, and the shipped split lists."""

import pytest
from test_custom import make_root as make_custom_fixture
from test_matterport import SCAN, make_matterport_fixture
from test_s3dis import make_s3dis_fixture
from typer.testing import CliRunner

from tttkd.cli.prep import app
from tttkd.pipeline.manifests import read_split

runner = CliRunner()


def test_scannet_official_split_lists_have_their_counts_and_do_not_overlap(tmp_path):
    lists = {split: read_split("scannet", split, root=tmp_path) for split in ("train", "val", "test")}
    assert {s: len(ids) for s, ids in lists.items()} == {"train": 1201, "val": 312, "test": 100}
    assert not (set(lists["train"]) & set(lists["val"])) and not (set(lists["val"]) & set(lists["test"]))


@pytest.mark.parametrize("dataset", ["s3dis", "matterport", "matterport3d", "custom"])
def test_dry_run_reads_each_dataset_through_its_registered_reader(dataset, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    if dataset == "s3dis":
        make_s3dis_fixture(root)
        args = ["--scenes", "Area_1_office_1"]  # the fixture's other room is broken on purpose
    elif dataset.startswith("matterport"):
        make_matterport_fixture(root)
        args = ["--scenes", f"{SCAN}_region0"]
    else:
        make_custom_fixture(root, "ply")
        args = ["--split", "train"]
    result = runner.invoke(app, ["extract", "--dataset", dataset, "--root", str(root), "--dry-run", *args])
    assert result.exit_code == 0, result.output
    assert "1 scenes ready, 0 with problems" in result.output


def test_a_reader_option_of_another_dataset_is_one_clear_error(tmp_path):
    make_s3dis_fixture(tmp_path)
    result = runner.invoke(app, ["extract", "--dataset", "s3dis", "--root", str(tmp_path), "--split", "train",
                                 "--frames-source", "sens", "--dry-run"])
    assert result.exit_code == 1 and "do not all apply to s3dis" in result.output
