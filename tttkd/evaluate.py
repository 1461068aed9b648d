"""Evaluation on a feature cache: per-point predictions (every point takes its voxel's), one
confusion matrix over all scenes, mIoU and per-class IoU, optional PLY export coloured by class.

A model trained on another dataset than the cache's is scored on the classes both share (paper
Table 5, `data_manifests/shared_classes.json`), as the adaptation experiment scores it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tttkd.pipeline.cache import FeatureCache
from tttkd.pipeline.manifests import shared_classes
from tttkd.pipeline.ply import write_ply

from .data import DataConfig, EvalScene, eval_scene
from .metrics import SharedLabels, confusion_matrix, iou_per_class, mean_iou
from .model import TTTKDNet, sparse_input


@dataclass
class EvalResult:
    miou: float
    iou: dict[str, float]
    confusion: np.ndarray
    scenes: int
    points: int

    def to_json(self) -> dict:
        return {"miou": self.miou, "iou": self.iou, "scenes": self.scenes, "points": self.points,
                "confusion": self.confusion.tolist()}


def scene_input(scene: EvalScene, device):
    grid = torch.from_numpy(scene.grid_coord).to(device)
    return sparse_input(grid, torch.zeros(len(grid), dtype=torch.int32, device=device),
                        torch.from_numpy(scene.features).to(device), 1)


@torch.no_grad()
def predict_logits(model: TTTKDNet, scene: EvalScene, device) -> torch.Tensor:
    """(V, C) voxel logits of one scene, the model in eval mode (running BN statistics)."""
    model.eval()
    return model.seg_head(model.forward_features(scene_input(scene, device))).float()


def class_palette(num_classes: int) -> np.ndarray:
    """Distinct colours per class (golden-ratio hues), (C, 3) uint8."""
    import colorsys

    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.75, 0.95)]
                     for i in range(num_classes)], dtype=np.uint8)


def export_ply(path: Path, coord: np.ndarray, prediction: np.ndarray, num_classes: int) -> None:
    vertex = np.empty(len(coord), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                         ("blue", "u1"), ("label", "u2")])
    colors = class_palette(num_classes)[prediction]
    vertex["x"], vertex["y"], vertex["z"] = coord.T
    vertex["red"], vertex["green"], vertex["blue"] = colors.T
    vertex["label"] = prediction
    write_ply(path, vertex)


def evaluate(model: TTTKDNet, cache_path: Path, scene_ids: list[str], *, data_config: DataConfig,
             class_names: list[str], device, source_dataset: str | None = None, export_dir: Path | None = None,
             progress=None) -> EvalResult:
    """Score `model`, whose classes are `class_names`, on `scene_ids` of the cache.

    When `source_dataset` (the dataset the model was trained on) is given and differs from the
    cache's, only the shared classes are scored, named as the cache names them, and the confusion
    matrix is (S, S + 1) (see `SharedLabels`). Otherwise the model must predict the cache's classes.
    """
    cache = FeatureCache(cache_path)
    target_dataset, target_names = cache.provenance.get("dataset"), list(cache.provenance["class_names"])
    num_classes = len(class_names)
    if source_dataset is not None and source_dataset != target_dataset:
        labels = SharedLabels(list(class_names), target_names, shared_classes(source_dataset, target_dataset))
        score, names = labels.confusion, labels.names
    elif list(class_names) == target_names:
        score, names = (lambda prediction, label: confusion_matrix(prediction, label, num_classes)), target_names
    else:
        raise ValueError(f"{cache_path}: the cache's {len(target_names)} {target_dataset} classes differ from the "
                         f"model's {num_classes} (trained on {source_dataset or 'an unrecorded dataset'}); "
                         "evaluate on a cache of the model's dataset")
    confusion = score(np.zeros(0, np.int64), np.zeros(0, np.int64))  # zeros of the right shape
    points = 0
    for scene_id in scene_ids:
        scene = eval_scene(cache, scene_id, data_config)
        voxel_prediction = predict_logits(model, scene, device).argmax(1).cpu().numpy()
        prediction = voxel_prediction[scene.point_to_voxel]
        confusion += score(prediction, scene.point_label)
        points += len(prediction)
        if export_dir is not None:
            export_dir.mkdir(parents=True, exist_ok=True)
            export_ply(export_dir / f"{scene_id}.ply", scene.coord, prediction, num_classes)
        if progress is not None:
            progress(scene_id)
    iou = iou_per_class(confusion)
    return EvalResult(mean_iou(confusion), {n: float(v) for n, v in zip(names, iou)}, confusion,
                      len(scene_ids), points)
