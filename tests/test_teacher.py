"""Teachers: DINOv2 against an independent implementation, weight loading, sampling, decoding."""

import numpy as np
import pytest
import torch
from PIL import Image

from tttkd.pipeline import dinov2
from tttkd.pipeline.teacher import (WeightsNotFoundError, build_network, decode_image, load_teacher,
                                    resolve_weights, sample_features)


def official_to_hf(state: dict, depth: int) -> dict:
    """Rename an official-format DINOv2 state dict to transformers' Dinov2Model names."""
    hf = {
        "embeddings.cls_token": state["cls_token"], "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"],
    }
    if "register_tokens" in state:
        hf["embeddings.register_tokens"] = state["register_tokens"]
    for i in range(depth):
        o, h = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = state[o + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = state[o + "attn.qkv.bias"].chunk(3)
        hf.update({
            h + "norm1.weight": state[o + "norm1.weight"], h + "norm1.bias": state[o + "norm1.bias"],
            h + "attention.q_proj.weight": q, h + "attention.q_proj.bias": qb,
            h + "attention.k_proj.weight": k, h + "attention.k_proj.bias": kb,
            h + "attention.v_proj.weight": v, h + "attention.v_proj.bias": vb,
            h + "attention.o_proj.weight": state[o + "attn.proj.weight"],
            h + "attention.o_proj.bias": state[o + "attn.proj.bias"],
            h + "layer_scale1.lambda1": state[o + "ls1.gamma"], h + "layer_scale2.lambda1": state[o + "ls2.gamma"],
            h + "norm2.weight": state[o + "norm2.weight"], h + "norm2.bias": state[o + "norm2.bias"],
            h + "mlp.fc1.weight": state[o + "mlp.fc1.weight"], h + "mlp.fc1.bias": state[o + "mlp.fc1.bias"],
            h + "mlp.fc2.weight": state[o + "mlp.fc2.weight"], h + "mlp.fc2.bias": state[o + "mlp.fc2.bias"],
        })
    return hf


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (layer scales too), so no block is a near-identity that hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("size", [(224, 224), (518, 518), (238, 322)])
def test_dinov2_matches_transformers_on_the_same_random_weights(registers, size):
    transformers = pytest.importorskip("transformers")
    ours = randomized(dinov2.build_dinov2("vits14", registers=registers), seed=1)
    if size != (518, 518) and not registers:
        # the official base models resize positional embeddings by a scale factor (n + 0.1) / 37;
        # transformers resizes to the exact size: compare the two with the exact-size rule
        ours.config = dinov2.replace(ours.config, interpolate_offset=0.0)
    common = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
                  layerscale_value=1.0, layer_norm_eps=1e-6)
    if registers:
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    hf.load_state_dict(official_to_hf(ours.state_dict(), depth=12))
    hf.eval()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state[:, 1 + 4 * registers:]
        got = ours.forward_tokens(images)
    assert got.shape == (2, (size[0] // 14) * (size[1] // 14), 384)
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_dinov2_offset_rule_differs_from_exact_resize():
    """The official (n + 0.1) / 37 scale factor is a different function: keeping it is a choice."""
    model = randomized(dinov2.build_dinov2("vits14"), seed=3)
    exact = dinov2.DinoVisionTransformer(dinov2.replace(model.config, interpolate_offset=0.0))
    exact.load_state_dict(model.state_dict())
    assert not torch.allclose(model.positional_embedding(17, 23), exact.positional_embedding(17, 23))


def test_official_checkpoint_loads_from_explicit_path_and_torch_hub_cache(tmp_path, monkeypatch):
    network = randomized(build_network("dinov2_vits14"), seed=4)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(network.state_dict(), path)
    teacher = load_teacher("dinov2_vits14", weights=path)
    images = torch.randn(1, 3, 56, 84)
    expected = network(images)
    torch.testing.assert_close(teacher.features(images), expected)
    assert teacher.features(images).shape == (1, 384, 4, 6)

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(WeightsNotFoundError, match=r"dinov2_vits14_pretrain\.pth.*--weights"):
        resolve_weights("dinov2_vits14")
    (hub / "checkpoints" / path.name).write_bytes(path.read_bytes())
    torch.testing.assert_close(load_teacher("dinov2_vits14").features(images), expected)


def test_checkpoint_of_another_architecture_is_refused_with_its_path(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(build_network("dinov2_vits14").state_dict(), path)
    with pytest.raises(ValueError, match=r"small\.pth: not a dinov2_vitb14 checkpoint"):
        load_teacher("dinov2_vitb14", weights=path)


def test_checkpoint_with_pickled_objects_is_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": object()}, path)  # loading this needs full unpickling
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_teacher("dinov2_vits14", weights=path)


def crossword(seed: int, *, cells: int = 15, cell_px: int = 15) -> np.ndarray:
    """(224, 224, 3) uint8: an empty crossword grid (white cells, black lines, symmetric black
    squares), which an ImageNet classifier recognises as class 918, "crossword puzzle"."""
    black = np.random.default_rng(seed).random((cells, cells)) < 0.18
    black |= black[::-1, ::-1]
    image = np.where(np.kron(black, np.ones((cell_px, cell_px), bool)), 0, 255).astype(np.uint8)
    image[::cell_px] = image[1::cell_px] = 0
    image[:, ::cell_px] = image[:, 1::cell_px] = 0
    return np.repeat(image[:224, :224, None], 3, axis=2)


CROSSWORD_PUZZLE = 918  # ImageNet-1k class index


def test_efficientnet_lite_loads_its_imagenet_weights_and_classifies_a_real_signal():
    # bug it catches: weights silently not loaded (random init), loaded into the wrong modules, or
    # images normalised with the wrong statistics
    from tttkd.pipeline.efficientnet import packaged_weights

    teacher = load_teacher("efficientnet_lite0")
    assert teacher.stride == 8 and teacher.feature_dim == 40 + 112 + 320
    grid = teacher.features(torch.stack([teacher.prepare(np.zeros((120, 160, 3), np.uint8))]))
    assert grid.shape == (1, 472, 16, 20)  # padded to 128 x 160, stride 8
    # every tensor (weights and BN statistics) is the shipped ImageNet checkpoint's
    shipped = torch.load(packaged_weights(0), map_location="cpu", weights_only=True)
    loaded = teacher.network.net.state_dict()
    assert loaded.keys() == shipped.keys()
    assert all(torch.equal(loaded[name], shipped[name]) for name in shipped)
    # and the network the teacher runs, fed by the teacher's own preprocessing, recognises what an
    # ImageNet model recognises: a random network gives ~0.001 to every class
    images = torch.stack([teacher.prepare(crossword(seed)) for seed in range(3)])
    with torch.no_grad():
        probability = teacher.network.net(images).softmax(1)
    assert probability.argmax(1).tolist() == [CROSSWORD_PUZZLE] * 3
    assert probability[:, CROSSWORD_PUZZLE].min() > 0.5, probability[:, CROSSWORD_PUZZLE]


def test_sample_features_at_cell_centres_returns_the_cell_vectors():
    grid = torch.randn(8, 3, 4)
    stride = 14
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    uv = torch.stack([(cols.flatten() + 0.5) * stride - 0.5, (rows.flatten() + 0.5) * stride - 0.5], dim=1)
    sampled = sample_features(grid, uv, stride=stride)
    expected = torch.nn.functional.normalize(grid.flatten(1).T, dim=1)
    torch.testing.assert_close(sampled, expected)
    # halfway between two cell centres: the normalised mean of the two
    mid = sample_features(grid, torch.tensor([[stride * 1.0 - 0.5, 0.5 * stride - 0.5]]), stride=stride)
    torch.testing.assert_close(mid[0], torch.nn.functional.normalize(grid[:, 0, 0] + grid[:, 0, 1], dim=0))


def test_decode_image_at_quarter_scale(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "frame.jpg", quality=95)
    small = decode_image(tmp_path / "frame.jpg", scale=0.25)
    assert small.shape == (120, 160, 3) and small.flags.writeable
    odd = decode_image(tmp_path / "frame.jpg", scale=0.3)
    assert odd.shape == (144, 192, 3)
    # the quarter-scale decode is the 4x4 box average, up to JPEG error
    box = image.reshape(120, 4, 160, 4, 3).mean(axis=(1, 3))
    assert np.abs(small.astype(float) - box).mean() < 12


def test_dinov2_crops_and_efficientnet_pads_to_their_size_multiple():
    vit = load_teacher_random("dinov2_vits14")
    assert vit.input_size(324, 242) == (322, 238) and vit.visible_size(324, 242) == (322, 238)
    cnn = load_teacher("efficientnet_lite0")
    assert cnn.input_size(160, 120) == (160, 128) and cnn.visible_size(160, 120) == (160, 120)
    prepared = cnn.prepare(np.full((120, 160, 3), 200, np.uint8))
    assert prepared.shape == (3, 128, 160) and torch.allclose(prepared[:, 120:], prepared[:, 119:120])


def load_teacher_random(name):
    from tttkd.pipeline.teacher import Teacher

    return Teacher(name, build_network(name))
