"""Check a safetensors file before anything loads a model for it: the header parses and the file
holds every byte the header describes.

    layout    u64 little-endian N | N bytes of JSON header | tensor data
    header    {"<name>": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
               "__metadata__": {...}}             offsets count from the start of the tensor data
    complete  max(end) == file size − 8 − N, and end − begin == prod(shape) · itemsize(dtype)

Reading only the header costs a few kilobytes, so a run's adapter is checked in milliseconds
instead of failing after its base model has loaded. A truncated file (an interrupted copy, a full
disk) fails with both sizes in the message, where safetensors itself says "incomplete metadata,
file not fully covered"; safetensors' own reader (`safe_open`) then confirms what is left.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit: a larger length is not a safetensors file


class SafetensorsFileError(ValueError):
    """A safetensors file that is missing, truncated or malformed."""


def check_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a complete, well-formed safetensors file (module docstring).

    Raises:
        SafetensorsFileError: "<path>: <what is wrong>" (missing, truncated, bad header, overlapping
            or mis-sized tensors, bytes after the last tensor).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorsFileError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER:
                raise SafetensorsFileError(f"{path}: not a safetensors file (header length {header_len:,} bytes)")
            if header_len > size - 8:
                raise SafetensorsFileError(
                    f"{path}: truncated: its header is {header_len:,} bytes, the file holds {size - 8:,} after the length")
            raw = handle.read(header_len)
    except FileNotFoundError:
        raise SafetensorsFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SafetensorsFileError(f"{path}: is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    tensors, spans = _tensors(path, header)
    data = size - 8 - header_len
    needed = max((end for _, end, _ in spans), default=0)
    if data < needed:
        raise SafetensorsFileError(
            f"{path}: truncated: its header describes {needed:,} bytes of tensor data, the file holds {data:,}; "
            "the file was cut short (an interrupted copy or a full disk): write or copy it again")
    if data > needed:
        raise SafetensorsFileError(f"{path}: {data - needed:,} bytes after the last tensor (damaged file)")
    _confirm(path)
    return tensors


def _tensors(path: Path, header: dict) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[tuple[int, int, str]]]:
    """(name -> (dtype, shape), sorted (begin, end, name) spans), each entry's fields checked."""
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise SafetensorsFileError(f"{path}: tensor {name}: malformed header entry {json.dumps(entry)[:120]}")
        itemsize = ITEMSIZE.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise SafetensorsFileError(
                f"{path}: tensor {name}: {end - begin:,} bytes for shape {list(shape)} {dtype} "
                f"(needs {math.prod(shape) * itemsize:,})")
        tensors[name] = (dtype, shape)
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:  # safetensors packs tensors back to back, in offset order
        if begin != position:
            raise SafetensorsFileError(f"{path}: tensor {name}: starts at byte {begin:,} of the data, expected {position:,}")
        position = end
    return tensors, spans


def _confirm(path: Path) -> None:
    """safetensors' own reader on the header (rules this module does not repeat)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # SafetensorError has no stable subclass to catch
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SafetensorsFileError(f"{path}: unreadable safetensors ({text})") from None
