"""The domain-shift experiment: adapt a trained model to every target scene with one method,
score on the classes source and target share, and write the paper's results table.

One table has one class list: the target classes the *source* dataset shares with the target
(`scored_classes`, paper Table 5). Every row is scored on exactly that list, the Oracle (trained on
the target, so its predictions are target classes) included, and the table's cells are placed by
class name.

Rows (paper Tables 1-3): Oracle (a model trained on the target, no adaptation), Source-Only
(trained without KD), Joint-Train (trained with KD, no adaptation), TENT, DUA, AdaContrast (applied
to the Source-Only model when one is given, else to the Joint-Train model), TTT-KD-O and TTT-KD
(Joint-Train model). Every row predicts with the same rotation ensemble.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tttkd.pipeline.cache import FeatureCache
from tttkd.pipeline.manifests import shared_classes

from .adapt import AdaptConfig, TTTKD, load_target_scene, rotated, rotation_angles, ttt_kd_offline
from .baselines import MMTTA, AdaContrast, Dua, Tent, XMuda
from .checkpoint import check_teacher, data_config_of, load_checkpoint, model_from_checkpoint
from .data import kd_basis
from .evaluate import export_ply
from .metrics import SharedLabels, iou_per_class, mean_iou

METHODS = ("none", "tent", "dua", "adacontrast", "xmuda", "mm-tta", "ttt-kd-o", "ttt-kd")
MULTIMODAL = ("xmuda", "mm-tta")  # need the 2D head (head2d.py) beside the checkpoint
CONTROLS = ("ttt-kd-shuffled",)  # TTT-KD with each target paired to a wrong point: must not help
SCENE_INDEPENDENT = ("none", "ttt-kd", "ttt-kd-shuffled")  # no state carried from scene to scene: --gpus spreads them
ROWS = ("Oracle", "Source-Only", "Joint-Train", "TENT", "DUA", "AdaContrast", "xMUDA", "MM-TTA", "TTT-KD-O", "TTT-KD")


@dataclass
class MethodResult:
    row: str
    method: str
    checkpoint: str
    miou: float
    iou: dict[str, float]
    per_scene_miou: dict[str, float]
    updates: int
    seconds: float
    miou_by_step: dict[int, float] = field(default_factory=dict)
    kd_loss_by_step: list[float] = field(default_factory=list)
    confusion_by_step: dict[int, list] = field(default_factory=dict)
    """Step count -> the summed (C, C + 1) shared-class confusion over all scenes (`SharedLabels`):
    results of several runs over disjoint scenes add up to one."""


def record_steps_for(steps: int) -> list[int]:
    """Step counts at which offline TTT-KD is scored in one run (for the mIoU-vs-steps curve)."""
    return sorted({s for s in (0, 1, 2, 5, 10, 25, 50, 100, 200) if s <= steps} | {steps})


def scored_classes(source_dataset: str, target_dataset: str) -> list[str]:
    """Target class names that count in a source -> target experiment: those both datasets have
    (data_manifests/shared_classes.json), in the target's naming."""
    return [target for _, target in shared_classes(source_dataset, target_dataset)]


def target_scene_ids(cache_path: Path, *, split: str) -> list[str]:
    """Complete scenes of a split of the target cache (`all`: every complete scene); a split the
    cache lacks is an error that names the splits it has."""
    cache = FeatureCache(cache_path)
    if split == "all":
        scene_ids = cache.scene_ids()
        if not scene_ids:
            raise ValueError(f"{cache_path}: no complete scenes")
        return scene_ids
    scene_ids = cache.scene_ids(split=split)
    if not scene_ids:
        present = sorted(split or "(no split)" for split in cache.split_counts())
        raise ValueError(f"{cache_path}: no complete scene of split {split!r} (splits present: "
                         f"{', '.join(present) or 'none'}); choose one with --split, or --split all")
    return scene_ids


def shared_labels(checkpoint: dict, provenance: dict, classes: list[str], *, cache_path: Path | str = "cache") -> SharedLabels:
    """Map a checkpoint's predictions and the target's labels onto `classes` (target names). A model
    trained on the target dataset (the Oracle) maps by identity, a source model through the shared
    pairs of its dataset and the target's. A cache or checkpoint whose class list lacks a name its
    dataset should have (made with another class map) is refused, naming the classes."""
    model_dataset = checkpoint.get("dataset") or "scannet"
    source_name = {target: source for source, target in shared_classes(model_dataset, provenance["dataset"])}
    missing = [name for name in classes if name not in source_name]
    if missing:
        raise ValueError(f"a model trained on {model_dataset} has no class for target class(es) {', '.join(missing)} "
                         f"of {provenance['dataset']}; score on the classes it shares with the target")
    absent = [name for name in classes if name not in provenance["class_names"]]
    if absent:
        raise ValueError(f"{cache_path}: its {len(provenance['class_names'])} classes lack {', '.join(absent)} of "
                         f"{provenance['dataset']}: the cache was extracted with another class list; re-extract it")
    absent = [source_name[name] for name in classes if source_name[name] not in checkpoint["class_names"]]
    if absent:
        raise ValueError(f"the checkpoint's {len(checkpoint['class_names'])} classes lack {', '.join(absent)} of "
                         f"{model_dataset}: it was trained on a cache of another class list")
    return SharedLabels(checkpoint["class_names"], provenance["class_names"],
                        [(source_name[name], name) for name in classes])


def run_method(row: str, method: str, checkpoint_path: Path, cache_path: Path, scene_ids: list[str], *,
               config: AdaptConfig, device, classes: list[str] | None = None, export_dir: Path | None = None,
               progress=None, gpus: int = 1, head2d: Path | None = None) -> MethodResult:
    """One row: adapt with `method` on every scene and score on `classes` (target class names; default:
    those the checkpoint's dataset shares with the target). Pass the experiment's `scored_classes` so
    every row of a table, the Oracle included, counts the same classes. xMUDA and MM-TTA read the 2D
    head `head2d` (default: head2d.pt beside the checkpoint)."""
    if method not in METHODS + CONTROLS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if gpus > 1 and method in SCENE_INDEPENDENT and len(scene_ids) > 1:
        # each scene starts from the source weights: spread the scenes over processes (one per GPU)
        from .distributed import spread_scenes

        result = spread_scenes(gpus, row, method, checkpoint_path, cache_path, scene_ids, device=device, config=config,
                               classes=classes, export_dir=export_dir)
        for scene_id in scene_ids if progress is not None else ():
            progress(scene_id)
        return result
    if method == "ttt-kd-shuffled":
        method, config = "ttt-kd", replace(config, shuffle_targets=True)
    start = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_path)
    cache = FeatureCache(cache_path)
    provenance = cache.provenance
    if method in ("ttt-kd", "ttt-kd-o"):
        check_teacher(checkpoint["teacher"], provenance, cache_path=cache_path)
    model = model_from_checkpoint(checkpoint, device=device)
    data_config = data_config_of(checkpoint)
    source_names = checkpoint["class_names"]
    if classes is None:
        classes = scored_classes(checkpoint.get("dataset") or "scannet", provenance["dataset"])
    labels = shared_labels(checkpoint, provenance, classes, cache_path=cache_path)
    steps = record_steps_for(config.steps) if method == "ttt-kd" else [0]
    confusion = {s: 0 for s in steps}
    per_scene, kd_losses = {}, []
    adapter = {"none": None, "ttt-kd": TTTKD, "ttt-kd-o": TTTKD, "tent": Tent, "dua": Dua, "adacontrast": AdaContrast,
               "xmuda": XMuda, "mm-tta": MMTTA}[method]
    if adapter is TTTKD:
        adapter = TTTKD(model, config, basis=kd_basis(cache, device))
    elif adapter in (XMuda, MMTTA):
        from .head2d import head2d_path, load_head2d

        head = load_head2d(head2d or head2d_path(checkpoint_path), class_names=source_names,
                           target_provenance=provenance, cache_path=cache_path, device=device)
        adapter = adapter(model, head, basis=kd_basis(cache, device))
    elif adapter is not None:
        adapter = adapter(model)
    for index, scene_id in enumerate(scene_ids):
        scene = load_target_scene(cache, scene_id, device)
        if method == "ttt-kd":
            logits = ttt_kd_offline(adapter, scene, data_config, record_steps=steps,
                                    kd_losses=kd_losses if index == 0 else None)
        else:
            first = rotated(scene, 0.0, data_config, device)
            if method == "ttt-kd-o" and index % config.stride == 0:
                rng = np.random.default_rng([config.seed, index])
                adapter.step(first, *adapter.sample_targets(scene, first, rng))
            elif method in ("tent", "dua", "adacontrast", *MULTIMODAL):
                adapter.adapt(scene, first, data_config)
            predict = adapter.predict if adapter is not None else _plain_predictor(model)
            total = predict(first)
            for angle in rotation_angles(config.rotations)[1:]:
                total = total + predict(rotated(scene, angle, data_config, device))
            logits = {0: total}
        label = scene.points.label
        for s in steps:
            prediction = logits[s].argmax(1).cpu().numpy()
            scene_confusion = labels.confusion(prediction, label)
            confusion[s] = confusion[s] + scene_confusion
        per_scene[scene_id] = mean_iou(scene_confusion)
        if export_dir is not None:
            export_dir.mkdir(parents=True, exist_ok=True)
            export_ply(export_dir / f"{scene_id}.{method}.ply", scene.points.coord, prediction, len(source_names))
        if progress is not None:
            progress(scene_id)
    final = confusion[steps[-1]]
    return MethodResult(
        row=row, method=method, checkpoint=str(checkpoint_path), miou=mean_iou(final),
        iou={n: float(v) for n, v in zip(labels.names, iou_per_class(final))}, per_scene_miou=per_scene,
        updates=getattr(adapter, "updates", 0), seconds=time.perf_counter() - start,
        miou_by_step={s: mean_iou(c) for s, c in confusion.items()} if method == "ttt-kd" else {},
        kd_loss_by_step=kd_losses, confusion_by_step={s: np.asarray(c).tolist() for s, c in confusion.items()})


def _plain_predictor(model):
    from .adapt import configure

    configure(model).requires_grad_(False)

    @torch.no_grad()
    def predict(rotated_scene):
        return model.seg_head(model.forward_features(rotated_scene.voxels)).float()[rotated_scene.point_to_voxel]

    return predict


def plan_rows(*, joint: Path | None, source_only: Path | None, oracle: Path | None,
              methods: list[str], head2d: bool = False) -> list[tuple[str, str, Path]]:
    """(row, method, checkpoint) of every row the given checkpoints allow, in the paper's order;
    xMUDA and MM-TTA only with a 2D head (`head2d`)."""
    tta_base = source_only or joint
    plan = [("Oracle", "none", oracle), ("Source-Only", "none", source_only), ("Joint-Train", "none", joint),
            ("TENT", "tent", tta_base), ("DUA", "dua", tta_base), ("AdaContrast", "adacontrast", tta_base),
            ("xMUDA", "xmuda", tta_base if head2d else None), ("MM-TTA", "mm-tta", tta_base if head2d else None),
            ("TTT-KD-O", "ttt-kd-o", joint), ("TTT-KD", "ttt-kd", joint)]
    return [(row, method, ckpt) for row, method, ckpt in plan if ckpt is not None and
            (method in methods or (method == "none" and "none" in methods))]


def markdown_table(results: list[MethodResult], *, title: str, classes: list[str],
                   paper: dict[str, float] | None = None, paper_label: str = "paper (Mink)") -> str:
    """One header from `classes`; each row's IoU sits under its class name ("-": no IoU). With
    `paper` (row -> the paper's mIoU, `paper_results`), a column headed `paper_label`
    (`manifests.paper_label`) puts the paper's number beside ours."""
    paper_header, paper_rule = (f"{paper_label} | ", "---:|") if paper else ("", "")
    lines = [f"### {title}", "", f"| method | mIoU | {paper_header}" + " | ".join(classes) + " |",
             "|---|---:|" + paper_rule + "---:|" * len(classes)]
    for r in results:
        values = [r.iou.get(name, float("nan")) for name in classes]
        cells = ["-" if v != v else f"{100 * v:.1f}" for v in values]
        paper_cell = (f"{paper[r.row]:.1f} | " if r.row in paper else "- | ") if paper else ""
        lines.append(f"| {r.row} | {100 * r.miou:.1f} | {paper_cell}" + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_steps(result: MethodResult, path: Path, *, baselines: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(result.miou_by_step)
    ax.plot(steps, [100 * result.miou_by_step[s] for s in steps], marker="o", label="TTT-KD")
    for name, value in baselines.items():
        ax.axhline(100 * value, linestyle="--", linewidth=1, label=name, color=None)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("TTT steps per scene and rotation"), ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: list[MethodResult], out: Path, *, title: str, classes: list[str], config: AdaptConfig,
                  setup: dict, paper: dict[str, float] | None = None, paper_label: str = "paper (Mink)") -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, title=title, classes=classes, paper=paper, paper_label=paper_label)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"title": title, "classes": classes, "config": asdict(config),
                                                  "setup": setup, "paper_miou": paper or {},
                                                  "results": [asdict(r) for r in results]}, indent=1))
    ttt = next((r for r in results if r.method == "ttt-kd"), None)
    if ttt is not None and ttt.miou_by_step:
        plot_steps(ttt, out / "miou_vs_steps.png",
                   baselines={r.row: r.miou for r in results if r.method != "ttt-kd"})
    return table
