"""Test-time training (paper §3.3-3.4, Algorithm 1, appendix C.1): TTT-KD and TTT-KD-O.

For a target scene: freeze both projectors, keep batch-norm statistics fixed (running statistics
used, not updated), and take SGD steps (lr 1.0, no momentum) on the KD loss alone, with 16,384
cached teacher targets sampled per step; then predict with the adapted weights.

  TTT-KD (offline): every scene, and every rotation of it, starts from the source weights, so
      results do not depend on scene order; the updates are discarded afterwards.
  TTT-KD-O (online): one step per scene (every `stride`-th scene), updates kept across scenes.

Rotation ensemble: logits summed over `rotations` rotations about the up axis covering 360°;
Algorithm 1 runs the TTT steps of each rotation before its prediction. We restart each rotation
from the source weights (Algorithm 1 does not say), which makes "mIoU after s steps" well defined.

Written like tent's tent.py: `configure`, `collect_params`, `check`, one `step`, `reset`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tttkd.pipeline.cache import FeatureCache

from .augment import PointSet, rotation_z
from .data import DataConfig, input_features, voxelize
from .loss import kd_loss
from .model import TTTKDNet, batch_norms, convs_without_gradients, freeze_batch_norm, sparse_input


@dataclass(frozen=True)
class AdaptConfig:
    steps: int = 100
    """TTT steps per scene and rotation (paper C.1: 100 indoors, 25 outdoors)."""
    lr: float = 1.0
    """SGD without momentum (paper C.1: 1.0 indoors, 0.1 outdoors)."""
    kd_points: int = 16384
    """KD targets sampled per step (paper C.1)."""
    rotations: int = 8
    """Rotations about the up axis whose logits are summed (8 indoors, 4 outdoors)."""
    stride: int = 1
    """TTT-KD-O: one update every `stride` scenes (paper Fig. 5)."""
    shuffle_targets: bool = False
    """Control: pair each sampled point with another point's teacher feature. Must not help; if it
    does, the gain comes from the optimisation itself, not from the 2D teacher."""
    seed: int = 0


@dataclass
class TargetScene:
    """A target scene as adaptation needs it: all points, their cached teacher features."""

    scene_id: str
    points: PointSet
    seen_index: np.ndarray  # (M,) point index of each feature row
    feature: torch.Tensor   # (M, D) float32 on the device


def load_target_scene(cache: FeatureCache, scene_id: str, device) -> TargetScene:
    from .data import point_set

    cached = cache.read(scene_id)
    return TargetScene(scene_id, point_set(cached), cached.seen_index.astype(np.int64),
                       torch.from_numpy(cached.feature.astype(np.float32)).to(device))


@dataclass
class RotatedScene:
    """One rotation of a scene, voxelised: the network input and the map back to its points."""

    voxels: object                 # spconv.SparseConvTensor
    point_to_voxel: torch.Tensor   # (N,) int64


def rotated(scene: TargetScene, angle: float, data_config: DataConfig, device) -> RotatedScene:
    """Rotate about the vertical axis through the scene's centre (normals turn too), then voxelise."""
    p = scene.points
    centre = np.zeros(3, np.float32)
    centre[:2] = p.coord[:, :2].mean(0)
    r = rotation_z(angle)
    turned = PointSet(coord=(p.coord - centre) @ r.T, color=p.color, normal=p.normal @ r.T, label=p.label,
                      seen_row=p.seen_row, source=p.source)
    grid, representative, point_to_voxel = voxelize(turned.coord, data_config.voxel_size_m)
    features = input_features(turned.take(representative), data_config.input_features)
    grid = torch.from_numpy(grid).to(device)
    voxels = sparse_input(grid, torch.zeros(len(grid), dtype=torch.int32, device=device),
                          torch.from_numpy(features).to(device), 1)
    return RotatedScene(voxels, torch.from_numpy(point_to_voxel).to(device))


def rotation_angles(rotations: int) -> list[float]:
    return [2 * math.pi * k / rotations for k in range(rotations)]


def configure(model: TTTKDNet) -> TTTKDNet:
    """Only the backbone trains; batch norm uses, and keeps, its running statistics.

    Not `model.eval()`: on CUDA that would stop every gradient at spconv's implicit-GEMM convs
    (see `freeze_batch_norm`)."""
    freeze_batch_norm(model)
    model.requires_grad_(False)
    model.backbone.requires_grad_(True)
    return model


def collect_params(model: TTTKDNet) -> list[nn.Parameter]:
    return list(model.backbone.parameters())


def check(model: TTTKDNet) -> None:
    """Refuse any set-up in which TTT-KD would not do what the paper says, on any device."""
    if not model.has_kd_head:
        raise ValueError("this checkpoint has no kd_head (a Source-Only model): TTT-KD needs a Joint-Train checkpoint")
    if any(bn.training for bn in batch_norms(model)):
        raise ValueError("TTT-KD keeps batch-norm statistics fixed, but a BatchNorm is in training mode: "
                         "call configure(model)")
    if convs_without_gradients(model):
        raise ValueError("sparse convs in eval mode compute no weight gradients on CUDA: call configure(model) "
                         "(training mode with only batch norm in eval mode), not model.eval()")
    if not all(p.requires_grad for p in model.backbone.parameters()):
        raise ValueError("TTT-KD trains every backbone parameter, but some are frozen: call configure(model)")
    if any(p.requires_grad for head in (model.seg_head, model.kd_head) for p in head.parameters()):
        raise ValueError("TTT-KD freezes both projectors: call configure(model)")


class TTTKD:
    """Test-time training on the KD loss. `adapt` takes `steps` SGD steps on one rotated scene."""

    def __init__(self, model: TTTKDNet, config: AdaptConfig):
        self.model = configure(model)
        check(self.model)
        self.config = config
        self.source_state = copy.deepcopy(model.state_dict())
        self.optimizer = torch.optim.SGD(collect_params(model), lr=config.lr, momentum=0.0)
        self.updates = 0

    def reset(self) -> None:
        """Back to the source weights (SGD without momentum keeps no state to reset)."""
        self.model.load_state_dict(self.source_state)

    def step(self, rotated_scene: RotatedScene, kd_voxel: torch.Tensor, kd_target: torch.Tensor) -> float:
        # ensure grads even when the caller runs under torch.no_grad()
        with torch.enable_grad():
            features = self.model.forward_features(rotated_scene.voxels)
            loss = kd_loss(self.model.kd_head(features[kd_voxel]), kd_target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.updates += 1
        return loss.detach()

    def sample_targets(self, scene: TargetScene, rotated_scene: RotatedScene, rng: np.random.Generator):
        rows = rng.choice(len(scene.seen_index), size=min(self.config.kd_points, len(scene.seen_index)), replace=False)
        point = torch.from_numpy(scene.seen_index[rows]).to(scene.feature.device)
        if self.config.shuffle_targets:
            rows = rng.permutation(rows)
        return rotated_scene.point_to_voxel[point], scene.feature[torch.from_numpy(rows).to(scene.feature.device)]

    @torch.no_grad()
    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        """(N, C) logits of every point, BN on running statistics (the convs stay in training
        mode: the same function, and no mode switch to undo before the next step)."""
        logits = self.model.seg_head(self.model.forward_features(rotated_scene.voxels)).float()
        return logits[rotated_scene.point_to_voxel]


def scene_rng(config: AdaptConfig, scene_id: str, rotation: int) -> np.random.Generator:
    import zlib

    return np.random.default_rng([config.seed, zlib.crc32(scene_id.encode()), rotation])


def ttt_kd_offline(adapter: TTTKD, scene: TargetScene, data_config: DataConfig, *,
                   record_steps: list[int], kd_losses: list | None = None) -> dict[int, torch.Tensor]:
    """Offline TTT-KD on one scene -> {step count: (N, C) logits summed over rotations}.

    Every rotation starts from the source weights and takes max(record_steps) steps; predictions
    are taken on the way at each step count in `record_steps` (one run gives the mIoU-vs-steps curve).
    """
    config = adapter.config
    totals = {s: 0.0 for s in record_steps}
    for k, angle in enumerate(rotation_angles(config.rotations)):
        adapter.reset()
        rotated_scene = rotated(scene, angle, data_config, scene.feature.device)
        rng = scene_rng(config, scene.scene_id, k)
        for step in range(max(record_steps) + 1):
            if step in totals:
                totals[step] = totals[step] + adapter.predict(rotated_scene)
            if step == max(record_steps):
                break
            loss = adapter.step(rotated_scene, *adapter.sample_targets(scene, rotated_scene, rng))
            if kd_losses is not None and k == 0:
                kd_losses.append(float(loss))
    adapter.reset()
    return totals
