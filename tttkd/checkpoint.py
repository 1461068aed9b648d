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


class ClassMismatchError(ValueError):
    """A cache's class list differs from the one a checkpoint was trained on."""


def check_classes(checkpoint_classes: list[str], cache_provenance: dict, *, cache_path: Path) -> None:
    """Refuse to go on training on a cache whose class list (names and order: label i is class i)
    differs from the checkpoint's: its segmentation head would be of another size, or silently
    learn other meanings for the same outputs."""
    checkpoint_classes = list(checkpoint_classes)
    cache_classes = list(cache_provenance.get("class_names") or [])
    if cache_classes == checkpoint_classes:
        return
    if len(cache_classes) != len(checkpoint_classes):
        difference = f"{len(cache_classes)} classes, the checkpoint {len(checkpoint_classes)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(cache_classes, checkpoint_classes)) if a != b)
        difference = f"class {i} {cache_classes[i]!r}, the checkpoint {checkpoint_classes[i]!r}"
    raise ClassMismatchError(f"{cache_path}: cache of {cache_provenance.get('dataset')!r} has {difference}; train on a "
                             "cache with the checkpoint's class list, or start a new run in another --out")


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
    """The network a checkpoint describes, with its weights. A checkpoint of another trainer or
    backbone (e.g. Pointcept's) is refused with what is missing or mismatched."""
    missing = [key for key in ("model_config", "model") if key not in checkpoint]
    if missing:
        raise ValueError(f"not a tttkd checkpoint: no {' or '.join(missing)} entry (keys: {', '.join(map(str, checkpoint))})")
    config = checkpoint["model_config"]
    try:
        model_config = ModelConfig(**{**config, "channels": tuple(config["channels"]), "layers": tuple(config["layers"])})
    except (TypeError, KeyError) as e:
        raise ValueError(f"checkpoint's model_config is not a tttkd ModelConfig ({e})") from e
    model = build_model(model_config, device=device)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:  # missing, unexpected or differently shaped tensors
        raise ValueError("checkpoint's weights do not fit the network its model_config describes: "
                         + " ".join(str(e).split())[:300]) from e
    return model


def data_config_of(checkpoint: dict) -> DataConfig:
    """How a checkpoint's model sees a scene at test time: its voxel size and input features."""
    data = checkpoint["train_config"]["data"]
    return DataConfig(voxel_size_m=data["voxel_size_m"], input_features=data["input_features"])
