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


def _parse_header(lines: list[str], source) -> tuple[str | None, list]:
    """PLY header lines (after the magic, before end_header) -> (format, elements), each element
    (name, count, [(prop, dtype) | (prop, count_dtype, item_dtype)])."""
    fmt, elements = None, []
    try:
        for line in lines:
            words = line.split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property" and words[1] == "list":
                elements[-1][2].append((words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
            elif words[0] == "property":
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
    except (IndexError, KeyError, ValueError) as e:
        raise PlyError(f"{source}: malformed PLY header ({e!r})") from e
    return fmt, elements


def _split_header(data: bytes, source) -> tuple[list[str], int]:
    """-> (header lines between the magic and end_header, offset of the body)."""
    end = data.find(b"end_header")
    newline = data.find(b"\n", end)
    if not data.startswith(b"ply") or end < 0 or newline < 0:
        raise PlyError(f"{source}: not a PLY file (no 'ply' magic or no end_header)")
    return data[:end].decode("ascii", "replace").splitlines()[1:], newline + 1


def read_elements(data: bytes, source) -> dict[str, np.ndarray]:
    """Every element of a binary little-endian PLY as a structured array. A list property must
    hold exactly three items (triangles, as ScanNet and Matterport3D write them): it becomes the
    fields `<name>_count` and `<name>` (3,); scalar properties after it are kept (Matterport3D's
    faces carry material, segment and category ids)."""
    lines, offset = _split_header(data, source)
    fmt, elements = _parse_header(lines, source)
    if fmt != "binary_little_endian":
        raise PlyError(f"{source}: PLY format {fmt!r}, expected binary_little_endian")
    arrays = {}
    for name, count, props in elements:
        fields = []
        for prop in props:
            if len(prop) == 3:
                fields += [(prop[0] + "_count", "<" + prop[1]), (prop[0], "<" + prop[2], (3,))]
            else:
                fields.append((prop[0], "<" + prop[1]))
        dtype = np.dtype(fields)
        if offset + dtype.itemsize * count > len(data):
            raise PlyError(f"{source}: truncated PLY ({name} element needs more bytes than the file has)")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += dtype.itemsize * count
        for prop in props:
            if len(prop) == 3 and (arrays[name][prop[0] + "_count"] != 3).any():
                raise PlyError(f"{source}: only triangle faces are supported")
    return arrays


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (vertices as a structured array, faces (F, 3) int64 or None)."""
    path = Path(path)
    data = path.read_bytes()
    lines, offset = _split_header(data, path)
    fmt, elements = _parse_header(lines, path)
    if fmt == "binary_little_endian":
        arrays = read_elements(data, path)
        vertices, face = arrays.get("vertex"), arrays.get("face")
        faces = face["vertex_indices"].astype(np.int64) if face is not None and "vertex_indices" in face.dtype.names else None
    elif fmt == "ascii":
        vertices, faces = None, None
        rows = iter(data[offset:].decode("ascii", "replace").splitlines())
        for name, count, props in elements:
            block = [next(rows, "").split() for _ in range(count)]
            if name == "vertex":
                dtype = np.dtype([(p[0], p[1]) for p in props])
                vertices = np.array([tuple(r[: len(props)]) for r in block], dtype=dtype)
            elif name == "face":
                faces = np.array([[int(v) for v in r[1:4]] for r in block], dtype=np.int64)
    else:
        raise PlyError(f"{path}: unsupported PLY format {fmt!r}")
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
