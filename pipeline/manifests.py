"""Access to the class lists and split files shipped in `data_manifests/` (package data)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def manifest_dir(dataset: str) -> Path:
    return Path(str(resources.files("tttkd.data_manifests").joinpath(dataset)))


def load_classes(dataset: str) -> dict:
    """The dataset's `classes.json`: names in training order, source ids, ignore index."""
    return json.loads((manifest_dir(dataset) / "classes.json").read_text())


def read_split(dataset: str, split: str, *, root: Path) -> list[str]:
    """Scene ids of a split: `<root>/<dataset>v2_<split>.txt`-style files in the dataset root win
    over the lists shipped in data_manifests/ (they are the user's own)."""
    name = f"{dataset}v2_{split}.txt" if dataset == "scannet" else f"{split}.txt"
    for candidate in (Path(root) / name, manifest_dir(dataset) / name):
        if candidate.is_file():
            return [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(
        f"no split list {name!r} in {root} or {manifest_dir(dataset)}: put the official list in the "
        "dataset root, or choose scenes with --scenes"
    )


def shared_classes(source: str, target: str) -> list[tuple[str, str]]:
    """(name in source, name in target) of each class scored when a `source` model meets `target`
    data (paper Table 5). Datasets of one label space share all their classes."""
    if source == target:
        return [(n, n) for n in load_classes(source)["names"]]
    pairs = json.loads((manifest_dir("") / "shared_classes.json").read_text())["pairs"]
    for pair in pairs:
        if pair["datasets"] == [source, target]:
            return [tuple(c) for c in pair["classes"]]
        if pair["datasets"] == [target, source]:
            return [(t, s) for s, t in pair["classes"]]
    raise ValueError(f"no shared-class map for {source} -> {target} in data_manifests/shared_classes.json")


def paper_label(source: str, target: str) -> str:
    """The header of the paper's column for `source` -> `target`: "paper (Mink)" for Table 1,
    "paper (SCN)" for Table 2 (the backbone each table's numbers come from)."""
    for name in ("paper_table1.json", "paper_table2.json"):
        table = json.loads((manifest_dir("") / name).read_text())
        if any((r["source"], r["target"]) == (source, target) for r in table["results"]):
            return f"paper ({table['backbone']})"
    return "paper"


def paper_results(source: str, target: str) -> dict[str, float]:
    """The paper's mIoU (%) of each row of Table 1 (indoor, Mink backbone) or Table 2 (outdoor,
    a2d2 -> semantickitti) for `source` -> `target`, or {} where the paper has no such experiment
    (e.g. the embedded domains)."""
    for name in ("paper_table1.json", "paper_table2.json"):
        table = json.loads((manifest_dir("") / name).read_text())
        found = next((dict(r["miou"]) for r in table["results"] if (r["source"], r["target"]) == (source, target)), None)
        if found is not None:
            return found
    return {}
