"""Reading .safetensors files into numpy, bfloat16 included (safetensors.numpy cannot: numpy has
no bfloat16; ml_dtypes gives it one).

A .safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from fitv2_jax.utils.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """name -> array (read-only views of one buffer); a malformed file is a UserError."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.fstat(f.fileno()).st_size - 8:
                raise ValueError(f"header length {n} is past the end of the file")
            header = json.loads(f.read(n))
            data = f.read()
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable .safetensors file ({e})") from e
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[spec["dtype"]])
            start, end = spec["data_offsets"]
            count = int(np.prod(spec["shape"])) if spec["shape"] else 1
            if end - start != count * dtype.itemsize or end > len(data):
                raise ValueError("byte range does not fit")
            out[name] = np.frombuffer(data, dtype, count, start).reshape(spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: tensor {name!r} is malformed ({e})") from e
    return out
