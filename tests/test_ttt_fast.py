"""The fast TTT path computes what the reference path computes: index pairs built once per
rotation and reused by every step and prediction give the rebuilt path's losses, gradients and
predictions; pairs recorded for other voxels are never used. (CUDA graphs: tests/test_gpu.py.)"""

import numpy as np
import pytest
import torch
from rooms import room_scene

from tttkd.adapt import AdaptConfig, RotatedScene, TTTKD, rotated, ttt_kd_offline
from tttkd.data import DataConfig
from tttkd.model import build_model, model_config

DATA = DataConfig(voxel_size_m=0.1)
# the small model's layout at 8 channels: every layer kind of MinkUNet34C, fast on a shared CPU
TINY = dict(stem_channels=8, channels=(8,) * 8, seg_hidden=8, kd_hidden=16)


@pytest.fixture(scope="module")
def room():
    return room_scene(4_000, kd_dim=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny CPU ops: threads only contend (measured 20x slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter(reuse_pairs: bool, **fields) -> TTTKD:
    torch.manual_seed(0)
    model = build_model(model_config("small", kd_dim=16, num_classes=20, **TINY), device="cpu")
    return TTTKD(model, AdaptConfig(lr=1.0, kd_points=512, reuse_pairs=reuse_pairs, **fields))


@pytest.fixture
def pair_builds(monkeypatch):
    """Counts spconv's index-pair constructions (the Native path's, as run on CPU)."""
    from spconv.pytorch import conv

    calls = []
    build = conv.ops.get_indice_pairs
    monkeypatch.setattr(conv.ops, "get_indice_pairs", lambda *a, **k: calls.append(1) or build(*a, **k))
    return calls


def test_reused_pairs_give_the_rebuilt_losses_gradients_and_predictions(room, pair_builds):
    reference, fast = adapter(False), adapter(True)
    views = {a: rotated(room, 0.4, DATA, "cpu") for a in (reference, fast)}
    targets = reference.plan_targets(room, views[reference], np.random.default_rng(0), steps=3)
    builds = {}
    for step in range(3):
        losses = {}
        for a in (reference, fast):
            before = len(pair_builds)
            losses[a] = a.step(views[a], targets[0][step], room.feature[targets[1][step]])
            builds[a, step] = len(pair_builds) - before
        torch.testing.assert_close(losses[fast], losses[reference], rtol=1e-5, atol=0)
        for (name, p), q in zip(fast.model.named_parameters(), reference.model.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the small model: 4 strided convs and 6 submanifold keys (stem, subm0-4), 10 constructions a forward
    assert builds[reference, 0] == builds[reference, 2] == builds[fast, 0] == 10
    assert builds[fast, 1] == builds[fast, 2] == 0, "later steps must reuse the first step's pairs"
    before = len(pair_builds)
    torch.testing.assert_close(fast.predict(views[fast]), reference.predict(views[reference]), rtol=1e-5, atol=1e-5)
    assert len(pair_builds) == before + 10  # only the reference rebuilt


def test_pairs_recorded_for_other_voxels_are_not_used(room):
    fast = adapter(True)
    first, second = rotated(room, 0.0, DATA, "cpu"), rotated(room, 2.0, DATA, "cpu")
    assert len(first.voxels.indices) != len(second.voxels.indices) or not torch.equal(first.voxels.indices,
                                                                                      second.voxels.indices)
    with torch.no_grad():
        fast.features(first)  # records the first rotation's pairs
        # another rotation handed the first one's record: recorded afresh, not reused
        stale = RotatedScene(second.voxels, second.point_to_voxel, pairs=first.pairs)
        torch.testing.assert_close(fast.features(stale), fast.model.forward_features(second.voxels))
        # new features on the same voxels keep the record (the pairs depend on the voxels only)
        scaled = RotatedScene(second.voxels.replace_feature(second.voxels.features * 2), second.point_to_voxel,
                              pairs=stale.pairs)
        assert scaled.pairs.with_pairs(scaled.voxels).indice_dict
        torch.testing.assert_close(fast.features(scaled), fast.model.forward_features(scaled.voxels))


def test_offline_protocol_is_the_same_with_reused_pairs(room):
    config = dict(rotations=2)
    results, losses = {}, {}
    for reuse in (False, True):
        losses[reuse] = []
        a = adapter(reuse, **config)
        results[reuse] = ttt_kd_offline(a, room, DATA, record_steps=[0, 3], kd_losses=losses[reuse])
    assert len(losses[True]) == 3 and all(isinstance(x, float) for x in losses[True])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    for step in (0, 3):
        torch.testing.assert_close(results[True][step], results[False][step], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(results[True][3], results[True][0])  # the steps did something


@pytest.mark.parametrize("shuffle", [False, True])
def test_planned_targets_are_the_ones_drawn_step_by_step(room, shuffle):
    a = adapter(True, shuffle_targets=shuffle)
    view = rotated(room, 0.0, DATA, "cpu")
    voxels, rows = a.plan_targets(room, view, np.random.default_rng(3), steps=3)
    # the draw the step-by-step sampler has always made (the random stream of earlier results):
    # rows without replacement, then a permutation of them as targets when shuffling
    rng = np.random.default_rng(3)
    seen = len(room.seen_index)
    for step in range(3):
        trained = rng.choice(seen, size=min(a.config.kd_points, seen), replace=False)
        targets = rng.permutation(trained) if shuffle else trained
        point_voxel = view.point_to_voxel[torch.from_numpy(room.seen_index[trained])]
        assert torch.equal(voxels[step], point_voxel) and torch.equal(rows[step], torch.from_numpy(targets))
    assert not torch.equal(voxels[0], voxels[1])
    kd_voxel, kd_target = a.sample_targets(room, view, np.random.default_rng(3))
    assert torch.equal(kd_voxel, voxels[0]) and torch.equal(kd_target, room.feature[rows[0]])


def test_tf32_switch_is_scoped_and_leaves_cpu_steps_unchanged(room):
    """`tensor_float32` turns spconv's and torch's TF32 flags on inside and restores them on exit,
    also after an error; on CPU (no tensor cores) a TF32 step is the fp32 step."""
    import spconv.constants as spconv_constants

    from tttkd.model import tensor_float32

    flags = lambda: (spconv_constants.SPCONV_ALLOW_TF32, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32)
    before = flags()
    torch.backends.cudnn.allow_tf32 = False  # a user's own setting must come back as it was
    with tensor_float32(True):
        assert flags() == (True, True, True)
    assert flags() == (before[0], before[1], False)
    with pytest.raises(RuntimeError), tensor_float32(True):
        raise RuntimeError("a failing step")
    assert flags() == (before[0], before[1], False)
    with tensor_float32(False):
        assert flags() == (before[0], before[1], False)
    torch.backends.cudnn.allow_tf32 = before[2]

    fp32, tf32 = adapter(True), adapter(True, tf32=True)
    views = {a: rotated(room, 0.4, DATA, "cpu") for a in (fp32, tf32)}
    voxels, rows = fp32.plan_targets(room, views[fp32], np.random.default_rng(0), steps=2)
    for step in range(2):
        losses = [a.step(views[a], voxels[step], room.feature[rows[step]]) for a in (fp32, tf32)]
        assert torch.equal(losses[0], losses[1])
    assert flags() == before
    torch.testing.assert_close(tf32.predict(views[tf32]), fp32.predict(views[fp32]), rtol=0, atol=0)


def blob_voxels(n: int = 6_000, seed: int = 0, dtype=torch.float64):
    """Voxels filling a 3-D blob (every kernel offset has pairs), 6 input channels."""
    from tttkd.model import sparse_input

    rng = np.random.default_rng(seed)
    grid = np.unique(rng.integers(0, 28, size=(n, 3)), axis=0).astype(np.int32)
    features = torch.from_numpy(rng.standard_normal((len(grid), 6))).to(dtype)
    return sparse_input(torch.from_numpy(grid), torch.zeros(len(grid), dtype=torch.int32), features, 1)


def test_the_gathered_stem_is_spconvs_5x5x5_stem_with_its_gradients():
    """GatherStem (one gather and one product over a neighbour table) against spconv's Native 5^3
    submanifold conv of MinkUNet34C in float64: outputs, weight and input gradients."""
    from tttkd.model import GatherStem

    torch.manual_seed(0)
    conv = build_model(model_config("minkunet34c", kd_dim=16, num_classes=20)).backbone.conv_input[0].double()
    voxels = blob_voxels()
    recorded = conv(voxels)  # records the stem's pairs
    voxels = type(voxels)(voxels.features.clone().requires_grad_(), voxels.indices, voxels.spatial_shape, 1,
                          indice_dict=dict(recorded.indice_dict))
    stem = GatherStem.of(conv, voxels)
    assert stem is not None and stem.neighbours.shape == (len(voxels.indices), 125)
    assert (stem.neighbours[:, 62] == torch.arange(len(voxels.indices))).all()  # the centre is the voxel itself
    upstream = torch.randn(len(voxels.indices), 32, dtype=torch.float64)
    results = []
    for run in (lambda f: conv(type(voxels)(f, voxels.indices, voxels.spatial_shape, 1,
                                            indice_dict=dict(recorded.indice_dict))).features,
                lambda f: stem(f, conv.weight)):
        conv.zero_grad()
        features = voxels.features.detach().clone().requires_grad_()
        out = run(features)
        (out * upstream).sum().backward()
        results.append((out.detach(), conv.weight.grad.clone(), features.grad.clone()))
    for name, ours, spconvs in zip(("output", "weight gradient", "input gradient"), results[1], results[0]):
        torch.testing.assert_close(ours, spconvs, rtol=1e-10, atol=1e-10, msg=name)
    assert results[0][1].abs().max() > 0


def test_ttt_steps_after_the_first_run_the_gathered_stem_not_spconvs(room, monkeypatch):
    from spconv.pytorch import conv as spconv_conv

    calls = []
    forward = spconv_conv.SparseConvolution.forward
    monkeypatch.setattr(spconv_conv.SparseConvolution, "forward",
                        lambda self, x, *a, **k: calls.append(self.indice_key) or forward(self, x, *a, **k))
    fast = adapter(True)
    view = rotated(room, 0.5, DATA, "cpu")
    kd_voxels, rows = fast.plan_targets(room, view, np.random.default_rng(0), steps=4)
    fast.step(view, kd_voxels[0], room.feature[rows[0]])
    assert view.pairs._stem is None and calls.count("stem") == 1  # the recording forward only
    fast.step(view, kd_voxels[1], room.feature[rows[1]])  # the voxels are reused: the stem is gathered
    assert view.pairs._stem is not None and calls.count("stem") == 2  # + the check against spconv's
    calls.clear()
    for t in (2, 3):
        fast.step(view, kd_voxels[t], room.feature[rows[t]])
    fast.predict(view)
    assert "stem" not in calls and len(calls) > 0
    other = rotated(room, 1.5, DATA, "cpu")  # other voxels: recorded afresh, spconv's stem first
    fast.predict(other)
    assert other.pairs._stem is None and calls.count("stem") == 1


def test_a_stem_table_that_disagrees_with_spconv_is_refused_and_spconvs_stem_kept(monkeypatch):
    from tttkd.model import GatherStem

    conv = build_model(model_config("minkunet34c", kd_dim=16, num_classes=20)).backbone.conv_input[0].double()
    voxels = blob_voxels(3_000)
    recorded = conv(voxels)
    voxels = type(voxels)(voxels.features, voxels.indices, voxels.spatial_shape, 1, indice_dict=dict(recorded.indice_dict))
    table = GatherStem.table
    monkeypatch.setattr(GatherStem, "table", staticmethod(lambda pairs, n: table(pairs, n).flip(1)))  # offsets reversed
    with pytest.warns(UserWarning, match="spconv's stem is kept"):
        assert GatherStem.of(conv, voxels) is None
