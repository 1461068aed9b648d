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
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
