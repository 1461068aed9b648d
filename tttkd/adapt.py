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

Speed (the method is unchanged): the sparse index pairs are built once per rotation, on its first
forward, and reused by every step and prediction of that rotation (`IndexPairs`); the step loop
reads nothing back from the GPU (losses stay tensors until the rotation ends; targets for all its
steps are drawn up front and moved in one copy); optionally (`cuda_graph`), from the third step on
a rotation the step replays a CUDA graph of itself (`fast_ttt.CapturedStep`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tttkd.pipeline.cache import FeatureCache

from .augment import PointSet, rotation_z
from .data import DataConfig, input_features, voxelize
from .fast_ttt import CapturedStep, capturable
from .loss import kd_loss
from .model import (IndexPairs, TTTKDNet, batch_norms, convs_without_gradients, freeze_batch_norm, sparse_input,
                    tensor_float32)


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
    reuse_pairs: bool = True
    """Build the sparse index pairs once per rotation (False: rebuild them every forward, the
    reference path; the results are the same)."""
    cuda_graph: bool = True
    """On CUDA, replay a captured graph of the step from the third step on a rotation (needs
    reuse_pairs; the eager step's kernels in its order: the same results, GPU tests). The step is
    otherwise bound by launching ~720 kernels: on an H200 (2026-11-26) 18.8 instead of 58.8 ms at
    25k voxels, 35.0 instead of 45.8 ms at 100k. A refused capture warns once and runs eagerly."""
    tf32: bool = False
    """On CUDA, run the step's and the predictions' fp32 products on TF32 tensor cores
    (`model.tensor_float32`): about half the kernel time of a step. Off until the adapted mIoU is
    shown unchanged against fp32."""


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
    pairs: IndexPairs = field(default_factory=IndexPairs)  # recorded by the first forward over `voxels`


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

    def __init__(self, model: TTTKDNet, config: AdaptConfig, basis: torch.Tensor | None = None):
        self.model = configure(model)
        self.basis = basis  # a pca-int8 target cache's (D, K) basis: targets are its coefficients (loss.py)
        check(self.model)
        self.config = config
        self.source_state = copy.deepcopy(model.state_dict())
        params = collect_params(model)
        # foreach: one multi-tensor kernel for the 177 backbone tensors instead of one launch each
        self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.0, foreach=params[0].is_cuda)
        self.updates = 0
        self.graph = None  # fast_ttt.CapturedStep of the current rotated scene
        self._eager_steps = (None, 0)  # (rotated scene, eager steps taken on it)

    def reset(self) -> None:
        """Back to the source weights (SGD without momentum keeps no state to reset)."""
        self.model.load_state_dict(self.source_state)

    def features(self, rotated_scene: RotatedScene) -> torch.Tensor:
        """(V, 96) backbone features; the index pairs come from the rotation's first forward."""
        if not self.config.reuse_pairs:
            return self.model.forward_features(rotated_scene.voxels)
        return rotated_scene.pairs.features(self.model.backbone, rotated_scene.voxels)

    def eager_step(self, rotated_scene: RotatedScene, kd_voxel: torch.Tensor, kd_target: torch.Tensor) -> torch.Tensor:
        # ensure grads even when the caller runs under torch.no_grad()
        with torch.enable_grad(), tensor_float32(self.config.tf32):
            features = self.features(rotated_scene)
            loss = kd_loss(self.model.kd_head(features[kd_voxel]), kd_target, self.basis)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def step(self, rotated_scene: RotatedScene, kd_voxel: torch.Tensor, kd_target: torch.Tensor) -> torch.Tensor:
        """One SGD step on the KD loss -> the loss, a 0-d tensor on the device (reading it waits
        for the GPU: read the losses once, after the loop)."""
        if self.graph is not None and self.graph.fits(rotated_scene, kd_voxel, kd_target):
            loss = self.graph(kd_voxel, kd_target)
        else:
            scene, taken = self._eager_steps
            taken = taken + 1 if scene is rotated_scene else 1
            self._eager_steps = (rotated_scene, taken)
            if taken == 2 and self.config.cuda_graph and self.config.reuse_pairs and capturable(kd_target):
                # the first step recorded the pairs; this one runs the exact code the graph will hold
                self.graph = CapturedStep(self.eager_step, rotated_scene, kd_voxel, kd_target)
                loss = self.graph.warmup_loss
            else:
                loss = self.eager_step(rotated_scene, kd_voxel, kd_target)
        self.updates += 1
        return loss

    def _draw_rows(self, scene: TargetScene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """-> (feature rows whose points are trained, feature rows used as their targets)."""
        rows = rng.choice(len(scene.seen_index), size=min(self.config.kd_points, len(scene.seen_index)), replace=False)
        return rows, (rng.permutation(rows) if self.config.shuffle_targets else rows)

    def sample_targets(self, scene: TargetScene, rotated_scene: RotatedScene, rng: np.random.Generator):
        """-> (KD voxels (K,), their teacher targets (K, D)) for one step."""
        points, targets = self.plan_targets(scene, rotated_scene, rng, steps=1)
        return points[0], scene.feature[targets[0]]

    def plan_targets(self, scene: TargetScene, rotated_scene: RotatedScene, rng: np.random.Generator, *, steps: int):
        """The KD voxels (S, K) and target rows (S, K) of `steps` steps, drawn in the order
        `sample_targets` draws them and moved to the device in one copy: a copy from host memory
        waits for the GPU, so one per step would stall the step loop."""
        drawn = []
        for _ in range(steps):
            trained, targets = self._draw_rows(scene, rng)
            drawn.append(np.stack([scene.seen_index[trained], targets]))
        drawn = torch.from_numpy(np.stack(drawn) if drawn else np.zeros((0, 2, 0), np.int64))
        drawn = drawn.to(scene.feature.device)  # (S, 2, K): point index, target row
        return rotated_scene.point_to_voxel[drawn[:, 0]], drawn[:, 1]

    @torch.no_grad()
    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        """(N, C) logits of every point, BN on running statistics (the convs stay in training
        mode: the same function, and no mode switch to undo before the next step)."""
        with tensor_float32(self.config.tf32):
            logits = self.model.seg_head(self.features(rotated_scene)).float()
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
    steps = max(record_steps)
    for k, angle in enumerate(rotation_angles(config.rotations)):
        adapter.reset()
        rotated_scene = rotated(scene, angle, data_config, scene.feature.device)
        kd_voxels, target_rows = adapter.plan_targets(scene, rotated_scene, scene_rng(config, scene.scene_id, k),
                                                      steps=steps)
        losses = []
        for step in range(steps + 1):
            if step in totals:
                totals[step] = totals[step] + adapter.predict(rotated_scene)
            if step == steps:
                break
            losses.append(adapter.step(rotated_scene, kd_voxels[step], scene.feature[target_rows[step]]))
        if kd_losses is not None and k == 0 and losses:
            kd_losses.extend(torch.stack(losses).tolist())  # the one read-back of the rotation
    adapter.reset()
    return totals
