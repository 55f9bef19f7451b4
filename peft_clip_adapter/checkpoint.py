"""Integrity checks for saved adapter weights, so a damaged file fails early and by name."""

from __future__ import annotations

import json
import os
import struct

from peft.utils import SAFETENSORS_WEIGHTS_NAME

# safetensors files start with a little-endian u64 header length, then that many bytes of JSON.
_HEADER_LENGTH_BYTES = 8
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def verify_adapter_weights(folder: str | os.PathLike) -> None:
    """Check that ``folder/adapter_model.safetensors``, if present, is complete and well formed.

    Only the header and the file size are read, so this is cheap for any size.

    Args:
        folder: A folder written by ``save_pretrained``.

    Returns:
        None; a folder without the weights file passes.

    Raises:
        ValueError: naming the file, if it is truncated, has a corrupted header, or its tensors do not
            add up to its size.

    Example:
        >>> import tempfile
        >>> verify_adapter_weights(tempfile.mkdtemp())  # no weights file: nothing to check
    """
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    size = os.path.getsize(path)
    hint = "Save the adapter again, or download it again if it came from the Hub."
    with open(path, "rb") as handle:
        prefix = handle.read(_HEADER_LENGTH_BYTES)
        if len(prefix) < _HEADER_LENGTH_BYTES:
            raise ValueError(f"{path} is truncated ({size} bytes, not even a header). {hint}")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - _HEADER_LENGTH_BYTES:
            raise ValueError(
                f"{path} is truncated or corrupted: its header claims {header_length} bytes but the file "
                f"has {size}. {hint}"
            )
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has a corrupted header ({error}). {hint}") from error
    data_bytes = size - _HEADER_LENGTH_BYTES - header_length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= dim
            expected = count * _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} has a corrupted entry for tensor {name!r}. {hint}") from error
        if stop - begin != expected:
            raise ValueError(f"{path} is corrupted: tensor {name!r} has the wrong byte length. {hint}")
        end = max(end, stop)
    if end != data_bytes:
        raise ValueError(
            f"{path} is truncated or corrupted: its tensors need {end} bytes of data but the file holds "
            f"{data_bytes}. {hint}"
        )
