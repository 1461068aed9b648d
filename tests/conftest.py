"""Shared fixtures. Tests run on CPU, offline, with weights they save themselves."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups would retry for ~47 s before failing

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Three embedded scenes of domain a, with few views to keep the suite fast."""
    from tttkd.pipeline.synth import generate

    root = tmp_path_factory.mktemp("synth_a")
    generate(root, domain="a", scenes=3, seed=0, views=3)
    return root


@pytest.fixture
def shared_block_use(monkeypatch):
    """For the fast path (`batched.extract_scenes`): whether each decoding task's views (`chunks`) and
    each scene (`scenes`) came back through a shared block, in order. Scenes load one ahead, so that
    those after the first results do."""
    from types import SimpleNamespace

    from tttkd.pipeline import batched

    use = SimpleNamespace(chunks=[], scenes=[])
    outcomes, start_scene = batched._Chunk.outcomes, batched._start_scene
    monkeypatch.setattr(batched._Chunk, "outcomes", lambda chunk: use.chunks.append(chunk.block is not None)
                        or outcomes(chunk))
    monkeypatch.setattr(batched, "_start_scene", lambda loading, scene_id, run: use.scenes.append(
        loading[0] is not None) or start_scene(loading, scene_id, run))
    monkeypatch.setattr(batched, "LOADS_AHEAD", 1)
    return use


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def synth_cache(synth_root, tmp_path_factory) -> Path:
    """The three embedded scenes extracted with the EfficientNet-Lite0 teacher, in no split (as
    `tttkd-prep extract --scenes` writes them): train on them with `TrainConfig(split=None)`."""
    from tttkd.pipeline.extract import PrepConfig
    from tttkd.pipeline.job import run_extraction

    store = tmp_path_factory.mktemp("cache") / "synth_a.zarr"
    config = PrepConfig(dataset="scannet", root=synth_root, teacher="efficientnet_lite0", batch_size=4)
    report = run_extraction(config, out=store, scene_ids=["scene0000_00", "scene0001_00", "scene0002_00"],
                            split=None, workers=1, device="cpu", progress=False)
    assert not report.failed, report.failed
    return store


@pytest.fixture(scope="session")
def joint_checkpoint(synth_cache, tmp_path_factory) -> Path:
    """A small model trained jointly for a few steps on the three scenes (every scene, no
    validation: the cache has no splits): enough structure for adaptation to act on."""
    from tttkd.data import DataConfig
    from tttkd.train import TrainConfig, train

    out = tmp_path_factory.mktemp("joint")
    config = TrainConfig(epochs=2, batch_size=2, model="small", workers=0, bn_momentum=0.1, split=None,
                         validate=False, data=DataConfig(voxel_size_m=0.1, kd_points=256))
    train(synth_cache, out, config, progress=False)
    return out / "last.pt"
