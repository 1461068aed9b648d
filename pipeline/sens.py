"""ScanNet `.sens` streams (SensorData version 4): header and frame index, frames decoded on demand,
and an export to the folder layout the ScanNet reader reads.

Layout (ScanNet's SensReader/python/SensorData.py; the files are written little-endian on x86):
    header  uint32 version (4) | uint64 strlen | strlen bytes sensor name
            4 x float32[16] intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth (row-major 4x4)
            int32 color_compression_type (-1 unknown, 0 raw, 1 png, 2 jpeg)
            int32 depth_compression_type (-1 unknown, 0 raw_ushort, 1 zlib_ushort, 2 occi_ushort)
            uint32 color_width, color_height, depth_width, depth_height
            float32 depth_shift (depth units per metre: 1000)
            uint64 num_frames
    frame   float32[16] camera_to_world (-inf where tracking was lost)
            uint64 timestamp_color, timestamp_depth, color_size_bytes, depth_size_bytes
            color_size_bytes of JPEG | depth_size_bytes of zlib-compressed uint16 (depth_height x depth_width)

`SensFile` reads the header and walks the frame headers once (seeking over the image data), so a
stream of thousands of frames is indexed in milliseconds; colour and depth are decoded per frame.

`export_frames` writes every `frame_skip`-th frame in the layout of the 25k subset (the ScanNet
reader reads it unchanged): color/NNNNNN.jpg (the stream's JPEG bytes, not re-encoded),
depth/NNNNNN.png (uint16, depth units), pose/NNNNNN.txt (4x4, written as stored: invalid poses stay
-inf so the reader skips and counts them), intrinsics_color.txt and intrinsics_depth.txt (4x4).
NNNNNN is the frame's index in the stream, zero-padded to six digits as in the 25k subset.
A file `sens_export.json` is written last and marks a complete export.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scene import SceneReadError

SENS_VERSION = 4
COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
EXPORT_MARKER = "sens_export.json"

_MATRIX = struct.Struct("<16f")
_FRAME_HEADER = struct.Struct("<16f4Q")  # camera_to_world, two timestamps, colour and depth sizes
_SIZES = struct.Struct("<2i4If Q")  # compressions, colour/depth width and height, depth_shift, num_frames


@dataclass(frozen=True)
class SensHeader:
    version: int
    sensor_name: str
    intrinsic_color: np.ndarray
    """(4, 4) float32, for the color_width x color_height images."""
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    """(4, 4) float32, for the depth_width x depth_height images."""
    extrinsic_depth: np.ndarray
    color_compression: str
    depth_compression: str
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    """Depth units per metre (ScanNet: 1000, millimetres)."""
    num_frames: int


class SensFile:
    """The header and frame index of one `.sens` file; frames are decoded on demand.

    Holds no open file handle, so it pickles; each read opens the file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.header = self._read_header(f)
                self._index_frames(f)
        except OSError as e:
            raise SceneReadError(f"{self.path}: {e}") from e

    def _read(self, f, size: int, what: str) -> bytes:
        data = f.read(size)
        if len(data) != size:
            raise SceneReadError(f"{self.path}: truncated .sens file (ends inside the {what})")
        return data

    def _read_header(self, f) -> SensHeader:
        version, = struct.unpack("<I", self._read(f, 4, "header"))
        if version != SENS_VERSION:
            raise SceneReadError(f"{self.path}: .sens version {version}, expected {SENS_VERSION} (not a ScanNet .sens file?)")
        name_length, = struct.unpack("<Q", self._read(f, 8, "header"))
        if name_length > 4096:
            raise SceneReadError(f"{self.path}: sensor name of {name_length} bytes: corrupt header")
        sensor_name = self._read(f, name_length, "header").decode("utf-8", "replace")
        matrices = [np.array(_MATRIX.unpack(self._read(f, _MATRIX.size, "header")), np.float32).reshape(4, 4)
                    for _ in range(4)]
        color_c, depth_c, cw, ch, dw, dh, depth_shift, num_frames = _SIZES.unpack(self._read(f, _SIZES.size, "header"))
        return SensHeader(
            version, sensor_name, *matrices,
            color_compression=COLOR_COMPRESSION.get(color_c, f"unknown ({color_c})"),
            depth_compression=DEPTH_COMPRESSION.get(depth_c, f"unknown ({depth_c})"),
            color_width=cw, color_height=ch, depth_width=dw, depth_height=dh,
            depth_shift=float(depth_shift), num_frames=num_frames,
        )

    def _index_frames(self, f) -> None:
        n = self.header.num_frames
        file_size = self.path.stat().st_size
        self.cam_to_world = np.empty((n, 4, 4), np.float32)  # (F, 4, 4) as stored, -inf included
        self.timestamps = np.empty((n, 2), np.uint64)  # (F, [colour, depth])
        self._color = np.empty((n, 2), np.int64)  # (F, [offset, size]) of the JPEG bytes
        self._depth = np.empty((n, 2), np.int64)  # (F, [offset, size]) of the zlib bytes
        for i in range(n):
            values = _FRAME_HEADER.unpack(self._read(f, _FRAME_HEADER.size, f"header of frame {i}"))
            self.cam_to_world[i] = np.reshape(values[:16], (4, 4))
            self.timestamps[i] = values[16:18]
            color_size, depth_size = values[18], values[19]
            offset = f.tell()
            if offset + color_size + depth_size > file_size:
                raise SceneReadError(f"{self.path}: truncated .sens file (frame {i} of {n} ends past the end)")
            self._color[i] = (offset, color_size)
            self._depth[i] = (offset + color_size, depth_size)
            f.seek(offset + color_size + depth_size)

    def __len__(self) -> int:
        return self.header.num_frames

    def _bytes(self, offset_size) -> bytes:
        offset, size = (int(v) for v in offset_size)
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def color_bytes(self, index: int) -> bytes:
        """The stored colour bytes of frame `index` (a JPEG file for ScanNet)."""
        return self._bytes(self._color[index])

    def color(self, index: int) -> Image.Image:
        """Frame `index`'s colour image, decoded."""
        if self.header.color_compression not in ("jpeg", "png"):
            raise SceneReadError(f"{self.path}: colour compression {self.header.color_compression!r} is not supported (jpeg, png)")
        try:
            image = Image.open(io.BytesIO(self.color_bytes(index)))
            image.load()
        except OSError as e:
            raise SceneReadError(f"{self.path}: frame {index}: colour does not decode ({e})") from e
        return image

    def depth(self, index: int) -> np.ndarray:
        """Frame `index`'s depth, (depth_height, depth_width) uint16 in units of 1/depth_shift metres."""
        header = self.header
        data = self._bytes(self._depth[index])
        if header.depth_compression == "zlib_ushort":
            try:
                data = zlib.decompress(data)
            except zlib.error as e:
                raise SceneReadError(f"{self.path}: frame {index}: depth does not decompress ({e})") from e
        elif header.depth_compression != "raw_ushort":
            raise SceneReadError(f"{self.path}: depth compression {header.depth_compression!r} is not supported (zlib_ushort, raw_ushort)")
        expected = header.depth_width * header.depth_height * 2
        if len(data) != expected:
            raise SceneReadError(f"{self.path}: frame {index}: {len(data)} depth bytes, expected {expected} "
                                 f"({header.depth_width}x{header.depth_height} uint16)")
        return np.frombuffer(data, dtype="<u2").reshape(header.depth_height, header.depth_width).astype(np.uint16)


def export_frames(sens_path: Path, out_dir: Path, *, frame_skip: int = 20) -> int:
    """Write every `frame_skip`-th frame of a `.sens` file in the 25k-subset layout; return the count.

    See the module docstring for the files written. `sens_export.json` (source, frame_skip,
    frames) is written last: a folder without it is an interrupted export.
    """
    if frame_skip < 1:
        raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
    sens = SensFile(sens_path)
    if sens.header.color_compression != "jpeg":
        raise SceneReadError(f"{sens_path}: colour compression {sens.header.color_compression!r}; the export copies JPEG bytes and needs 'jpeg'")
    out_dir = Path(out_dir)
    for sub in ("color", "depth", "pose"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    np.savetxt(out_dir / "intrinsics_color.txt", sens.header.intrinsic_color, fmt="%.6f")
    np.savetxt(out_dir / "intrinsics_depth.txt", sens.header.intrinsic_depth, fmt="%.6f")
    frames = range(0, len(sens), frame_skip)
    for index in frames:
        name = f"{index:06d}"
        (out_dir / "color" / f"{name}.jpg").write_bytes(sens.color_bytes(index))
        Image.fromarray(sens.depth(index)).save(out_dir / "depth" / f"{name}.png")
        # repr-exact floats; -inf is written as "-inf", which np.loadtxt reads back
        np.savetxt(out_dir / "pose" / f"{name}.txt", sens.cam_to_world[index].astype(np.float64), fmt="%.9g")
    marker = {"source": str(sens_path), "frame_skip": frame_skip, "frames": len(frames),
              "depth_shift": sens.header.depth_shift}
    (out_dir / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
    return len(frames)
