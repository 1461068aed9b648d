"""Minimal PLY reading and writing (ascii and binary little-endian), vertices and faces.

ScanNet's `_vh_clean_2.ply` meshes and `.labels.ply` files are binary PLY; the embedded dataset
writes the same layout. Only what the readers need: vertex properties as a numpy structured
array, and triangle faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NUMPY_TO_PLY = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort",
                 "i4": "int", "u4": "uint", "f4": "float", "f8": "double"}


class PlyError(ValueError):
    pass


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (vertices as a structured array, faces (F, 3) int64 or None)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise PlyError(f"{path}: not a PLY file")
        fmt, elements = None, []  # [(name, count, [(prop, dtype) | (prop, count_dtype, item_dtype)])]
        while True:
            line = f.readline()
            if not line:
                raise PlyError(f"{path}: header has no end_header")
            words = line.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property":
                if words[1] == "list":
                    elements[-1][2].append((words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
                else:
                    elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            elif words[0] == "end_header":
                break
        if fmt not in ("ascii", "binary_little_endian"):
            raise PlyError(f"{path}: unsupported PLY format {fmt!r}")
        vertices, faces = None, None
        for name, count, props in elements:
            if fmt == "ascii":
                rows = [f.readline().split() for _ in range(count)]
                if name == "vertex":
                    dtype = np.dtype([(p[0], p[1]) for p in props])
                    vertices = np.array([tuple(r[: len(props)]) for r in rows], dtype=dtype)
                elif name == "face":
                    faces = np.array([[int(v) for v in r[1:4]] for r in rows], dtype=np.int64)
                continue
            if any(len(p) == 3 for p in props):
                # list properties (faces): ScanNet writes fixed triangles, which read as one block
                (prop, count_t, item_t), = props
                block = np.dtype([("n", "<" + count_t), ("v", "<" + item_t, (3,))])
                data = np.frombuffer(f.read(block.itemsize * count), dtype=block)
                if len(data) != count or (data["n"] != 3).any():
                    raise PlyError(f"{path}: only triangle faces are supported")
                if name == "face":
                    faces = data["v"].astype(np.int64)
            else:
                dtype = np.dtype([(p[0], "<" + p[1]) for p in props])
                data = np.frombuffer(f.read(dtype.itemsize * count), dtype=dtype)
                if len(data) != count:
                    raise PlyError(f"{path}: truncated {name} element ({len(data)} of {count})")
                if name == "vertex":
                    vertices = data
    if vertices is None:
        raise PlyError(f"{path}: no vertex element")
    return vertices, faces


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray | None = None) -> None:
    """Write a binary little-endian PLY from a structured vertex array and optional triangles."""
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(vertices)}"]
    for name in vertices.dtype.names:
        header.append(f"property {_NUMPY_TO_PLY[vertices.dtype[name].str[1:]]} {name}")
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertices.astype(vertices.dtype.newbyteorder("<")).tobytes())
        if faces is not None:
            block = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
            block["n"], block["v"] = 3, faces
            f.write(block.tobytes())


def vertex_normals(coord: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals of a triangle mesh; zero for vertices in no face."""
    tri = coord[faces]
    face_normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    normal = np.zeros_like(coord, dtype=np.float64)
    for corner in range(3):
        np.add.at(normal, faces[:, corner], face_normal)
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    return (normal / np.maximum(length, 1e-12)).astype(np.float32)
