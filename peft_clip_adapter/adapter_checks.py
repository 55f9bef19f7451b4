"""Checks of saved adapters, so that a damaged, mixed or foreign file fails early, by name, with the fix.

Everything a loader reads is checked before it touches a model:

- ``adapter_config.json`` (:func:`read_adapter_config`): a JSON object, ``peft_type`` spelled right, every
  field CLIP-Adapter needs present (a missing ``ratio`` would silently load the default), no near-miss of a
  known field (an unknown field warns and is dropped, as peft does, so newer saves still load);
- the weights (:func:`check_adapter_folder`, :func:`check_adapter_tensors`): a whole safetensors file, or an
  ``adapter_model.bin`` read by torch's weights-only unpickler (which runs no code), holding only adapter
  weights (a tensor named like a base weight would overwrite it), floating point, finite, consistent shapes;
- the folder as a set: :mod:`peft_clip_adapter.manifest`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import fnmatch
import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors.torch import load_file

from peft_clip_adapter.layer import PREFIX, CLIPAdapterLayer

#: Suffixes of files that ``torch.load`` would unpickle.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")

# safetensors files start with a little-endian u64 header length, then that many bytes of JSON.
_HEADER_LENGTH_BYTES = 8
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_RESAVE_HINT = "Save the adapter again, or download it again if it came from the Hub."
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# Fields of adapter_config.json without which a CLIP-Adapter would load with silent defaults.
_REQUIRED_FIELDS = ("peft_type", "ratio", "reduction")
_TARGET_FIELDS = ("target_modules", "adapt")
# How close (difflib's ratio) an unknown field must be to a known one to count as its misspelling.
_NEAR_MISS = 0.8
# Types of the fields peft's own PeftConfig adds (ours are checked by CLIPAdapterConfig.__post_init__).
_BASE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "inference_mode": (bool,),
    "base_model_name_or_path": (str, type(None)),
    "revision": (str, type(None)),
    "peft_version": (str, type(None)),
    "auto_mapping": (dict, type(None)),
}
# What the weights being loaded are called in error messages; set by the loaders that know the file.
_loading_source: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("loading_source", default=None)


# ----------------------------------------------------------------------------------------------------------------
# adapter_config.json


class _MissingPeftTypeError(ValueError, TypeError):
    """A config without ``peft_type``: peft raises a ``TypeError`` there, this package a ``ValueError``."""


def read_adapter_config(path: str | os.PathLike, config_name: str = "PeftConfig") -> dict[str, Any]:
    """Read a CLIP-Adapter's ``adapter_config.json``, refusing what peft would misread or fail on with a bare error.

    Raises ``ValueError`` naming the file and the fix: not JSON, not an object, a missing or unregistered
    ``peft_type`` (with a did-you-mean), or, for a CLIP-Adapter config, a missing required field, a near-miss
    of a known field, or a base field of the wrong type. ``config_name`` is the reading class, named in
    peft's own sentence when ``peft_type`` is missing.
    """
    path = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(
                f"{path} is empty: a save into it was interrupted, or the file was truncated. {_RESAVE_HINT}"
            )
        loaded = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): the adapter config is damaged or is another kind of file. "
            f"{_RESAVE_HINT}"
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{path} must hold a JSON object (the adapter's settings), got {type(loaded).__name__}. {_RESAVE_HINT}"
        )
    loaded.pop("runtime_config", None)  # peft drops it too: runtime settings are never saved
    looks_like_ours = "ratio" in loaded and "reduction" in loaded
    check_peft_type(loaded.get("peft_type"), path, looks_like_ours=looks_like_ours, config_name=config_name)
    if loaded["peft_type"] == clip_adapter_type():
        _check_clip_adapter_fields(loaded, path)
    return loaded


def check_peft_type(
    peft_type: Any, source: str, *, looks_like_ours: bool = False, config_name: str = "PeftConfig"
) -> None:
    """Refuse a missing or unregistered ``peft_type`` from ``source``, suggesting the closest registered one.

    ``looks_like_ours``: the config holds CLIP-Adapter fields, so a missing ``peft_type`` suggests ours.
    A missing one raises an error that is also the ``TypeError`` peft raises, with peft's sentence first.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type is None:
        guess = (
            f' It holds CLIP-Adapter settings: add "peft_type": "{clip_adapter_type()}", or save the adapter again.'
            if looks_like_ours
            else " Save the adapter again with save_pretrained, which writes it."
        )
        raise _MissingPeftTypeError(
            f"The {config_name} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
            f'{source} has no "peft_type", so peft cannot tell which method saved it.{guess}'
        )
    registered = sorted(str(getattr(key, "value", key)) for key in PEFT_TYPE_TO_CONFIG_MAPPING)
    if isinstance(peft_type, str) and peft_type in registered:
        return
    suggestion = did_you_mean(peft_type, registered)
    raise ValueError(
        f"{source} has peft_type={peft_type!r}, which is not a registered PEFT method{suggestion}. "
        f"Fix the spelling in the file, or save the adapter again (CLIP-Adapter's is {clip_adapter_type()!r}, "
        "registered by `import peft_clip_adapter`)."
    )


def clip_adapter_type() -> str:
    """``"CLIP_ADAPTER"``, read from peft's registry (the config module imports this one)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    registered = (
        str(getattr(key, "value", key)) for key, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items() if prefix == PREFIX
    )
    return next(registered, "CLIP_ADAPTER")


def did_you_mean(value: Any, choices: list[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'X'?)`` for the choice closest to ``value`` (ignoring case, dashes, spaces), or ``""``."""
    if not isinstance(value, str):
        return ""
    normalised = {re.sub(r"[\s\-]+", "_", choice).upper(): choice for choice in choices}
    spelled = re.sub(r"[\s\-]+", "_", value).upper()
    match = normalised.get(spelled) or next(iter(difflib.get_close_matches(value, choices, n=1, cutoff=cutoff)), None)
    match = match or next(iter(difflib.get_close_matches(spelled, list(normalised), n=1, cutoff=cutoff)), None)
    return f" (did you mean {normalised.get(match, match)!r}?)" if match else ""


def _check_clip_adapter_fields(loaded: dict[str, Any], path: str) -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    missing = [name for name in _REQUIRED_FIELDS if name not in loaded]
    if all(loaded.get(name) is None for name in _TARGET_FIELDS):
        missing.append(" / ".join(_TARGET_FIELDS))
    if missing:
        raise ValueError(
            f"{path} has no {', '.join(repr(name) for name in missing)}: without it the adapter would load with "
            f"a default instead of the value it was trained with. {_RESAVE_HINT} Never fill it in by guess."
        )
    # Read from the registered class, so fields added to the config later are known here too.
    known = {field.name for field in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[clip_adapter_type()])}
    # An unknown field warns and is dropped by peft (a newer release may have added it), but one spelled almost
    # like a known field is a typo that would leave the known field at its default: refuse it.
    for name in sorted(set(loaded) - known):
        suggestion = did_you_mean(name, sorted(known), cutoff=_NEAR_MISS)
        if suggestion:
            raise ValueError(
                f"{path} has the unknown field {name!r}{suggestion}: a misspelt field is ignored, and the one it "
                "stands for keeps its default, so it is refused. Fix the name in the file (if a newer version wrote "
                "it, upgrade: pip install -U peft peft-clip-adapter)."
            )
    for name, types in _BASE_FIELD_TYPES.items():
        value = loaded.get(name)
        if name in loaded and not isinstance(value, types):
            accepted = " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)
            raise ValueError(f"{path} has {name}={value!r} ({type(value).__name__}); it must be {accepted}.")


# ----------------------------------------------------------------------------------------------------------------
# adapter_model.safetensors


def check_adapter_folder(
    folder: str | os.PathLike, reduction: Optional[int] = None, *, require_weights: bool = False
) -> dict[str, tuple[int, ...]]:
    """Check the weights of a local adapter folder before they are loaded; returns ``{key: shape}``.

    ``adapter_model.safetensors`` is checked whole (:func:`check_weights_file`), else ``adapter_model.bin`` is
    read through torch's weights-only unpickler (:func:`load_pickled_weights`), then the tensors are checked
    (:func:`check_adapter_tensors`, against ``reduction``). Another pickle in their place is refused unread;
    no weights at all is refused only with ``require_weights``.
    """
    path = weights_path(folder)
    if path is not None:
        return check_weights_file(path, reduction)
    refuse_pickles(folder, SAFETENSORS_WEIGHTS_NAME, what="adapter weights")
    if require_weights:
        raise ValueError(
            f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}, so there are no adapter weights to load (it holds "
            f"{sorted(entry.name for entry in Path(folder).iterdir())[:8]}). Pass the folder save_pretrained wrote."
        )
    return {}


def weights_path(folder: str | os.PathLike) -> Optional[Path]:
    """The weights file peft loads from ``folder``: ``adapter_model.safetensors``, else ``adapter_model.bin``."""
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def check_weights_file(path: str | os.PathLike, reduction: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Check a saved weights file whole, then its tensors; returns ``{key: shape}``. ``ValueError`` names the file."""
    if Path(path).name == WEIGHTS_NAME:
        tensors = load_pickled_weights(path)
    else:
        verify_safetensors_file(path)
        tensors = load_file(path)
    check_adapter_tensors(tensors, os.fspath(path), reduction)
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def load_pickled_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pickled state dict as peft does, with torch's weights-only unpickler, which runs no code."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message leads with how to bypass the check; its reason is the line that names what was refused.
        lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
        reason = next(
            (line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else ""
        )
        raise ValueError(
            f"{path} was not loaded: torch's weights-only unpickler refuses it ({reason.strip()}). It holds more "
            "than tensors, and unpickling it in full could run any code in it. Use a file that save_pretrained "
            "wrote, or convert one from a source you trust to safetensors."
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as PyTorch weights ({error}). {_RESAVE_HINT}") from error
    if not isinstance(tensors, dict):
        raise ValueError(f"{path} holds a {type(tensors).__name__}, not a state dict of tensors. {_RESAVE_HINT}")
    return tensors


def refuse_pickles(
    folder: str | os.PathLike, expected: str, *, what: str, ignore: Iterable[str] = (), hint: Optional[str] = None
) -> None:
    """Refuse, unread, a pickle standing where the safetensors file ``expected`` belongs in ``folder``.

    ``what`` names the content and ``hint`` the fix in the message; ``ignore`` lists glob patterns of pickles
    that belong there for another purpose (an optimizer state, ...).
    """
    folder = Path(folder)
    if (folder / expected).is_file() or not folder.is_dir():
        return
    pickles = sorted(
        path.name
        for path in folder.iterdir()
        if path.suffix.lower() in PICKLE_SUFFIXES and not any(fnmatch.fnmatch(path.name, rule) for rule in ignore)
    )
    if pickles:
        hint = hint or (
            "Save it as safetensors where it came from (save_pretrained does by default), or use a source that "
            "ships safetensors."
        )
        raise ValueError(
            f"{folder / pickles[0]} holds the {what} as a pickle, where {expected} belongs. It was not loaded: "
            f"unpickling a file can run any code in it. {hint}"
        )


def from_pretrained_safetensors(auto_class: Any, name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name_or_path, use_safetensors=True, **kwargs)``: a base model from safetensors
    only, so that a pickled checkpoint (``pytorch_model.bin``) is refused by name, never unpickled."""
    folder = Path(name_or_path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        refuse_pickles(folder, "model.safetensors", what="base model weights")
    try:
        return auto_class.from_pretrained(os.fspath(name_or_path), **{"use_safetensors": True, **kwargs})
    except OSError as error:
        # transformers' words for "this checkpoint has no safetensors file"; anything else is not ours to explain.
        if not any(words in str(error) for words in ("no file named", "does not appear to have")):
            raise
        raise ValueError(
            f"{os.fspath(name_or_path)} has no safetensors weights ({error}). Pickled weights (pytorch_model.bin) "
            "are never loaded: unpickling a file can run any code in it. Use a checkpoint that ships "
            "model.safetensors."
        ) from error


def verify_safetensors_file(path: str | os.PathLike, hint: str = _RESAVE_HINT) -> None:
    """Check that a safetensors file is whole: no pickle in disguise, its header parses, its tensors fill the file.

    Reads only the header and the size, so it is cheap for any size; ``hint`` ends each message.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(_HEADER_LENGTH_BYTES)
        if _is_pickle(prefix):
            raise ValueError(
                f"{path} is a PyTorch pickle, not a safetensors file. It was not loaded: unpickling a file can run "
                f"any code in it. {hint}"
            )
        if len(prefix) < _HEADER_LENGTH_BYTES:
            raise ValueError(f"{path} is truncated ({size} bytes, not even a header). {hint}")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - _HEADER_LENGTH_BYTES:
            raise ValueError(
                f"{path} is truncated or corrupted: its header claims {header_length} bytes but the file has "
                f"{size}. {hint}"
            )
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has a corrupted header ({error}). {hint}") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupted header (not a JSON object). {hint}")
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


def _is_pickle(prefix: bytes) -> bool:
    # torch.save writes a zip archive; its legacy format and plain pickle start with the PROTO opcode.
    return prefix.startswith(b"PK\x03\x04") or (len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5)


def check_adapter_tensors(
    tensors: Mapping[str, torch.Tensor], source: Optional[str] = None, reduction: Optional[int] = None
) -> None:
    """Refuse tensors that are not a CLIP-Adapter's, before any of them reaches a model.

    Every key must be ``<module>.<adapter layer>.weight`` (anything else would be loaded over the base model's
    weights); each tensor floating point and finite; each module's down / up pair ``[h, d]`` / ``[d, h]``, with
    ``h == d // reduction`` when ``reduction`` is given. ``source`` names the tensors in messages.
    """
    source = source or current_source()
    if not tensors:
        raise ValueError(f"{source} holds no tensors, so there is no adapter to load. {_RESAVE_HINT}")
    down_name, up_name = CLIPAdapterLayer.adapter_layer_names
    pattern = re.compile(rf"(.+)\.({'|'.join(map(re.escape, CLIPAdapterLayer.adapter_layer_names))})\.weight")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{source} holds {key!r}, which is not a CLIP-Adapter weight ('<module>.{down_name}.weight' or "
                f"'<module>.{up_name}.weight'). Loading it would overwrite the base model's weights, so the file "
                "is refused. Save the adapter with save_pretrained, which writes only adapter weights."
            )
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"{source}: {key!r} is {kind}; adapter weights are floating point (float32, float16 or bfloat16). "
                f"The file was not written by save_pretrained or was altered. {_RESAVE_HINT}"
            )
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise ValueError(
                f"{source}: {key!r} holds {bad} NaN or infinite values, which would make every adapted embedding "
                "NaN. The training diverged (lower the learning rate) or the file is damaged: use an earlier "
                "save or checkpoint."
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, pair in pairs.items():
        if set(pair) != {down_name, up_name}:
            have, lacking = next(iter(pair)), ({down_name, up_name} - set(pair)).pop()
            raise ValueError(f"{source} holds {module}.{have} but no {module}.{lacking}. {_RESAVE_HINT}")
        down, up = pair[down_name].shape, pair[up_name].shape
        # A bottleneck is never wider than the embedding (h = d // reduction <= d).
        if len(down) != 2 or len(up) != 2 or (up[0], up[1]) != (down[1], down[0]) or not 1 <= down[0] <= down[1]:
            raise ValueError(
                f"{source}: {module!r} has adapter weights of shapes {tuple(down)} and {tuple(up)}, which do not "
                f"form a bottleneck [h, d] -> [d, h]. {_RESAVE_HINT}"
            )
        hidden, width = down
        if reduction is not None and width // reduction != hidden:
            raise ValueError(
                f"{source}: {module!r} has an adapter of hidden width {hidden} for d={width}"
                f"{_implied_reduction(width, hidden)}, but its config says reduction={reduction} (hidden width "
                f"{width // reduction}). The config and the weights come from different saves, or reduction was "
                "changed after training: load them with the reduction they were trained with."
            )


def _implied_reduction(width: int, hidden: int) -> str:
    fits = [r for r in range(1, width + 1) if width // r == hidden]
    return f" (reduction={fits[0]})" if len(fits) == 1 else f" (reduction {fits[0]}-{fits[-1]})" if fits else ""


@contextlib.contextmanager
def loading_source(source: str) -> Iterator[None]:
    """Name the weights being loaded (a file or repository) in the messages of the checks run meanwhile."""
    token = _loading_source.set(source)
    try:
        yield
    finally:
        _loading_source.reset(token)


def current_source() -> str:
    """What the weights being loaded are called in messages (see :func:`loading_source`)."""
    return _loading_source.get() or "the adapter weights"


# ----------------------------------------------------------------------------------------------------------------
# Adapter names


def check_adapter_name(name: Any) -> None:
    """Refuse an adapter name that is not a plain folder name (``save_pretrained`` writes a sub-folder of that
    name; torch refuses dots in module names)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(
            f"adapter_name={name!r} is not a plain name: use letters, digits, '_' and '-' (no path, no dots, not "
            "empty). save_pretrained writes each adapter but 'default' into a sub-folder of that name."
        )
