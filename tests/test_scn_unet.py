"""xMUDA's SparseConvNet U-Net on spconv: a dense-conv reference, xMUDA's parameter count, shapes
through the TTT-KD heads, gradients, a few training steps, index-pair reuse."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tttkd.model import build_model, conv_algo, model_config, sparse_input
from tttkd.scn_unet import ResidualBlock, SCNUNet, VGGBlock


@pytest.fixture(autouse=True)
def one_thread():
    """Native spconv runs ~1000 tiny matmuls per step; on a shared 2-core machine two OpenMP threads
    wait for each other in every one of them (100x slower measured). One thread, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_voxels(size, fraction, channels, batch_size=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    grids = [torch.nonzero(torch.rand(size, size, size, generator=generator) < fraction).int() for _ in range(batch_size)]
    batch = torch.cat([torch.full((len(g),), b, dtype=torch.int32) for b, g in enumerate(grids)])
    grid = torch.cat(grids)
    features = torch.randn(len(grid), channels, generator=generator, dtype=torch.float64)
    return grid, batch, features


def dense_reference(net, dense, mask):
    """The U-Net with dense conv3d on a (1, C, S, S, S) grid, zeroed off the active sites (see
    test_model.dense_reference for why each sparse conv equals its dense counterpart there)."""

    def bn(module, x, m):
        shape = (1, -1, 1, 1, 1)
        y = (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
        return (y * module.weight.view(shape) + module.bias.view(shape)) * m

    def subm(conv, x, m):
        return F.conv3d(x, conv.weight.permute(0, 4, 1, 2, 3), padding=1) * m

    def blocks(sequence, x, m):
        for block in sequence:
            if isinstance(block, VGGBlock):
                x = subm(block.conv, F.relu(bn(block.norm, x, m)), m)
            else:
                assert isinstance(block, ResidualBlock)
                shortcut = x if isinstance(block.shortcut, nn.Identity) else torch.einsum(
                    "oi,bixyz->boxyz", block.shortcut.weight, x)
                y = subm(block.conv1, F.relu(bn(block.norm1, x, m)), m)
                x = subm(block.conv2, F.relu(bn(block.norm2, y, m)), m) + shortcut
        return x

    masks, skips = [mask], []
    x = subm(net.conv_input, dense, mask)
    for level in range(len(net.down)):
        x = blocks(net.enc[level], x, masks[-1])
        skips.append(x)
        norm, _, conv = net.down[level]
        coarse = F.max_pool3d(masks[-1], 2)
        x = F.conv3d(F.relu(bn(norm, x, masks[-1])), conv.weight.permute(0, 4, 1, 2, 3), stride=2) * coarse
        masks.append(coarse)
    x = blocks(net.enc[-1], x, masks[-1])
    for level in reversed(range(len(net.up))):
        norm, _, conv = net.up[level]
        x = F.conv_transpose3d(F.relu(bn(norm, x, masks[level + 1])), conv.weight.permute(4, 0, 1, 2, 3), stride=2)
        x = torch.cat([skips[level], x * masks[level]], dim=1)
        x = blocks(net.dec[level], x, masks[level])
    return F.relu(bn(net.output[0], x, mask))


@pytest.mark.parametrize("residual", [False, True])
def test_unet_matches_a_dense_conv_reference(residual):
    """Catches a wrong skip order, a missing BN-ReLU before a strided or inverse conv, or a level
    whose inverse conv does not land on its own voxels."""
    torch.manual_seed(0)
    net = SCNUNet(3, channels=(8, 16, 24), layers=(1, 2, 1), residual_blocks=residual,
                  algo=conv_algo("cpu")).double().eval()
    for module in net.modules():  # non-trivial statistics, so every BN is checked too
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.2, 0.2)
    size = 16
    grid, batch, features = random_voxels(size, 0.08, 3)
    with torch.no_grad():
        sparse = net(sparse_input(grid, batch, features, 1))
        dense = torch.zeros(1, 3, size, size, size, dtype=torch.float64)
        dense[0, :, grid[:, 0], grid[:, 1], grid[:, 2]] = features.T
        mask = torch.zeros(1, 1, size, size, size, dtype=torch.float64)
        mask[0, 0, grid[:, 0], grid[:, 1], grid[:, 2]] = 1
        reference = dense_reference(net, dense, mask)[0][:, grid[:, 0], grid[:, 1], grid[:, 2]].T
    assert sparse.shape == (len(grid), 8)
    assert (reference.abs() > 0).float().mean() > 0.3  # not a trivially zero output
    torch.testing.assert_close(sparse, reference, rtol=1e-8, atol=1e-8)


def test_parameter_count_is_xmudas():
    """xMUDA's UNetSCN(in_channels=1): m = 16, 7 planes, block_reps 1, no residual blocks.

    By hand: input conv 27*1*16; per level p = 16(l+1): block BN 2p + conv 27p^2; between levels
    p -> q: BN 2p + conv 8pq, BN 2q + inverse conv 8qp, decoder block BN 2(2p) + conv 27(2p)p;
    output BN 2*16."""
    planes = [16 * (n + 1) for n in range(7)]
    by_hand = 27 * 16 + 2 * 16 + sum(2 * p + 27 * p * p for p in planes)
    by_hand += sum(2 * p + 8 * p * q + 2 * q + 8 * q * p + 4 * p + 54 * p * p for p, q in zip(planes, planes[1:]))
    assert by_hand == 2_688_656
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(SCNUNet(1)) == by_hand
    assert count(SCNUNet(1, residual_blocks=True)) == 4_333_488  # SCN's residual variant, for contrast


def test_scn_unet_is_selectable_and_gives_per_voxel_outputs():
    model = build_model(model_config("scn_unet", in_channels=3, num_classes=10, kd_dim=32))
    assert model.backbone.out_channels == 16 and isinstance(model.backbone, SCNUNet)
    grid, batch, features = random_voxels(40, 0.02, 3, batch_size=2)  # extent 40: not a multiple of 64
    logits, kd = model(sparse_input(grid, batch, features.float(), 2))
    assert logits.shape == (len(grid), 10) and kd.shape == (len(grid), 32)
    with pytest.raises(ValueError, match="unknown backbone 'pointnet'; choose minkunet or scn_unet"):
        build_model(model_config("scn_unet", backbone="pointnet"))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(1)
    model = build_model(model_config("scn_unet", in_channels=3, num_classes=10, kd_dim=16)).train()
    grid, batch, features = random_voxels(48, 0.03, 3, batch_size=2)
    logits, kd = model(sparse_input(grid, batch, features.float(), 2))
    labels = torch.randint(0, 10, (len(grid),))
    (F.cross_entropy(logits, labels) - F.cosine_similarity(kd, torch.randn_like(kd)).mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_a_few_training_steps_fit_a_tiny_batch():
    """The voxel's height decides its class: a U-Net that learns (not a frozen or disconnected one)
    drives the loss well down within 30 steps."""
    torch.manual_seed(2)
    model = build_model(model_config("scn_unet", in_channels=3, num_classes=3, kd_dim=None, bn_momentum=0.1)).train()
    grid, batch, _ = random_voxels(32, 0.03, 3, batch_size=2)
    features = grid.float() / 32 - 0.5
    labels = (grid[:, 2] * 3 // 32).long()
    voxels = sparse_input(grid, batch, features, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(voxels)[0], labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses


def test_recorded_index_pairs_give_the_same_features():
    """model.IndexPairs drives this backbone too: reused pairs (the strided convs included) compute
    what freshly built ones do."""
    from tttkd.model import IndexPairs

    torch.manual_seed(3)
    model = build_model(model_config("scn_unet", in_channels=3, num_classes=4, kd_dim=None)).eval()
    grid, batch, features = random_voxels(40, 0.03, 3)
    voxels = sparse_input(grid, batch, features.float(), 1)
    pairs = IndexPairs()
    with torch.no_grad():
        first = pairs.features(model.backbone, voxels)
        reused = model.backbone.forward_sparse(pairs.with_pairs(voxels))
        again = pairs.features(model.backbone, voxels)
    assert "spconv1" in pairs.with_pairs(voxels).indice_dict  # the second pass really had pairs to reuse
    torch.testing.assert_close(reused.features, first)
    torch.testing.assert_close(again, first)


def test_ttt_kd_steps_train_exactly_the_backbone_through_reused_pairs():
    """TTT-KD on the xMUDA backbone: the strided convs run on recorded pairs with autograd, every
    backbone tensor learns, projectors and BN statistics stay as they were."""
    from rooms import room_scene

    from tttkd.adapt import AdaptConfig, TTTKD, rotated
    from tttkd.data import DataConfig

    torch.manual_seed(4)
    model = build_model(model_config("scn_unet", kd_dim=16, num_classes=20))
    scene = room_scene(8000, kd_dim=16)
    view = rotated(scene, 0.0, DataConfig(voxel_size_m=0.05), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    adapter = TTTKD(model, AdaptConfig(steps=2, lr=0.1, kd_points=1024, rotations=1))
    generator = np.random.default_rng(0)
    for _ in range(2):
        adapter.step(view, *adapter.sample_targets(scene, view, generator))
    assert "spconv6" in view.pairs.with_pairs(view.voxels).indice_dict  # the second step reused them
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {n for n in before if n.startswith("backbone.")}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backbone_matches_the_cpu_native_one():
    """spconv's CUDA algorithms (implicit GEMM) against the CPU's Native on the same weights and voxels."""
    torch.manual_seed(5)
    config = model_config("scn_unet", in_channels=3, num_classes=10, kd_dim=None)
    cpu = build_model(config).eval()
    cuda = build_model(config, device="cuda").eval()
    cuda.load_state_dict(cpu.state_dict())
    grid, batch, features = random_voxels(100, 0.01, 3, batch_size=2)
    with torch.no_grad():
        expected = cpu.forward_features(sparse_input(grid, batch, features.float(), 2))
        got = cuda.forward_features(sparse_input(grid.cuda(), batch.cuda(), features.float().cuda(), 2))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)


def test_a_checkpoint_rebuilds_the_scn_unet():
    """model_config travels in the checkpoint: the backbone field must bring back this network, not MinkUNet."""
    from dataclasses import asdict

    from tttkd.checkpoint import model_from_checkpoint

    config = model_config("scn_unet", in_channels=3, num_classes=10, kd_dim=8)
    model = build_model(config)
    rebuilt = model_from_checkpoint({"model_config": asdict(config), "model": model.state_dict()}, device="cpu")
    assert isinstance(rebuilt.backbone, SCNUNet) and rebuilt.config == config
