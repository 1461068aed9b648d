"""The two losses of TTT-KD (paper §3.2), as pure functions of tensors.

L = L_Y + L_2D:
  L_Y  = cross-entropy of the seg_head logits, label smoothing 0.2 (appendix C.1), averaged over
         every labelled voxel of the batch (label -1 is ignored);
  L_2D = -cos(kd_head(x), F2D(x)) averaged over the sampled KD voxels. The cached target is
         mean_i(g_i / |g_i|), so -f/|f| . target equals the paper's expectation over images.

A pca-int8 cache stores each target t as its coefficients c = B^T t in an orthonormal (D, K) basis B
(pipeline/pca.py); the decoded target is B c. The loss never expands c: with f the (D,) prediction,
    -f/|f| . (B c) = -(f B)/|f| . c
exactly (associativity), so it projects the prediction instead, with |f| taken over all D dims (not
|f B|: that would be the cosine within span(B), another loss). Orthonormality is what makes B c the
decoded target at all: B c = B B^T t is t's orthogonal projection onto span(B), and |B c| = |c|.
Why project rather than expand: a TTT scene keeps (M, K) targets on the device instead of (M, D),
and a batch moves K instead of D floats per target; the matmul costs the same K D per target either
way (plus its backward for the projection, which is small next to the backbone's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, *, label_smoothing: float = 0.2) -> torch.Tensor:
    """(V, C) logits, (V,) labels with -1 = ignore -> scalar mean CE."""
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def kd_loss(prediction: torch.Tensor, target: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) student predictions, (N, D) cached targets -> mean of -f/|f| . target.

    With the (D, K) `basis` of a pca-int8 cache, `target` holds (N, K) coefficients and the loss is
    the same one against the decoded targets B c, computed as -(f B)/|f| . c (see above).
    The target is not normalised: it is the mean of unit view features (see above)."""
    width = prediction.shape[1] if basis is None else basis.shape[1]
    if target.shape[1] != width:  # a user's mix-up of caches: one clear line, not a broadcast error
        raise ValueError(
            f"KD targets have {target.shape[1]} dims, expected {width}: "
            + ("targets of a pca-int8 cache are coefficients; pass the cache's basis (FeatureCache.basis)"
               if basis is None else f"they are not coefficients of the {tuple(basis.shape)} basis passed (an fp16/int8 cache?)"))
    if len(prediction) == 0:
        return prediction.sum() * 0.0
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # fp16 under autocast -> fp32; fp64 stays
    with torch.autocast(prediction.device.type, enabled=False):  # keep the projection's matmul in fp32
        direction = F.normalize(prediction.to(dtype), dim=1)  # |f| over all D dims
        if basis is not None:
            direction = direction @ basis.to(dtype)  # (N, K): f/|f| in the basis
        return -(direction * target.to(dtype)).sum(1).mean()
