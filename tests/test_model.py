"""The 3D network: the sparse backbone against a dense-conv reference, heads, gradients, checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tttkd.model import BasicBlock, build_model, model_config, sparse_input


def dense_reference(backbone, dense, mask):
    """The backbone evaluated with dense conv3d on a (1, C, S, S, S) grid, zeroed off the active sites.

    Submanifold conv = dense 'same' conv restricted to active sites; a stride-2 sparse conv is a dense
    stride-2 conv whose active sites are the 2x2x2 max-pool of the finer mask; an inverse conv is a
    dense transposed conv restricted to the finer level's sites (spconv keeps KRSC weights)."""
    import spconv.pytorch as spconv

    def layer(module, x, m):
        if isinstance(module, spconv.SubMConv3d):
            k = module.kernel_size[0]
            return F.conv3d(x, module.weight.permute(0, 4, 1, 2, 3), padding=k // 2) * m
        if isinstance(module, nn.BatchNorm1d):
            shape = (1, -1, 1, 1, 1)
            y = (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
            return (y * module.weight.view(shape) + module.bias.view(shape)) * m
        if isinstance(module, nn.ReLU):
            return F.relu(x)
        raise TypeError(module)

    def sequence(seq, x, m):
        for module in seq:
            if isinstance(module, BasicBlock):
                residual = x if isinstance(module.proj, nn.Identity) else linear_bn(module.proj, x, m)
                y = layer(module.relu, layer(module.bn1, layer(module.conv1, x, m), m), m)
                x = F.relu(layer(module.bn2, layer(module.conv2, y, m), m) + residual)
            else:
                x = layer(module, x, m)
        return x

    def linear_bn(proj, x, m):
        linear, bn = proj
        return layer(bn, torch.einsum("oi,bixyz->boxyz", linear.weight, x), m)

    masks = [mask]
    x = sequence(backbone.conv_input, dense, mask)
    skips = [x]
    for down, enc in zip(backbone.down, backbone.enc):
        coarse = F.max_pool3d(masks[-1], 2)
        x = F.conv3d(x, down[0].weight.permute(0, 4, 1, 2, 3), stride=2) * coarse
        x = sequence(list(down)[1:], x, coarse)
        x = sequence(enc, x, coarse)
        masks.append(coarse)
        skips.append(x)
    x = skips.pop()
    masks.pop()
    for s in reversed(range(len(backbone.up))):
        fine = masks.pop()
        x = F.conv_transpose3d(x, backbone.up[s][0].weight.permute(4, 0, 1, 2, 3), stride=2) * fine
        x = sequence(list(backbone.up[s])[1:], x, fine)
        x = torch.cat([x, skips.pop()], dim=1)
        x = sequence(backbone.dec[s], x, fine)
    return x


@pytest.mark.parametrize("variant", ["minkunet34c", "small"])
def test_backbone_matches_a_dense_conv_reference(variant):
    torch.manual_seed(0)
    model = build_model(model_config(variant, kd_dim=8, num_classes=5)).double().eval()
    for module in model.modules():  # non-trivial BN statistics, so BN is checked too
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.2, 0.2)
    size = 16
    grid = torch.nonzero(torch.rand(size, size, size) < 0.08).int()
    features = torch.randn(len(grid), 6, dtype=torch.float64)
    with torch.no_grad():
        sparse = model.forward_features(sparse_input(grid, torch.zeros(len(grid), dtype=torch.int32), features, 1))
        dense = torch.zeros(1, 6, size, size, size, dtype=torch.float64)
        dense[0, :, grid[:, 0], grid[:, 1], grid[:, 2]] = features.T
        mask = torch.zeros(1, 1, size, size, size, dtype=torch.float64)
        mask[0, 0, grid[:, 0], grid[:, 1], grid[:, 2]] = 1
        expected = dense_reference(model.backbone, dense, mask)[0][:, grid[:, 0], grid[:, 1], grid[:, 2]].T
    assert sparse.shape == (len(grid), 96 if variant == "minkunet34c" else 48)
    assert (sparse - expected).norm() / expected.norm() < 1e-10


def test_minkunet34c_has_the_paper_layout():
    model = build_model(model_config("minkunet34c", kd_dim=1024, num_classes=20))
    assert [len(stage) for stage in model.backbone.enc] == [2, 3, 4, 6]
    assert [len(stage) for stage in model.backbone.dec] == [2, 2, 2, 2]
    assert model.seg_head[-1].out_features == 20 and model.kd_head[-1].out_features == 1024
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    assert 37e6 < backbone_params < 40e6  # MinkUNet34C: ~38 M


def test_source_only_model_has_no_kd_head():
    model = build_model(model_config("small", kd_dim=None, num_classes=5))
    assert not model.has_kd_head and not any(k.startswith("kd_head") for k in model.state_dict())


def test_every_trainable_parameter_gets_a_gradient_from_the_joint_loss():
    torch.manual_seed(0)
    model = build_model(model_config("small", kd_dim=8, num_classes=5))
    grid = torch.nonzero(torch.rand(24, 24, 24) < 0.1).int()
    logits, kd = model(sparse_input(grid, torch.zeros(len(grid), dtype=torch.int32), torch.randn(len(grid), 6), 1))
    (logits.logsumexp(1).mean() + kd.pow(2).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing
