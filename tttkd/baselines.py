"""Test-time adaptation baselines ported to point clouds (paper §4.1), in the shape of adapt.py.

Each is online (it keeps its updates across scenes, as the originals do on a stream of batches)
and adapts on the voxels of one scene, which is its batch:

  TENT (Wang et al., 2021): batch-norm layers normalise with the scene's own statistics; only
      their affine parameters train, on the mean entropy of the predictions; Adam, lr 1e-3, one
      step per scene; predictions after the step.
  DUA (Mirza et al., 2022): no gradients; batch-norm running statistics are updated from a batch
      of `copies` augmented copies of each scene (rotation, mirror, jitter) with a momentum that
      decays per scene as 0.1 * 0.94^t down to 0.005; predictions with the updated statistics.
  AdaContrast (Chen et al., 2022): a momentum (EMA 0.999) teacher of the whole network; pseudo
      labels from the teacher's predictions on a second augmented view, refined by soft voting of
      the 10 nearest neighbours in a memory bank of teacher features; loss = CE(pseudo labels)
      + InfoNCE between student and teacher features of the same points (bank negatives of other
      pseudo classes, temperature 0.07) + diversity (-entropy of the mean prediction); SGD (lr 1e-4,
      momentum 0.9) on the backbone and the segmentation head with BN on running statistics (one
      scene is a small batch), one step per scene on 4096 anchor points; predictions by the student.

Methods that take gradients keep spconv's convs in training mode (see `model.freeze_batch_norm`):
in eval mode they compute no weight gradients on CUDA.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .adapt import RotatedScene, TargetScene, rotated
from .data import DataConfig
from .model import TTTKDNet, batch_norms, freeze_batch_norm, sparse_input


@torch.no_grad()
def _logits(model: TTTKDNet, rotated_scene: RotatedScene) -> torch.Tensor:
    return model.seg_head(model.forward_features(rotated_scene.voxels)).float()[rotated_scene.point_to_voxel]


class Tent:
    def __init__(self, model: TTTKDNet, *, lr: float = 1e-3):
        self.model = model
        model.train()  # batch statistics in every BN layer
        model.requires_grad_(False)
        for bn in batch_norms(model):
            bn.requires_grad_(True)
            bn.track_running_stats = False  # the scene's statistics, never the running ones
            bn.running_mean, bn.running_var = None, None
        self.params = [p for bn in batch_norms(model) for p in bn.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.updates = 0

    def adapt(self, scene: TargetScene, rotated_scene: RotatedScene, data_config: DataConfig) -> None:
        with torch.enable_grad():
            logits = self.model.seg_head(self.model.forward_features(rotated_scene.voxels)).float()
            entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            self.optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            self.optimizer.step()
        self.updates += 1

    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        return _logits(self.model, rotated_scene)


class Dua:
    """DUA: for each scene, one forward pass in training mode over a batch of `copies` augmented
    copies updates the batch-norm running statistics with momentum max(0.005, 0.1 * 0.94^t), t the
    number of scenes seen before (the paper's per-sample decay); no gradients."""

    def __init__(self, model: TTTKDNet, *, copies: int = 8, momentum: float = 0.1, decay: float = 0.94,
                 min_momentum: float = 0.005):
        self.model = model.eval()
        self.copies, self.momentum, self.decay, self.min_momentum = copies, momentum, decay, min_momentum
        self.updates = 0

    def current_momentum(self) -> float:
        return max(self.min_momentum, self.momentum * self.decay ** self.updates)

    @torch.no_grad()
    def adapt(self, scene: TargetScene, rotated_scene: RotatedScene, data_config: DataConfig) -> None:
        rng = scene_rng_for(scene, self.updates)
        views = [rotated(_mirrored_jittered(scene, rng), float(rng.uniform(0, 2 * np.pi)), data_config,
                         scene.feature.device).voxels for _ in range(self.copies)]
        batch = sparse_input(torch.cat([v.indices[:, 1:] for v in views]),
                             torch.cat([torch.full((len(v.indices),), k, dtype=torch.int32, device=v.indices.device)
                                        for k, v in enumerate(views)]),
                             torch.cat([v.features for v in views]), self.copies)
        for bn in batch_norms(self.model):
            bn.momentum = self.current_momentum()
        self.model.train()  # BN normalises with, and folds into its running statistics, the batch's
        self.model.seg_head(self.model.forward_features(batch))
        self.model.eval()
        self.updates += 1

    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        return _logits(self.model.eval(), rotated_scene)


def scene_rng_for(scene: TargetScene, salt: int) -> np.random.Generator:
    import zlib

    return np.random.default_rng([zlib.crc32(scene.scene_id.encode()), salt])


def _mirrored_jittered(scene: TargetScene, rng: np.random.Generator) -> TargetScene:
    from dataclasses import replace

    flip = np.where(rng.random(3) < 0.5, -1.0, 1.0).astype(np.float32)
    flip[2] = 1.0
    p = scene.points
    coord = p.coord * flip + np.clip(rng.normal(0, 0.005, p.coord.shape), -0.02, 0.02).astype(np.float32)
    return replace(scene, points=replace(p, coord=coord.astype(np.float32), normal=p.normal * flip))


class AdaContrast:
    def __init__(self, model: TTTKDNet, *, lr: float = 1e-4, ema: float = 0.999, bank_size: int = 16384,
                 neighbours: int = 10, temperature: float = 0.07, anchors: int = 4096,
                 contrast_weight: float = 1.0, diversity_weight: float = 1.0):
        self.model = freeze_batch_norm(model)  # BN on running statistics: one scene is too small a batch
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(False)
        self.params = [*model.backbone.parameters(), *model.seg_head.parameters()]  # kd_head is not in its loss
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.ema, self.neighbours, self.temperature, self.anchors = ema, neighbours, temperature, anchors
        self.contrast_weight, self.diversity_weight = contrast_weight, diversity_weight
        dim = model.backbone.out_channels
        classes = model.config.num_classes
        self.bank_features = torch.zeros(0, dim)
        self.bank_probs = torch.zeros(0, classes)
        self.bank_size = bank_size
        self.updates = 0

    def adapt(self, scene: TargetScene, rotated_scene: RotatedScene, data_config: DataConfig) -> None:
        device = scene.feature.device
        rng = scene_rng_for(scene, 10_000 + self.updates)
        strong = rotated(_mirrored_jittered(scene, rng), float(rng.uniform(0, 2 * np.pi)), data_config, device)
        points = torch.from_numpy(rng.choice(len(scene.points), size=min(self.anchors, len(scene.points)),
                                             replace=False)).to(device)
        with torch.no_grad():  # the teacher's view: pseudo labels and keys
            t_features = self.teacher.forward_features(rotated_scene.voxels)[rotated_scene.point_to_voxel[points]]
            t_probs = self.teacher.seg_head(t_features).float().softmax(1)
            keys = F.normalize(t_features.float(), dim=1)
            bank_f, bank_p = self.bank_features.to(device), self.bank_probs.to(device)
            if len(bank_f) >= self.neighbours:  # refine by soft voting of the nearest bank features
                nearest = (keys @ bank_f.T).topk(self.neighbours, dim=1).indices
                pseudo = bank_p[nearest].mean(1).argmax(1)
            else:
                pseudo = t_probs.argmax(1)
        with torch.enable_grad():
            s_features = self.model.forward_features(strong.voxels)[strong.point_to_voxel[points]]
            logits = self.model.seg_head(s_features).float()
            loss = F.cross_entropy(logits, pseudo)
            queries = F.normalize(s_features.float(), dim=1)
            positive = (queries * keys).sum(1, keepdim=True)
            if len(bank_f):
                negatives = queries @ bank_f.T
                same_class = bank_p.argmax(1)[None, :] == pseudo[:, None]
                negatives = negatives.masked_fill(same_class, float("-inf"))
                contrast_logits = torch.cat([positive, negatives], 1) / self.temperature
                loss = loss + self.contrast_weight * F.cross_entropy(
                    contrast_logits, torch.zeros(len(points), dtype=torch.long, device=device))
            mean_prob = logits.softmax(1).mean(0)
            loss = loss + self.diversity_weight * (mean_prob * mean_prob.clamp_min(1e-8).log()).sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():  # momentum teacher and memory bank
            for t, s in zip(self.teacher.parameters(), self.model.parameters()):
                if s.requires_grad:
                    t.mul_(self.ema).add_(s.detach(), alpha=1 - self.ema)
            self.bank_features = torch.cat([keys.cpu(), self.bank_features])[: self.bank_size]
            self.bank_probs = torch.cat([t_probs.cpu(), self.bank_probs])[: self.bank_size]
        self.updates += 1

    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        return _logits(self.model, rotated_scene)


# ---- multi-modal baselines (paper §4.2, Table 2): xMUDA and MM-TTA --------------------------------
#
# Both adapt a 2D and a 3D branch jointly on the target scene. The 2D branch is `head2d.Head2D` on
# the cached teacher features (our substitute for their 2D U-Net: see head2d.py); each row reports
# the 3D branch's predictions, as the TTT-KD paper compares "the 3D backbone" of each. Only points
# the image sees have a 2D prediction, so the losses run over those (outdoors: every point).
# Both update only batch-norm affine parameters, of both branches, with Adam (lr 1e-3), one step per
# scene (online, one pass over the target stream), as MM-TTA's comparison does (Shin et al. 2022 §4:
# BN affine parameters only, results after one epoch of adaptation); lr 1e-3 is TENT's here and the
# 3D network's rate in the public MM-TTA reimplementation of Latte (Cao et al. 2024,
# `configs/a2d2_semantic_kitti/mmtta.yaml`).


def _features_2d(scene: TargetScene, basis: torch.Tensor | None) -> torch.Tensor:
    """(M, D) cached teacher features of the seen points (a pca-int8 cache's coefficients decoded)."""
    return scene.feature if basis is None else scene.feature @ basis.T


def _seen_logits(model: TTTKDNet, rotated_scene: RotatedScene, scene: TargetScene) -> torch.Tensor:
    """(M, C) 3D logits of the seen points, in `scene.seen_index` order (the 2D branch's order)."""
    logits = model.seg_head(model.forward_features(rotated_scene.voxels)).float()
    seen = torch.from_numpy(scene.seen_index).to(logits.device)
    return logits[rotated_scene.point_to_voxel[seen]]


def _scene_statistics(*modules: torch.nn.Module) -> list:
    """TENT's set-up of each module: BN normalises with the scene's statistics, keeps none, and only
    its affine parameters train. -> those parameters."""
    params = []
    for module in modules:
        module.train()
        module.requires_grad_(False)
        for bn in batch_norms(module):
            bn.requires_grad_(True)
            bn.track_running_stats = False
            bn.running_mean, bn.running_var = None, None
            params += list(bn.parameters())
    return params


def cross_modal_kl(logits_3d: torch.Tensor, logits_2d: torch.Tensor) -> torch.Tensor:
    """xMUDA's cross-modal loss both ways: KL(P2D || P3D) trains the 3D branch towards the 2D
    prediction, KL(P3D || P2D) the 2D branch towards the 3D one; the target side is detached in
    each (Jaritz et al. 2020, eq. 3: L_xM = D_KL(P || Q) with P the other modality's detached
    prediction). xMUDA's second ("mimicry") heads are not kept: the 3D model has one seg_head, so
    each branch's own prediction mimics the other's. Mean over points of the sum over classes."""
    log_p3d, log_p2d = logits_3d.float().log_softmax(1), logits_2d.float().log_softmax(1)
    to_3d = F.kl_div(log_p3d, log_p2d.detach(), log_target=True, reduction="none").sum(1)
    to_2d = F.kl_div(log_p2d, log_p3d.detach(), log_target=True, reduction="none").sum(1)
    return (to_3d + to_2d).mean()


class XMuda:
    """xMUDA at test time, as MM-TTA's comparison runs it ("self-learning with consistency"): the
    cross-modal KL between the 3D and 2D predictions on the target scene (`cross_modal_kl`), BN with
    the scene's statistics (TENT's set-up), BN affine parameters of both branches trained; no source
    data, so no segmentation loss beside it (xMUDA's UDA trains on labelled source batches too)."""

    def __init__(self, model: TTTKDNet, head, *, lr: float = 1e-3, basis: torch.Tensor | None = None):
        self.model, self.head, self.basis = model, head, basis
        self.params = _scene_statistics(model, head)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.updates = 0

    def adapt(self, scene: TargetScene, rotated_scene: RotatedScene, data_config: DataConfig) -> None:
        if len(scene.seen_index) < 2:  # no 2D prediction (BN needs two points): nothing to compare
            return
        with torch.enable_grad():
            loss = cross_modal_kl(_seen_logits(self.model, rotated_scene, scene),
                                  self.head(_features_2d(scene, self.basis)))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.updates += 1

    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        return _logits(self.model, rotated_scene)


def consistency(slow_logits: torch.Tensor, fast_logits: torch.Tensor) -> torch.Tensor:
    """MM-TTA's per-point consistency of a modality's slow and fast predictions: the inverse of
    their KL divergence (Shin et al. 2022, Inter-PR), symmetrised as the mean of the inverses of
    both directions (the Latte reimplementation's form). Identical predictions: 1e6 (KL floored)."""
    log_slow, log_fast = slow_logits.float().log_softmax(1), fast_logits.float().log_softmax(1)
    slow_to_fast = F.kl_div(log_fast, log_slow, log_target=True, reduction="none").sum(1)  # KL(slow || fast)
    fast_to_slow = F.kl_div(log_slow, log_fast, log_target=True, reduction="none").sum(1)
    return 0.5 * (1 / slow_to_fast.clamp_min(1e-6) + 1 / fast_to_slow.clamp_min(1e-6))


@torch.no_grad()
def refine_pseudo_labels(slow_2d: torch.Tensor, fast_2d: torch.Tensor, slow_3d: torch.Tensor, fast_3d: torch.Tensor,
                         *, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MM-TTA's pseudo labels from (M, C) logits of the slow and fast models of each modality.

    Intra-PG: each modality's prediction aggregates its two models, the mean of their logits.
    Inter-PR, hard selection: per point, the modality whose slow and fast predictions are more
    consistent (`consistency`) gives the label; a point whose larger consistency is below
    `threshold` gets none (-1). -> ((M,) labels, (M,) bool: True where the 2D branch was chosen)."""
    zeta_2d, zeta_3d = consistency(slow_2d, fast_2d), consistency(slow_3d, fast_3d)
    use_2d = zeta_2d > zeta_3d
    label = torch.where(use_2d, (slow_2d + fast_2d).argmax(1), (slow_3d + fast_3d).argmax(1))
    label[torch.maximum(zeta_2d, zeta_3d) < threshold] = -1
    return label, use_2d


class MMTTA:
    """MM-TTA (Shin et al., CVPR 2022) with hard Inter-PR, per scene:

      Intra-PG: per modality a fast model (the adapting one: BN normalises with the scene's
          statistics, its affine parameters train) and a slow model that follows it by momentum;
          after each step slow = lam * slow + (1 - lam) * fast over every BN affine parameter and
          running statistic (the fast model's running statistics are the last scene's: momentum 1).
          The slow model, BN on its running statistics, predicts (the paper infers with it);
      Inter-PR: `refine_pseudo_labels` (hard selection, consistency threshold);
      loss: cross-entropy of both fast branches against the refined labels.

    Sources: lam = 0.99 and threshold = 0.3 are the values of the public reimplementation in Latte
    (Cao et al. 2024, `latte/tta/tools/mmtta.py`; MM-TTA's own code was not released); Adam lr 1e-3
    and one step per scene as for xMUDA above. The paper's own values could not be checked offline.
    """

    def __init__(self, model: TTTKDNet, head, *, lr: float = 1e-3, momentum: float = 0.99, threshold: float = 0.3,
                 basis: torch.Tensor | None = None):
        self.slow_model = freeze_batch_norm(copy.deepcopy(model)).requires_grad_(False)
        self.slow_head = copy.deepcopy(head).eval().requires_grad_(False)
        self.model, self.head, self.basis = model, head, basis
        self.momentum, self.threshold = momentum, threshold
        model.train(), head.train()
        model.requires_grad_(False), head.requires_grad_(False)
        self.params = []
        for bn in batch_norms(model) + batch_norms(head):
            bn.momentum = 1.0  # running statistics := the scene's batch statistics, for the slow model's update
            bn.requires_grad_(True)
            self.params += list(bn.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.updates = 0

    def adapt(self, scene: TargetScene, rotated_scene: RotatedScene, data_config: DataConfig) -> None:
        if len(scene.seen_index) < 2:  # no 2D prediction (BN needs two points): no pseudo labels
            return
        feature = _features_2d(scene, self.basis)
        with torch.no_grad():
            slow_3d = _seen_logits(self.slow_model, rotated_scene, scene)
            slow_2d = self.slow_head(feature).float()
        with torch.enable_grad():
            fast_3d = _seen_logits(self.model, rotated_scene, scene)
            fast_2d = self.head(feature).float()
            label, _ = refine_pseudo_labels(slow_2d, fast_2d.detach(), slow_3d, fast_3d.detach(),
                                            threshold=self.threshold)
            if (label >= 0).any():  # cross-entropy over no label is NaN
                loss = F.cross_entropy(fast_3d, label, ignore_index=-1) + F.cross_entropy(fast_2d, label, ignore_index=-1)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self._follow()
        self.updates += 1

    @torch.no_grad()
    def _follow(self) -> None:
        """slow = lam * slow + (1 - lam) * fast, for every BN's affine parameters and statistics."""
        pairs = list(zip(batch_norms(self.slow_model), batch_norms(self.model))) + \
            list(zip(batch_norms(self.slow_head), batch_norms(self.head)))
        for slow, fast in pairs:
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(slow, name).mul_(self.momentum).add_(getattr(fast, name).detach(), alpha=1 - self.momentum)

    def predict(self, rotated_scene: RotatedScene) -> torch.Tensor:
        return _logits(self.slow_model, rotated_scene)
