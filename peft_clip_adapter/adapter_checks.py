"""Checks of saved adapters, so that a damaged, mixed or foreign file fails early, by name, with the fix.

Everything a loader reads is checked before it touches a model:

- ``adapter_config.json`` (:func:`read_adapter_config`): a JSON object, ``peft_type`` spelled right,
  every field CLIP-Adapter needs present (a missing ``ratio`` would silently load the default), no
  unknown fields;
- ``adapter_model.safetensors`` (:func:`verify_adapter_weights`, :func:`check_adapter_tensors`): a whole
  safetensors file (never a pickle: unpickling can run code), holding only adapter weights (a tensor
  named like a base weight would overwrite it), floating point, finite, with consistent shapes;
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
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
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
    """Read an ``adapter_config.json`` and refuse anything peft would misread or fail on with a bare error.

    The generic checks (a JSON object with a registered ``peft_type``) apply to every PEFT method. A
    CLIP-Adapter config must also hold ``ratio``, ``reduction`` and its targets (``target_modules`` or
    ``adapt``), and no field that ``CLIPAdapterConfig`` does not have.

    Args:
        path: The JSON file.
        config_name: The config class reading it, named as peft names it when ``peft_type`` is missing.

    Returns:
        The file's content as a dict.

    Raises:
        ValueError: naming the file and the fix, if it is not JSON, not an object, has no or an
            unregistered ``peft_type`` (with a did-you-mean), or is a CLIP-Adapter config that misses a
            required field, holds an unknown one or a base field of the wrong type.

    Example:
        >>> import json, tempfile
        >>> path = tempfile.mkstemp(suffix=".json")[1]
        >>> _ = open(path, "w").write(json.dumps({"peft_type": "clip_adapter", "ratio": 0.2, "reduction": 4}))
        >>> read_adapter_config(path)
        Traceback (most recent call last):
        ...
        ValueError: ... has peft_type='clip_adapter', ... (did you mean 'CLIP_ADAPTER'?)...
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
    """Refuse a missing or unregistered ``peft_type``, suggesting the closest registered spelling.

    Args:
        peft_type: The value read from the config (``None`` when the key is missing).
        source: What the value came from, for the message (usually the file's path).
        looks_like_ours: Whether the config holds CLIP-Adapter fields, to suggest ``"CLIP_ADAPTER"`` when
            ``peft_type`` is missing.
        config_name: The config class reading it, for peft's message when ``peft_type`` is missing.

    Returns:
        None.

    Raises:
        ValueError: if ``peft_type`` is missing (also a ``TypeError`` with peft's
            message, as peft alone raises), not a string, or not a registered PEFT method.

    Example:
        >>> check_peft_type("LORA", "adapter_config.json")
        >>> check_peft_type("Lora", "adapter_config.json")
        Traceback (most recent call last):
        ...
        ValueError: adapter_config.json has peft_type='Lora', ... (did you mean 'LORA'?)...
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
    suggestion = _did_you_mean(peft_type, registered)
    raise ValueError(
        f"{source} has peft_type={peft_type!r}, which is not a registered PEFT method{suggestion}. "
        f"Fix the spelling in the file, or save the adapter again (CLIP-Adapter's is {clip_adapter_type()!r}, "
        "registered by `import peft_clip_adapter`)."
    )


def clip_adapter_type() -> str:
    """The ``peft_type`` CLIP-Adapter is registered under: the one whose key prefix is CLIP-Adapter's.

    Read from peft's registry (filled by ``register``) rather than imported from the config module, which
    imports this one.

    Returns:
        ``"CLIP_ADAPTER"``.

    Example:
        >>> import peft_clip_adapter
        >>> clip_adapter_type()
        'CLIP_ADAPTER'
    """
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    registered = (
        str(getattr(key, "value", key)) for key, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items() if prefix == PREFIX
    )
    return next(registered, "CLIP_ADAPTER")


def _did_you_mean(value: Any, choices: list[str]) -> str:
    if not isinstance(value, str):
        return ""
    normalised = {re.sub(r"[\s\-]+", "_", choice).upper(): choice for choice in choices}
    spelled = re.sub(r"[\s\-]+", "_", value).upper()
    match = normalised.get(spelled) or next(iter(difflib.get_close_matches(value, choices, n=1, cutoff=0.6)), None)
    match = match or next(iter(difflib.get_close_matches(spelled, list(normalised), n=1, cutoff=0.6)), None)
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
    unknown = sorted(set(loaded) - known)
    if unknown:
        name = unknown[0]
        raise ValueError(
            f"{path} has the unknown field {name!r}{_did_you_mean(name, sorted(known))}. It was written by a newer "
            "version of peft or peft-clip-adapter (upgrade them: pip install -U peft peft-clip-adapter) or edited by "
            "hand (fix the name)."
        )
    for name, types in _BASE_FIELD_TYPES.items():
        value = loaded.get(name)
        if name in loaded and not isinstance(value, types):
            accepted = " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)
            raise ValueError(f"{path} has {name}={value!r} ({type(value).__name__}); it must be {accepted}.")


def install_config_file_checks() -> None:
    """Make peft's generic reader of ``adapter_config.json`` check the file as :func:`read_adapter_config` does.

    ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, ``PeftConfig.from_pretrained`` and
    ``AutoPeftModel.from_pretrained`` all find out which method saved an adapter by reading its config with
    ``PeftConfig.from_json_file``, before any method's own code runs, and peft offers no hook there: a broken
    file ends in a bare ``JSONDecodeError``, ``TypeError`` or ``KeyError``, and a CLIP-Adapter config without
    ``ratio`` loads with the default. So that one classmethod is wrapped, for the generic ``PeftConfig`` /
    ``PeftConfigMixin`` reader only: a valid file reads exactly as before, a broken one raises the
    ``ValueError`` that names it. Method classes (``LoraConfig``, ...) keep peft's own reader. Safe to call
    any number of times; ``import peft_clip_adapter`` calls it.

    Returns:
        None.

    Example:
        >>> import json, tempfile
        >>> from peft import PeftConfig
        >>> install_config_file_checks()
        >>> path = tempfile.mkstemp(suffix=".json")[1]
        >>> _ = open(path, "w").write(json.dumps({"peft_type": "LORA", "r": 8}))
        >>> PeftConfig.from_json_file(path)["r"]
        8
    """
    from peft.config import PeftConfig, PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(original, "_checks_adapter_config", False):
        return

    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        if cls in (PeftConfig, PeftConfigMixin):
            return read_adapter_config(path_json_file, config_name=cls.__name__)
        return original(cls, path_json_file, **kwargs)

    from_json_file.__doc__ = original.__doc__
    from_json_file.__wrapped__ = original
    from_json_file._checks_adapter_config = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


# ----------------------------------------------------------------------------------------------------------------
# adapter_model.safetensors


def verify_adapter_weights(folder: str | os.PathLike) -> None:
    """Check that ``folder/adapter_model.safetensors``, if present, is complete and well formed.

    A folder whose weights are a pickle (``adapter_model.bin``) instead is refused: it is never unpickled.
    Only the header and the file size are read, so this is cheap for any size.

    Args:
        folder: A folder written by ``save_pretrained``.

    Returns:
        None; a folder without any weights file passes (a config-only folder).

    Raises:
        ValueError: naming the file, if it is a pickle, truncated, has a corrupted header, or its tensors do
            not add up to its size.

    Example:
        >>> import tempfile
        >>> verify_adapter_weights(tempfile.mkdtemp())  # no weights file: nothing to check
    """
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        refuse_pickles(folder, SAFETENSORS_WEIGHTS_NAME, what="adapter weights")
        return
    verify_safetensors_file(path)


def check_adapter_folder(
    folder: str | os.PathLike, reduction: Optional[int] = None, *, require_weights: bool = False
) -> dict[str, tuple[int, ...]]:
    """Check the weights of a local adapter folder before they are loaded: see :func:`check_weights_file`.

    Args:
        folder: A folder written by ``save_pretrained``.
        reduction: The ``reduction`` of its config, to check the weights' bottleneck width against.
        require_weights: Refuse a folder without ``adapter_model.safetensors`` (loading an adapter needs
            it; reading only the config does not).

    Returns:
        ``{key: shape}`` of the saved tensors; empty when there is no weights file.

    Raises:
        ValueError: as :func:`check_weights_file`, for a pickle in place of the weights, or for missing
            weights when ``require_weights``.

    Example:
        >>> import tempfile
        >>> check_adapter_folder(tempfile.mkdtemp())
        {}
    """
    path = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    if path.is_file():
        return check_weights_file(path, reduction)
    refuse_pickles(folder, SAFETENSORS_WEIGHTS_NAME, what="adapter weights")
    if require_weights:
        raise ValueError(
            f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}, so there are no adapter weights to load (it holds "
            f"{sorted(entry.name for entry in Path(folder).iterdir())[:8]}). Pass the folder save_pretrained wrote."
        )
    return {}


def check_weights_file(path: str | os.PathLike, reduction: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Check a saved ``adapter_model.safetensors`` whole: the file (:func:`verify_safetensors_file`), then its
    tensors (:func:`check_adapter_tensors`).

    Args:
        path: The weights file.
        reduction: The ``reduction`` of the config it will be loaded with.

    Returns:
        ``{key: shape}`` of its tensors.

    Raises:
        ValueError: naming the file, the key and the fix.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkstemp(suffix=".safetensors")[1]
        >>> save_file({"base_model.model.logit_scale": torch.zeros(())}, path)
        >>> check_weights_file(path)
        Traceback (most recent call last):
        ...
        ValueError: ... holds 'base_model.model.logit_scale', which is not a CLIP-Adapter weight ...
    """
    verify_safetensors_file(path)
    tensors = load_file(path)
    check_adapter_tensors(tensors, os.fspath(path), reduction)
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def refuse_pickles(
    folder: str | os.PathLike, expected: str, *, what: str, ignore: Iterable[str] = (), hint: Optional[str] = None
) -> None:
    """Refuse a folder where a pickle stands in for the safetensors file ``expected``, without unpickling it.

    Args:
        folder: The folder to look in.
        expected: The safetensors file name that belongs there (e.g. ``adapter_model.safetensors``).
        what: What the file holds, for the message (e.g. ``"adapter weights"``).
        ignore: Glob patterns of pickles that belong there for another purpose (an optimizer state, ...).
        hint: What to do instead, for the message; by default, save or fetch safetensors.

    Returns:
        None, when ``folder/expected`` exists or no pickle is there.

    Raises:
        ValueError: naming the pickle, if ``expected`` is missing and a ``.bin`` / ``.pkl`` / ``.pt`` / ...
            file is there instead.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "adapter_model.bin").write_bytes(b"...")
        >>> refuse_pickles(folder, "adapter_model.safetensors", what="adapter weights")
        Traceback (most recent call last):
        ...
        ValueError: ...adapter_model.bin holds the adapter weights as a pickle, ...
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
    """``auto_class.from_pretrained(name_or_path, use_safetensors=True, **kwargs)``: a base model read from
    safetensors only, so a pickled checkpoint (``pytorch_model.bin``) is refused by name, never unpickled.

    Args:
        auto_class: A transformers class with ``from_pretrained`` (``AutoModel``, ``CLIPModel``, ...).
        name_or_path: A Hub id or a local folder.
        **kwargs: Passed to ``from_pretrained``.

    Returns:
        The loaded model.

    Raises:
        ValueError: if the checkpoint has no safetensors weights (a local folder's pickle is named).

    Example:
        >>> import tempfile, pathlib, torch
        >>> from transformers import CLIPModel
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> torch.save({}, folder / "pytorch_model.bin")
        >>> from_pretrained_safetensors(CLIPModel, folder)
        Traceback (most recent call last):
        ...
        ValueError: ...pytorch_model.bin holds the base model weights as a pickle, ...
    """
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
    """Check that a safetensors file is whole: its header parses and its tensors fill the file exactly.

    Args:
        path: The ``.safetensors`` file.
        hint: What to do about a damaged file, appended to the message.

    Returns:
        None.

    Raises:
        ValueError: naming the file, if it is a pickle in disguise, truncated, has a corrupted header or
            entry, or its tensors do not add up to its size.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkstemp(suffix=".safetensors")[1]
        >>> save_file({"w": torch.zeros(2, 2)}, path)
        >>> verify_safetensors_file(path)
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

    Every key must be ``<module>.<adapter layer>.weight`` (the adapter layer names come from
    ``CLIPAdapterLayer.adapter_layer_names``): anything else would be loaded over the base model's own
    weights. Each tensor must be floating point and finite, and each module's down / up pair must fit
    together (``[h, d]`` and ``[d, h]``), with ``h == d // reduction`` when ``reduction`` is given.

    Args:
        tensors: The state dict as saved (keys without adapter names).
        source: What the tensors came from, for messages; defaults to the file being loaded, if known.
        reduction: The ``reduction`` of the config they are loaded with.

    Returns:
        None.

    Raises:
        ValueError: naming the source, the key and the fix.

    Example:
        >>> import torch
        >>> prefix = "base_model.model.visual_projection"
        >>> down, up = f"{prefix}.clip_adapter_down.weight", f"{prefix}.clip_adapter_up.weight"
        >>> check_adapter_tensors({down: torch.zeros(2, 8), up: torch.zeros(8, 2)}, "a file", reduction=4)
        >>> check_adapter_tensors({down: torch.zeros(4, 8), up: torch.zeros(8, 4)}, "a file", reduction=4)
        Traceback (most recent call last):
        ...
        ValueError: a file: 'base_model.model.visual_projection' has an adapter of hidden width 4 ...
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
    """Name the weights being loaded in the messages of :func:`check_adapter_tensors` and the model's checks.

    Args:
        source: The file or repository the weights come from.

    Returns:
        A context manager.

    Example:
        >>> with loading_source("me/adapter"):
        ...     current_source()
        'me/adapter'
    """
    token = _loading_source.set(source)
    try:
        yield
    finally:
        _loading_source.reset(token)


def current_source() -> str:
    """What the weights being loaded are called in messages (see :func:`loading_source`).

    Returns:
        The source set by the loader, or ``"the adapter weights"``.

    Example:
        >>> current_source()
        'the adapter weights'
    """
    return _loading_source.get() or "the adapter weights"


# ----------------------------------------------------------------------------------------------------------------
# Adapter names


def check_adapter_name(name: Any) -> None:
    """Refuse adapter names that are not plain folder names.

    ``save_pretrained`` writes an adapter other than ``"default"`` into ``<save_directory>/<name>``, so a name
    must not be a path (``"/tmp/x"``, ``"../x"``) or contain a dot (torch refuses dots in module names).

    Args:
        name: The adapter name.

    Returns:
        None.

    Raises:
        ValueError: unless ``name`` is letters, digits, ``_`` and ``-`` (not starting with ``-``).

    Example:
        >>> check_adapter_name("eurosat_16shot")
        >>> check_adapter_name("../outside")
        Traceback (most recent call last):
        ...
        ValueError: adapter_name='../outside' is not a plain name: ...
    """
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(
            f"adapter_name={name!r} is not a plain name: use letters, digits, '_' and '-' (no path, no dots, not "
            "empty). save_pretrained writes each adapter but 'default' into a sub-folder of that name."
        )
