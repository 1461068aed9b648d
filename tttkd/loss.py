"""The two losses of TTT-KD (paper §3.2), as pure functions of tensors.

L = L_Y + L_2D:
  L_Y  = cross-entropy of the seg_head logits, label smoothing 0.2 (appendix C.1), averaged over
         every labelled voxel of the batch (label -1 is ignored);
  L_2D = -cos(kd_head(x), F2D(x)) averaged over the sampled KD voxels. The cached target is
         mean_i(g_i / |g_i|), so -f/|f| . target equals the paper's expectation over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, *, label_smoothing: float = 0.2) -> torch.Tensor:
    """(V, C) logits, (V,) labels with -1 = ignore -> scalar mean CE."""
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def kd_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K, D) student predictions, (K, D) cached targets -> mean of -f/|f| . target.

    The target is not normalised: it is the mean of unit view features (see above)."""
    if len(prediction) == 0:
        return prediction.sum() * 0.0
    return -(F.normalize(prediction.float(), dim=1) * target.float()).sum(1).mean()
