"""The 3D backbone of xMUDA and MM-TTA (paper §4.2, Table 2), re-expressed on spconv.

xMUDA (Jaritz et al., CVPR 2020; valeoai/xmuda `xmuda/models/scn_unet.py`) and MM-TTA (Shin et
al., CVPR 2022, which keeps xMUDA's 3D network) segment LiDAR points with SparseConvNet's `UNet`:

    voxels (V, in_channels) --SubMConv 3^3--> m
        --U-Net over 7 levels of m, 2m, ..., 7m channels--> m --BN-ReLU--> (V, m) features

What each choice rests on:
  - widths: `n_planes = [(n + 1) * m for n in range(num_planes)]` with m = 16 and num_planes = 7
    (xMUDA's `UNetSCN` defaults, not overridden by `configs/a2d2_semantic_kitti/*.yaml`):
    16, 32, 48, 64, 80, 96, 112 channels, i.e. linear, not doubling, growth;
  - depth: 7 levels, 6 stride-2 downsamplings (2^3 kernels, SCN's `downsample=[2, 2]`);
  - blocks: `block_reps = 1` and `residual_blocks = False` (xMUDA's config defaults): one
    pre-activation "VGG" block, BN-ReLU then a 3^3 submanifold conv, per level on each side of the
    U. `residual_blocks=True` builds SCN's ResNet-style block (two BN-ReLU-conv, a bias-free
    linear shortcut where channels change) for the variant some follow-ups use;
  - the U: at each level, blocks, then [identity | BN-ReLU, stride-2 conv, the next level, BN-ReLU,
    inverse conv] concatenated (skip first, as SCN's JoinTable), then blocks from 2x the channels;
    a final BN-ReLU. Convs have no bias (SCN's `False`); BN eps 1e-4 (SCN's default; SCN's
    momentum 0.9 keeps 90% of the running average, torch's `momentum` = 0.1);
  - input: xMUDA feeds a constant 1 per voxel (`in_channels = 1`); tttkd feeds xyz outdoors (paper
    §4.2: "only 3D coordinates are used"), so `in_channels` comes from the data config;
  - voxels: xMUDA scales coordinates by 20 (5 cm voxels) inside a 4096^3 grid (`full_scale`,
    204.8 m): the data side's `voxel_size_m = 0.05` for this backbone. spconv needs the grid
    extent divisible by 2^6 to halve exactly six times, so `forward` pads it to a multiple of 64.

SCN's `InputLayer(mode=4)` averages the features of points sharing a voxel; tttkd's voxelisation
does that before the model. SCN's `Convolution`/`Deconvolution` pair maps to spconv's
`SparseConv3d`/`SparseInverseConv3d` sharing an `indice_key`, so the inverse conv returns exactly
to the finer level's voxels, as SCN's deconvolution does. A 1x1x1 shortcut is an `nn.Linear` on the
features (spconv 2.3.6's Native 1x1 conv reads its weight transposed, see `model.BasicBlock`).

With in_channels = 1 (xMUDA's input) the backbone has 2,688,656 parameters (count in
`tests/test_scn_unet.py`, derived there by hand from the layer list above); xMUDA adds a
Linear(16, 10) segmentation head (170) and the same again for its second head.

Attribute names (conv_input, enc, down, up, dec, output) are the checkpoint format.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import _spconv

XMUDA_CHANNELS = tuple(16 * (n + 1) for n in range(7))
"""m = 16, num_planes = 7: xMUDA's `n_planes`."""


def _norm(channels: int, momentum: float) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-4, momentum=momentum)  # eps: SparseConvNet's default


class VGGBlock(nn.Module):
    """SCN's non-residual UNet block: BN-ReLU, then a 3^3 submanifold conv."""

    def __init__(self, in_channels: int, channels: int, *, indice_key: str, bn_momentum: float, algo=None):
        super().__init__()
        spconv, _ = _spconv()
        self.norm = _norm(in_channels, bn_momentum)
        self.relu = nn.ReLU()
        self.conv = spconv.SubMConv3d(in_channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)

    def forward(self, x):
        return self.conv(x.replace_feature(self.relu(self.norm(x.features))))


class ResidualBlock(nn.Module):
    """SCN's residual UNet block: x + (BN-ReLU-conv, BN-ReLU-conv)(x), with a bias-free linear
    shortcut where the channel count changes."""

    def __init__(self, in_channels: int, channels: int, *, indice_key: str, bn_momentum: float, algo=None):
        super().__init__()
        spconv, _ = _spconv()
        self.shortcut = nn.Identity() if in_channels == channels else nn.Linear(in_channels, channels, bias=False)
        self.norm1 = _norm(in_channels, bn_momentum)
        self.conv1 = spconv.SubMConv3d(in_channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.norm2 = _norm(channels, bn_momentum)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.relu = nn.ReLU()

    def forward(self, x):
        shortcut = self.shortcut(x.features)
        out = self.conv1(x.replace_feature(self.relu(self.norm1(x.features))))
        out = self.conv2(out.replace_feature(self.relu(self.norm2(out.features))))
        return out.replace_feature(out.features + shortcut)


class SCNUNet(nn.Module):
    """xMUDA's SparseConvNet U-Net on spconv (ψ3D of the outdoor experiments).

    Args:
        in_channels: input features per voxel (xMUDA: 1, a constant; tttkd outdoors: 3, xyz).
        channels: channels per level, finest first (xMUDA: 16, 32, ..., 112).
        layers: blocks per level on each side of the U (xMUDA: 1 everywhere).
        residual_blocks: SCN's ResNet-style blocks instead of xMUDA's single BN-ReLU-conv.
        bn_momentum: torch BatchNorm momentum (SparseConvNet's running average keeps 0.9: 0.1).
        algo: spconv's conv algorithm (`model.conv_algo`): Native on CPU.
    """

    def __init__(self, in_channels: int, *, channels: tuple[int, ...] = XMUDA_CHANNELS,
                 layers: tuple[int, ...] = (1,) * 7, residual_blocks: bool = False, bn_momentum: float = 0.1,
                 algo=None):
        super().__init__()
        spconv, _ = _spconv()
        assert len(channels) == len(layers) >= 2, "one block count per level, at least two levels"
        block = ResidualBlock if residual_blocks else VGGBlock
        m = bn_momentum
        self.conv_input = spconv.SubMConv3d(in_channels, channels[0], 3, padding=1, bias=False,
                                            indice_key="subm0", algo=algo)
        self.enc, self.down, self.up, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level, (width, reps) in enumerate(zip(channels, layers)):
            # all submanifold convs of a level share its index pairs ("subm{level}")
            self.enc.append(nn.Sequential(*[
                block(width, width, indice_key=f"subm{level}", bn_momentum=m, algo=algo) for _ in range(reps)]))
            if level == len(channels) - 1:
                break
            coarser = channels[level + 1]
            # down[level] and up[level] share indice_key "spconv{level+1}": the inverse conv reuses the
            # strided conv's pairs and lands exactly on this level's voxels
            self.down.append(spconv.SparseSequential(
                _norm(width, m), nn.ReLU(),
                spconv.SparseConv3d(width, coarser, 2, stride=2, bias=False, indice_key=f"spconv{level + 1}", algo=algo)))
            self.up.append(spconv.SparseSequential(
                _norm(coarser, m), nn.ReLU(),
                spconv.SparseInverseConv3d(coarser, width, 2, bias=False, indice_key=f"spconv{level + 1}", algo=algo)))
            # after concatenating the skip: 2x the channels into the first block
            self.dec.append(nn.Sequential(*[
                block(2 * width if i == 0 else width, width, indice_key=f"subm{level}", bn_momentum=m, algo=algo)
                for i in range(reps)]))
        self.output = nn.Sequential(_norm(channels[0], m), nn.ReLU())
        self.out_channels = channels[0]
        self.grid_multiple = 2 ** (len(channels) - 1)

    def forward(self, x) -> torch.Tensor:
        return self.forward_sparse(x).features  # (V, m), in the input's voxel order

    def forward_sparse(self, x):
        """-> the output SparseConvTensor; its `indice_dict` holds every conv's index pairs for these
        voxels, which `model.IndexPairs` hands back with the same voxels to skip rebuilding them."""
        # every level halves the grid: its extent must divide by 2^(levels - 1)
        shape = [-(-int(s) // self.grid_multiple) * self.grid_multiple for s in x.spatial_shape]
        if shape != [int(s) for s in x.spatial_shape]:
            x = type(x)(x.features, x.indices, shape, x.batch_size, indice_dict=x.indice_dict)
        x = self.conv_input(x)
        skips = []
        for level in range(len(self.down)):
            x = self.enc[level](x)
            skips.append(x)
            x = self._downsample(self.down[level], x)
        x = self.enc[-1](x)
        for level in reversed(range(len(self.up))):
            x = self.up[level](x)
            x = x.replace_feature(torch.cat([skips.pop().features, x.features], dim=1))  # skip first, as SCN's JoinTable
            x = self.dec[level](x)
        return x.replace_feature(self.output(x.features))

    @staticmethod
    def _downsample(down, x):
        norm, relu, conv = down
        x = x.replace_feature(relu(norm(x.features)))
        pairs = x.indice_dict.get(conv.indice_key)
        if pairs is None:
            return conv(x)
        # spconv rebuilds (and refuses to reuse) a strided conv's pairs: run it on the recorded ones
        from .model import _strided_conv

        return _strided_conv(conv, x, pairs)
