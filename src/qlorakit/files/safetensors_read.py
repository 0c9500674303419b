"""Read a safetensors file's tensors one at a time with plain reads, not through a memory map.

safetensors' own `safe_open` maps the whole file once and hands out views of that one mapping:
every page a loader touches then stays in the process's resident set as long as any tensor of
the file is alive, so a loader that reads every linear weight to quantize it, and keeps the
embeddings, ends with the whole file resident. Here each tensor is read into memory of its own
(`readinto`): a weight that is quantized and dropped leaves nothing behind, and no file handle
or mapping stays open (a model of thousands of tensors never approaches the open-file limit).

    layout   u64 little-endian N | N bytes of JSON header | tensor data (files/safetensors_check.py)
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The names of the file's tensors, in the order of their bytes."""
    _, entries = _header(Path(path))
    return list(entries)


def read_tensors(path: str | os.PathLike, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of the file (or those in `names`), in file order, each read
    into memory of its own.

    Raises:
        ValueError: a dtype torch has no equivalent of, or a file that ends inside a tensor,
            naming the file and the tensor.
    """
    path = Path(path)
    data_start, entries = _header(path)
    with open(path, "rb") as handle:
        for name, (dtype, shape, begin, end) in entries.items():
            if names is not None and name not in names:
                continue
            if dtype not in DTYPES:
                raise ValueError(f"{path}: tensor {name}: dtype {dtype} is not one torch reads")
            out = torch.empty(shape, dtype=DTYPES[dtype])
            handle.seek(data_start + begin)
            if end > begin and handle.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != end - begin:
                raise ValueError(f"{path}: tensor {name}: the file ends inside its bytes")
            yield name, out


def _header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(offset of the tensor data, name -> (dtype, shape, begin, end) in data order)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    entries = {name: (e["dtype"], tuple(e["shape"]), *e["data_offsets"]) for name, e in header.items() if name != "__metadata__"}
    return 8 + length, dict(sorted(entries.items(), key=lambda item: item[1][2]))
