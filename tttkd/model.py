"""The 3D network of TTT-KD (paper §3.2): backbone ψ3D and two projectors.

    voxels (V, in_channels) --backbone (ψ3D, MinkUNet34C)--> (V, 96) features F3D
        --seg_head (ρY)--> (V, C) class logits
        --kd_head  (ρ2D)--> (V, D) prediction of the cached teacher feature

The backbone is the MinkUNet34C layout as Pointcept's SpUNet-v1m1 writes it on spconv: a 5^3 stem
of 32 channels, four encoder stages (stride-2 conv, then 2/3/4/6 residual blocks of
32/64/128/256 channels) and four decoder stages (inverse conv, concatenation with the encoder
skip, then 2 blocks each of 256/128/96/96 channels). `forward_features` runs the backbone only,
so test-time training runs backbone + kd_head and evaluation backbone + seg_head.

Attribute names (conv_input, down, enc, up, dec, seg_head, kd_head) are the checkpoint format.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn


def _spconv():
    # spconv takes ~5 s to import: load it when a model is built, not when tttkd is imported.
    # Its import warns about deprecated torch.cuda.amp decorators and trips a torch.fx log line:
    # noise for users, nothing they can act on.
    import logging

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import spconv.pytorch as spconv
        from spconv.core import ConvAlgo

    return spconv, ConvAlgo


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 6
    """colour + normal indoors (paper §4.1); 3 (xyz) for LiDAR."""
    num_classes: int = 20
    kd_dim: int | None = 1024
    """Teacher feature dimension (the cache's); None builds the Source-Only model without kd_head."""
    stem_channels: int = 32
    channels: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)
    seg_hidden: int = 96
    """ρY: Linear(96, 96) -> BN -> ReLU -> Linear(96, C)."""
    kd_hidden: int = 512
    """ρ2D: Linear(96, 512) -> BN -> ReLU -> Linear(512, D)."""
    bn_momentum: float = 0.01
    """Running-statistics momentum of the backbone's BatchNorm (Pointcept's SpUNet: 0.01)."""
    backbone: str = "minkunet"
    """Which ψ3D: "minkunet" (the layout above) or "scn_unet" (xMUDA's SparseConvNet U-Net, `scn_unet.py`:
    `channels` per level, `layers` blocks per level on each side; `stem_channels` unused)."""


def conv_algo(device: torch.device | str):
    """spconv's algorithm for a device: on CPU only Native is implemented (the default asserts
    "Torch not compiled with CUDA"); on CUDA the default implicit GEMM. Weights have one layout
    for all algorithms, so checkpoints move between the two."""
    _, ConvAlgo = _spconv()
    return ConvAlgo.Native if torch.device(device).type == "cpu" else None


class BasicBlock(nn.Module):
    """Two 3^3 submanifold convs with BN and a residual (1x1 projection where channels change)."""

    def __init__(self, in_channels: int, channels: int, *, indice_key: str, bn_momentum: float, algo=None):
        super().__init__()
        spconv, _ = _spconv()
        # A 1x1x1 submanifold conv is a per-voxel linear map: written as nn.Linear on the features.
        # spconv 2.3.6's Native 1x1 conv reads its (out, 1, 1, 1, in) weight as (in, out), so a
        # checkpoint would compute different functions on CPU and GPU (found by the dense-reference test).
        if in_channels == channels:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Sequential(nn.Linear(in_channels, channels, bias=False), _norm(channels, bn_momentum))
        self.conv1 = spconv.SubMConv3d(in_channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.bn1 = _norm(channels, bn_momentum)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key, algo=algo)
        self.bn2 = _norm(channels, bn_momentum)
        self.relu = nn.ReLU()

    def forward(self, x):
        residual = self.proj(x.features)
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(self.relu(self.bn2(out.features) + residual))


def _norm(channels: int, momentum: float) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=momentum)  # eps: Pointcept's SpUNet value


class Backbone(nn.Module):
    """MinkUNet34C on spconv (ψ3D)."""

    def __init__(self, config: ModelConfig, *, algo=None):
        super().__init__()
        spconv, _ = _spconv()
        channels, layers = config.channels, config.layers
        assert len(channels) == len(layers) and len(layers) % 2 == 0, "one channel count per stage"
        stages = len(layers) // 2
        m = config.bn_momentum
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(config.in_channels, config.stem_channels, 5, padding=1, bias=False,
                              indice_key="stem", algo=algo),
            _norm(config.stem_channels, m), nn.ReLU())
        self.down, self.enc, self.up, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        enc_channels, dec_channels = config.stem_channels, channels[-1]
        for s in range(stages):
            # down[s] and up[s] share indice_key "spconv{s+1}": the inverse conv reuses the down
            # conv's index pairs to return exactly to the finer level's voxels
            self.down.append(spconv.SparseSequential(
                spconv.SparseConv3d(enc_channels, channels[s], 2, stride=2, bias=False,
                                    indice_key=f"spconv{s + 1}", algo=algo),
                _norm(channels[s], m), nn.ReLU()))
            # blocks are plain modules taking a SparseConvTensor: nn.Sequential, not SparseSequential
            # (which would hand them only the features)
            self.enc.append(nn.Sequential(*[
                BasicBlock(channels[s], channels[s], indice_key=f"subm{s + 1}", bn_momentum=m, algo=algo) for _ in range(layers[s])]))
            up_in = channels[len(channels) - s - 2]
            self.up.append(spconv.SparseSequential(
                spconv.SparseInverseConv3d(up_in, dec_channels, 2, indice_key=f"spconv{s + 1}", bias=False, algo=algo),
                _norm(dec_channels, m), nn.ReLU()))
            # decoder stage s works at the resolution of encoder stage s - 1 (s = 0: the stem's)
            self.dec.append(nn.Sequential(*[
                BasicBlock(dec_channels + enc_channels if i == 0 else dec_channels, dec_channels,
                           indice_key=f"subm{s}", bn_momentum=m, algo=algo) for i in range(layers[len(channels) - s - 1])]))
            enc_channels, dec_channels = channels[s], channels[len(channels) - s - 2]
        self.out_channels = channels[-1]

    def forward(self, x):
        return self.forward_sparse(x).features  # (V, 96), in the input's voxel order

    def forward_sparse(self, x, stem: "GatherStem | None" = None):
        """-> the last layer's SparseConvTensor, whose `indice_dict` holds every conv's index pairs
        for these voxels. Given back with the input (`with_pairs`), they are reused, not rebuilt.
        `stem`: the stem conv as a gather and a matrix product (`gather_stem`) instead of spconv's."""
        if stem is None:
            x = self.conv_input(x)
        else:
            conv, *rest = self.conv_input
            y = stem(x.features, conv.weight)
            for module in rest:
                y = module(y)
            x = x.replace_feature(y)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(_downsample(down, x))
            skips.append(x)
        x = skips.pop()
        for s in reversed(range(len(self.up))):
            x = self.up[s](x)
            x = x.replace_feature(torch.cat([x.features, skips.pop().features], dim=1))
            x = self.dec[s](x)
        return x

    def gather_stem(self, x) -> "GatherStem | None":
        """The stem conv of `x`'s voxels as a `GatherStem`, from the pairs recorded in `x`, checked
        once against spconv's own stem on them; None (keep spconv's) if there are none or it differs."""
        return GatherStem.of(self.conv_input[0], x)


class _GatherConv(torch.autograd.Function):
    """y = G(x) W for a submanifold conv: row i of G(x) holds the features of voxel i's K neighbours
    (a zero row where there is none), W the (K·C_in, C_out) weight. Only the table is saved; the
    gather is recomputed in backward, so nothing of N·K·C_in floats stays alive between the passes."""

    @staticmethod
    def forward(ctx, features, weight, neighbours):
        ctx.save_for_backward(features, weight, neighbours)
        return _gathered(features, neighbours) @ weight.reshape(weight.shape[0], -1).t()

    @staticmethod
    def backward(ctx, grad):
        features, weight, neighbours = ctx.saved_tensors
        grad_features = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.t() @ _gathered(features, neighbours)).reshape(weight.shape)
        if ctx.needs_input_grad[0]:
            per_neighbour = (grad @ weight.reshape(weight.shape[0], -1)).reshape(-1, features.shape[1])
            padded = features.new_zeros(len(features) + 1, features.shape[1])
            padded.index_add_(0, neighbours.reshape(-1), per_neighbour)
            grad_features = padded[:-1]
        return grad_features, grad_weight, None


def _gathered(features: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    padded = torch.cat([features, features.new_zeros(1, features.shape[1])])
    return padded.index_select(0, neighbours.reshape(-1)).reshape(len(neighbours), -1)


class GatherStem:
    """MinkUNet34C's 5^3 submanifold stem as one gather and one matrix product, for voxels whose
    index pairs are recorded (`IndexPairs`).

    Why: a conv of more than 32 kernel offsets runs on spconv's Native algorithm even on CUDA, and
    spconv 2.3's Native backward hands cumm no split-K workspace for the weight gradient, so cumm
    allocates one with cudaMalloc and frees it (which waits for the GPU) for every offset with pairs,
    every step; its forward and backward also copy the pair counts to the host (read in spconv's
    and cumm's source). That accounts for the 24 cudaMalloc/cudaFree per TTT step of the profile
    (24 offsets with pairs in its slab scene; up to 124 in a room), and would stop a CUDA-graph
    capture; `tests/test_gpu.py` checks that a step makes none. The table is built once per voxel set; the weight is the conv's own
    (K = 125 offsets in spconv's order), so checkpoints do not change. Same function up to float
    summation order; `of` checks it against spconv on the recorded voxels before it is used."""

    def __init__(self, neighbours: torch.Tensor):
        self.neighbours = neighbours  # (N, K) int32; N marks "no neighbour" (the zero row)

    def __call__(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _GatherConv.apply(features, weight, self.neighbours)

    @staticmethod
    def table(pairs, num_voxels: int) -> torch.Tensor:
        """(N, K) neighbour table from spconv's Native submanifold pairs. For offset k < K/2 spconv
        counts `indice_pair_num[k]` pairs (input P[0], output P[1]); a submanifold conv is symmetric,
        so the same pairs, swapped, are offset K-1-k's. Only those counted pairs are read."""
        p, counts = pairs.indice_pairs, pairs.indice_pair_num.cpu().tolist()
        kernel = p.shape[1]
        centre = kernel // 2
        table = torch.full((num_voxels, kernel), num_voxels, dtype=torch.int32, device=p.device)
        table[:, centre] = torch.arange(num_voxels, dtype=torch.int32, device=p.device)
        for k in range(centre):
            inputs, outputs = p[0, k, :counts[k]].long(), p[1, k, :counts[k]].long()
            table[outputs, k] = inputs.int()
            table[inputs, kernel - 1 - k] = outputs.int()
        return table

    @classmethod
    def of(cls, conv, x) -> "GatherStem | None":
        """The stem `conv` for the voxels of `x` (which carries the recorded pairs), or None where
        the pairs are not Native submanifold pairs of the layout `table` reads, or the result differs
        from spconv's own (then with a warning)."""
        from spconv.pytorch.core import IndiceData

        pairs = x.indice_dict.get(conv.indice_key)
        if not (conv.subm and conv.bias is None and isinstance(pairs, IndiceData) and pairs.is_subm):
            return None
        p, n, kernel = pairs.indice_pairs, x.features.shape[0], conv.weight[0].numel() // conv.weight.shape[-1]
        counts = pairs.indice_pair_num
        # a layout other than the one `table` reads is refused before any index is used (an index out of
        # range would be a device-side assert on CUDA, fatal to the process)
        if not (p.dim() == 3 and tuple(p.shape[:2]) == (2, kernel) and tuple(counts.shape) == (kernel,)):
            return None
        if p.numel() and not (int(counts.max()) <= p.shape[2] and int(p.min()) >= -1 and int(p.max()) < n):
            return None
        try:
            stem = cls(cls.table(pairs, n))
            with torch.no_grad():  # once per voxel set: the same function as spconv's, or spconv stays
                expected = conv(x).features
                ours = stem(x.features, conv.weight)
        except RuntimeError as e:  # out of memory, say: the stem is only a speed-up
            warnings.warn(f"the stem could not be gathered ({str(e).splitlines()[0]}): spconv's stem is kept")
            return None
        # fp32 agrees to ~1e-6 of the largest output; TF32 products (tensor_float32) to ~1e-3
        tf32 = torch.backends.cuda.matmul.allow_tf32 and expected.is_cuda
        scale = max(1.0, expected.abs().max().item())
        error = (ours - expected).abs().max().item()
        if error > (1e-2 if tf32 else 1e-4) * scale:
            warnings.warn(f"the gathered stem differs from spconv's by {error:.3g}: spconv's stem is kept for these voxels")
            return None
        return stem


def _downsample(down, x):
    """down = (stride-2 conv, BN, ReLU). spconv reuses recorded pairs for submanifold and inverse
    convs only (a strided conv asserts "only support reuse subm indices" when its indice_key is
    already in the tensor), so with recorded pairs the strided conv runs through `_strided_conv`."""
    conv = down[0]
    pairs = x.indice_dict.get(conv.indice_key)
    if pairs is None:
        return down(x)
    x = _strided_conv(conv, x, pairs)
    for module in list(down)[1:]:
        x = x.replace_feature(module(x.features))
    return x


def _strided_conv(conv, x, pairs):
    """What spconv's SparseConvolution.forward computes for a bias-free strided conv once it has
    the index pairs: the same autograd function on the recorded pairs (spconv 2.3's API)."""
    from spconv.pytorch import functional as Fsp
    from spconv.pytorch.core import ImplicitGemmIndiceData

    assert conv.bias is None and not conv.subm and not conv.inverse and not pairs.is_subm
    assert pairs.indices.shape == x.indices.shape and list(pairs.spatial_shape) == list(x.spatial_shape), \
        f"recorded pairs of {conv.indice_key} belong to other voxels"
    features, out_voxels = x.features.contiguous(), pairs.out_indices.shape[0]
    if isinstance(pairs, ImplicitGemmIndiceData):
        out = Fsp.implicit_gemm(features, conv.weight, pairs.pair_fwd, pairs.pair_bwd, pairs.pair_mask_fwd_splits,
                                pairs.pair_mask_bwd_splits, pairs.mask_argsort_fwd_splits,
                                pairs.mask_argsort_bwd_splits, out_voxels, pairs.masks, conv.training, False,
                                x._timer, conv.fp32_accum)
    else:  # Native (CPU)
        out = Fsp.indice_conv(features, conv.weight, pairs.indice_pairs, pairs.indice_pair_num, out_voxels,
                              conv.algo, x._timer)
    y = x.replace_feature(out)
    y.indices, y.spatial_shape = pairs.out_indices, list(pairs.out_spatial_shape)
    return y


class IndexPairs:
    """spconv's index pairs of every backbone conv for one set of voxels, recorded by the first
    forward over them and reused by the next.

    The voxels of a rotated scene do not change across its TTT steps, so building the pairs (hash
    tables, sorts and host syncs in every layer) once per rotation instead of once per step
    leaves the same function at a fraction of the host work. The record belongs to the voxels'
    `indices` tensor: other voxels (another rotation or scene) are recorded afresh. Record with
    the convs in the mode they will run in: on CUDA a submanifold conv in eval mode builds no
    backward pairs.
    """

    def __init__(self):
        self._indices, self._pairs, self._stem, self._stem_tried = None, None, None, False

    def with_pairs(self, voxels):
        """`voxels` carrying the recorded pairs, or unchanged if none were recorded for them."""
        if self._pairs is None or self._indices is not voxels.indices:
            return voxels
        return type(voxels)(voxels.features, voxels.indices, voxels.spatial_shape, voxels.batch_size,
                            indice_dict=dict(self._pairs))

    def features(self, backbone: Backbone, voxels) -> torch.Tensor:
        """(V, 96) backbone features, recording the pairs on the first call for these voxels; on
        the second, for a backbone with `gather_stem`, its stem becomes a gather (`GatherStem`): only
        voxels that are reused pay for building it."""
        same = self._indices is voxels.indices
        if same and self._stem is None and not self._stem_tried:
            self._stem_tried = True
            gather_stem = getattr(backbone, "gather_stem", None)
            self._stem = gather_stem(self.with_pairs(voxels)) if gather_stem is not None else None
        if same and self._stem is not None:
            return backbone.forward_sparse(self.with_pairs(voxels), stem=self._stem).features
        out = backbone.forward_sparse(self.with_pairs(voxels))
        if not same:
            self._indices, self._pairs, self._stem, self._stem_tried = voxels.indices, out.indice_dict, None, False
        return out.features


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class TTTKDNet(nn.Module):
    """Backbone ψ3D with the segmentation head ρY and the distillation head ρ2D."""

    def __init__(self, config: ModelConfig, *, algo=None):
        super().__init__()
        self.config = config
        self.backbone = _backbone(config, algo=algo)
        self.seg_head = _mlp(self.backbone.out_channels, config.seg_hidden, config.num_classes)
        self.kd_head = (_mlp(self.backbone.out_channels, config.kd_hidden, config.kd_dim)
                        if config.kd_dim else nn.Identity())

    @property
    def has_kd_head(self) -> bool:
        return not isinstance(self.kd_head, nn.Identity)

    def forward_features(self, voxels) -> torch.Tensor:
        """spconv.SparseConvTensor -> (V, 96) backbone features."""
        return self.backbone(voxels)

    def forward(self, voxels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (seg logits (V, C), kd prediction (V, D) or None for the Source-Only model)."""
        features = self.forward_features(voxels)
        return self.seg_head(features), (self.kd_head(features) if self.has_kd_head else None)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def sparse_convs(model: nn.Module) -> list[nn.Module]:
    spconv, _ = _spconv()
    return [m for m in model.modules() if isinstance(m, spconv.conv.SparseConvolution)]


@contextlib.contextmanager
def tensor_float32(enabled: bool):
    """Inside, spconv's and torch's float32 matrix products may run on TF32 tensor cores (CUDA,
    Ampere and later; no effect on CPU). spconv 2.3.8 otherwise runs fp32 convs on SIMT kernels:
    20.7 ms of kernels per MinkUNet34C TTT step at 25k voxels, 11.1 ms with TF32 (H200). TF32 keeps
    10 mantissa bits, so it is opt-in until adapted mIoU is shown unchanged. The flags are
    process-wide: they are restored on exit."""
    if not enabled:
        yield
        return
    import spconv.constants as spconv_constants  # read by spconv's ops at every call

    saved = (spconv_constants.SPCONV_ALLOW_TF32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    spconv_constants.SPCONV_ALLOW_TF32 = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        (spconv_constants.SPCONV_ALLOW_TF32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Every module in training mode except batch norm, which uses (and keeps) its running statistics.

    This, not `model.eval()`, is how to train weights with BN statistics fixed: on CUDA a spconv
    conv whose `training` is False runs its implicit-GEMM kernel outside autograd, so no gradient
    reaches its weight or anything before it. (On CPU the Native algorithm always has autograd,
    so only a GPU test sees the difference.) The forward pass is the same function either way.
    """
    model.train()
    for bn in batch_norms(model):
        bn.eval()
    return model


def convs_without_gradients(model: nn.Module) -> list[nn.Module]:
    """spconv convs whose weights should learn but which are in eval mode (no gradient on CUDA)."""
    return [m for m in sparse_convs(model) if not m.training and any(p.requires_grad for p in m.parameters())]


def build_model(config: ModelConfig, *, device: torch.device | str = "cpu") -> TTTKDNet:
    return TTTKDNet(config, algo=conv_algo(device)).to(device)


def sparse_input(grid_coord: torch.Tensor, batch_index: torch.Tensor, features: torch.Tensor, batch_size: int):
    """spconv's input: (V, 4) int32 [batch, x, y, z] indices over a grid that holds every voxel.

    The spatial shape is the largest coordinate + 1, rounded up to a multiple of 16 so that the
    four stride-2 levels halve it exactly.
    """
    spconv, _ = _spconv()
    extent = (grid_coord.max(0).values + 1).tolist() if len(grid_coord) else [1, 1, 1]
    shape = [-(-int(e) // 16) * 16 for e in extent]
    indices = torch.cat([batch_index[:, None], grid_coord], dim=1).int().contiguous()
    return spconv.SparseConvTensor(features, indices, shape, batch_size)


def _backbone(config: ModelConfig, *, algo=None) -> nn.Module:
    if config.backbone == "scn_unet":
        from .scn_unet import SCNUNet  # scn_unet imports this module: import it when asked for

        return SCNUNet(config.in_channels, channels=config.channels, layers=config.layers,
                       bn_momentum=config.bn_momentum, algo=algo)
    if config.backbone != "minkunet":
        raise ValueError(f"unknown backbone {config.backbone!r}; choose minkunet or scn_unet")
    return Backbone(config, algo=algo)


def model_config(variant: str = "minkunet34c", **fields) -> ModelConfig:
    """Named model sizes. "minkunet34c" is the paper's; "small" (3 M parameters, one block per
    stage, half the channels) is for CPU runs: the demo, tests and quick experiments."""
    variants = {
        "minkunet34c": {},
        "small": dict(stem_channels=16, channels=(16, 32, 64, 128, 128, 64, 48, 48), layers=(1,) * 8,
                      seg_hidden=48, kd_hidden=128),
        # xMUDA / MM-TTA's 3D network (paper §4.2): 16..112 channels over 7 levels, 16 out
        "scn_unet": dict(backbone="scn_unet", stem_channels=16, channels=tuple(16 * (n + 1) for n in range(7)),
                         layers=(1,) * 7, seg_hidden=16),
    }
    if variant not in variants:
        raise ValueError(f"unknown model {variant!r}; choose one of {', '.join(variants)}")
    return ModelConfig(**{**variants[variant], **fields})
