"""The 2D branch of the multi-modal baselines (xMUDA, MM-TTA; paper §4.2, Table 2): a point-wise
segmentation head on the cached teacher features.

    cached feature of a point (D,) --head2d: Linear(D, 256) -> BN -> ReLU -> Linear(256, C)--> (C,) logits

xMUDA (Jaritz et al., CVPR 2020) and MM-TTA (Shin et al., CVPR 2022) adapt two networks jointly: a
2D U-Net (ResNet-34 encoder) on the camera image, whose logits are sampled at each point's pixel,
and the 3D U-Net. This head is our substitute for that 2D U-Net, for two reasons:
  - the feature cache already holds what a 2D network computes from the image at each point (the
    frozen teacher's feature, `pipeline/cache.py`), and adaptation never runs an image model (the
    teacher runs once, at extraction), so the 2D branch must start from the cached feature;
  - a point-wise head is the smallest 2D "network" that gives per-point class predictions and has
    batch norm, the only parameters both baselines adapt at test time (MM-TTA §4: BN affine
    parameters, as TENT).
What it does not reproduce: the 2D U-Net's own BN layers before the feature (the teacher is frozen
and its features are fixed in the cache), so the 2D branch adapts one BN layer, not a whole
encoder-decoder. Only the points the image sees have a 2D prediction (outdoors, under xMUDA's
protocol, that is every point).

The head is fitted after training, on the SOURCE cache with its labels (`fit_head2d`), and stored
beside the checkpoint as its own file (`head2d.pt`: tensors and plain data only, read with
`torch.load(weights_only=True)`); `tttkd train` does not change. The file records the teacher it
was fitted on and the class list, and a target cache of another teacher is refused, as a
checkpoint's is.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tttkd.pipeline.cache import FeatureCache

from .checkpoint import check_teacher, load_checkpoint, teacher_of

FILE_NAME = "head2d.pt"


@dataclass(frozen=True)
class Head2DConfig:
    hidden: int = 256
    """Width of the head's hidden layer (the BN layer the baselines adapt)."""
    steps: int = 1000
    """AdamW steps over the sampled source points."""
    batch_points: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scenes: int = 500
    """Source scenes sampled (at random, seeded) for fitting: a few hundred scenes describe the
    classes' features; A2D2's 27k would be 225 GB of ViT-L features to read."""
    points_per_scene: int = 512
    """Labelled, seen points sampled per scene."""
    seed: int = 0


class Head2D(nn.Module):
    """Point-wise segmentation from a cached teacher feature. Attribute names are the file format."""

    def __init__(self, feature_dim: int, num_classes: int, *, hidden: int = 256):
        super().__init__()
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.fc1 = nn.Linear(feature_dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(M, D) cached features -> (M, C) logits."""
        return self.fc2(F.relu(self.norm(self.fc1(feature.float()))))


def head2d_path(checkpoint_path: Path) -> Path:
    """Where the 2D head of a run lives: beside its checkpoint."""
    return Path(checkpoint_path).with_name(FILE_NAME)


def sample_source_points(cache: FeatureCache, scene_ids: list[str], config: Head2DConfig, *,
                         progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(P, D) float32 decoded features and (P,) labels of labelled seen points of the source cache."""
    rng = np.random.default_rng(config.seed)
    chosen = sorted(rng.choice(len(scene_ids), size=min(config.scenes, len(scene_ids)), replace=False))
    features, labels = [], []
    for i in chosen:
        scene = cache.read_points(scene_ids[i])
        label = scene.label[scene.seen_index].astype(np.int64)
        rows = np.flatnonzero(label >= 0)  # rows of `feature` whose point is labelled
        rows = np.sort(rng.choice(rows, size=min(config.points_per_scene, len(rows)), replace=False))
        features.append(cache.decode(cache.read_features(scene_ids[i], rows)))
        labels.append(label[rows])
        if progress is not None:
            progress(scene_ids[i])
    return np.concatenate(features), np.concatenate(labels)


def fit_head2d_on(feature: torch.Tensor, label: torch.Tensor, num_classes: int, config: Head2DConfig) -> Head2D:
    """Fit a head by cross-entropy on (P, D) features and (P,) labels (all on one device)."""
    assert len(feature) == len(label) and len(label) > 0
    torch.manual_seed(config.seed)
    head = Head2D(feature.shape[1], num_classes, hidden=config.hidden).to(feature.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    head.train()
    for _ in range(config.steps):
        batch = torch.randint(len(label), (min(config.batch_points, len(label)),), generator=generator).to(feature.device)
        loss = F.cross_entropy(head(feature[batch]), label[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def accuracy(head: Head2D, feature: torch.Tensor, label: torch.Tensor) -> float:
    was_training = head.training
    correct = (head.eval()(feature).argmax(1) == label).float().mean().item()
    head.train(was_training)
    return correct


def fit_head2d(cache_path: Path, checkpoint_path: Path, *, split: str | None = "train",
               config: Head2DConfig = Head2DConfig(), device="cpu", progress=None) -> Path:
    """Fit the 2D head on the labelled points of the source cache's `split` and write it beside the
    checkpoint, which fixes the class list (the head predicts the 3D model's classes). -> its path."""
    from .train import split_scene_ids

    checkpoint = load_checkpoint(checkpoint_path)
    cache = FeatureCache(cache_path)
    provenance = cache.provenance
    check_teacher(checkpoint["teacher"], provenance, cache_path=cache_path)
    class_names = list(checkpoint["class_names"])
    if list(provenance.get("class_names") or []) != class_names:
        raise ValueError(f"{cache_path}: its classes differ from those of {checkpoint_path}: fit the 2D head on the "
                         "source cache the model was trained on (--source-cache)")
    scene_ids = split_scene_ids(cache, split, option="--source-split")
    feature, label = sample_source_points(cache, scene_ids, config, progress=progress)
    if len(label) == 0:
        raise ValueError(f"{cache_path}: no labelled point seen by an image in its {split or 'complete'} scenes: "
                         "the 2D head has nothing to learn from")
    feature, label = torch.from_numpy(feature).to(device), torch.from_numpy(label).to(device)
    head = fit_head2d_on(feature, label, len(class_names), config)
    path = head2d_path(checkpoint_path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # a killed fit leaves no half-written head
    torch.save({"head": head.state_dict(), "config": asdict(config), "feature_dim": head.feature_dim,
                "class_names": class_names, "teacher": teacher_of(provenance), "dataset": provenance.get("dataset"),
                "source_cache": str(cache_path), "points": int(len(label)),
                "train_accuracy": accuracy(head, feature, label)}, tmp)
    os.replace(tmp, path)
    return path


def load_head2d(path: Path, *, class_names: list[str], target_provenance: dict, cache_path: Path, device) -> Head2D:
    """The head stored at `path`, refused if its classes are not the model's or its teacher is not
    the target cache's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no 2D head here; xMUDA and MM-TTA need one: `tttkd adapt --method xmuda` "
                                "fits it from the source cache (--source-cache)")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        stored["class_names"], stored["teacher"], stored["feature_dim"], stored["config"]["hidden"], stored["head"]
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: not a readable 2D head ({str(e).splitlines()[0]}); refit it with `tttkd adapt --method xmuda`") from e
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a 2D head (no {e}); refit it with `tttkd adapt --method xmuda`") from e
    if list(stored["class_names"]) != list(class_names):
        raise ValueError(f"{path}: a 2D head of the classes {stored['class_names']}, not the model's; refit it")
    check_teacher(stored["teacher"], target_provenance, cache_path=cache_path)
    head = Head2D(stored["feature_dim"], len(class_names), hidden=stored["config"]["hidden"])
    head.load_state_dict(stored["head"])
    return head.to(device).eval()
