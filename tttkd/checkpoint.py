"""Checkpoints: model, optimiser, scheduler, configs, class names and the cache's teacher provenance.

Loaded with `weights_only=True`: a checkpoint holds tensors and plain containers only, and loading
one never runs code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .data import DataConfig
from .model import ModelConfig, TTTKDNet, build_model

TEACHER_KEYS = ("teacher", "weights_sha256", "feature_dim", "image_scale", "stride")


class TeacherMismatchError(ValueError):
    """A cache's teacher differs from the one a checkpoint was trained to distil."""


def teacher_of(provenance: dict) -> dict:
    return {key: provenance.get(key) for key in TEACHER_KEYS}


def check_teacher(checkpoint_teacher: dict, cache_provenance: dict, *, cache_path: Path) -> None:
    """Refuse a cache whose teacher (name or dimension) differs from the checkpoint's."""
    cache_teacher = teacher_of(cache_provenance)
    for key in ("teacher", "feature_dim"):
        if checkpoint_teacher.get(key) != cache_teacher.get(key):
            raise TeacherMismatchError(
                f"{cache_path}: cache has {key}={cache_teacher.get(key)!r} but the checkpoint was trained with "
                f"{checkpoint_teacher.get(key)!r}; extract a cache with the checkpoint's teacher"
            )


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and plain data
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if forbidden:
            raise ValueError(f"{path}: refused to load: it holds the Python object {forbidden.group(1)}, not only "
                             "tensors and plain data; loading it could run code") from e
        raise ValueError(f"{path}: not a readable checkpoint (not a file written by torch.save)") from e
    except (RuntimeError, EOFError) as e:  # a truncated or damaged archive
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e


def model_from_checkpoint(checkpoint: dict, *, device) -> TTTKDNet:
    config = checkpoint["model_config"]
    model = build_model(ModelConfig(**{**config, "channels": tuple(config["channels"]),
                                       "layers": tuple(config["layers"])}), device=device)
    model.load_state_dict(checkpoint["model"])
    return model


def data_config_of(checkpoint: dict) -> DataConfig:
    """How a checkpoint's model sees a scene at test time: its voxel size and input features."""
    data = checkpoint["train_config"]["data"]
    return DataConfig(voxel_size_m=data["voxel_size_m"], input_features=data["input_features"])
