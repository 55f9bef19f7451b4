"""``CLIPAdapterConfig``: the hyper-parameters of CLIP-Adapter and their validation."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME


class CLIPAdapterPeftType(str, enum.Enum):
    """The ``peft_type`` written to ``adapter_config.json``.

    A ``str`` enum compares and hashes like its value, so the string ``"CLIP_ADAPTER"`` read back from
    JSON finds the same registry entries as the member itself. Like peft's own ``PeftType``, ``str()``
    gives ``"<class>.<name>"``: peft reads the method's name as the part after the dot (e.g. in
    ``PeftModel.get_model_status().peft_types``).

    Raises:
        ValueError: from ``enum`` when looked up with any other value.

    Example:
        >>> from peft_clip_adapter.config import CLIPAdapterPeftType
        >>> CLIPAdapterPeftType("CLIP_ADAPTER") == "CLIP_ADAPTER", CLIPAdapterPeftType.CLIP_ADAPTER.value
        (True, 'CLIP_ADAPTER')
        >>> str(CLIPAdapterPeftType.CLIP_ADAPTER).partition(".")[-1]
        'CLIP_ADAPTER'
    """

    CLIP_ADAPTER = "CLIP_ADAPTER"


PEFT_TYPE = CLIPAdapterPeftType.CLIP_ADAPTER

Adapt = Literal["vision", "text", "audio", "both"]
#: The accepted values of ``adapt``: one tower, or ``"both"`` for every tower the model has.
ADAPT_CHOICES: tuple[str, ...] = ("vision", "text", "audio", "both")

# Version 0.1.0 saved CLIP's projection names beside `adapt`; such a pair means `adapt` alone.
_TARGETS_SAVED_WITH_ADAPT = {
    "vision": ["visual_projection"],
    "text": ["text_projection"],
    "both": ["text_projection", "visual_projection"],
}


@dataclass
class CLIPAdapterConfig(PeftConfig):
    """Configuration of a CLIP-Adapter (Gao et al., 2021, https://arxiv.org/abs/2110.04544).

    The adapter is a residual bottleneck MLP on a tower's final pooled embedding ``f`` (CLIP's pooled,
    projected embedding; SigLIP's pooling-head output; ...)::

        f' = ratio * ReLU(W2 @ ReLU(W1 @ f)) + (1 - ratio) * f,   W1: d -> d // reduction, W2: back to d

    where ``d`` is read from the model, and both linears have no bias. Which module outputs ``f`` is
    known per model class (``peft_clip_adapter.families``), so one config fits every supported model.

    Args:
        ratio: Residual blend ``alpha`` in ``[0, 1]``: 0 keeps the model's embedding, 1 replaces it with the
            adapter's output. The paper's default is 0.2; it picks 0.6 for fine-grained datasets such as
            EuroSAT, DTD or Aircraft.
        reduction: Bottleneck factor ``r``: the hidden width is ``d // reduction``. Must be an integer in
            ``[1, d]``. Default 4, as in the paper.
        adapt: Which tower's embedding to adapt: ``"vision"`` (the paper's default), ``"text"`` (the class
            prototypes), ``"audio"`` (CLAP) or ``"both"`` (every tower of the model: its two towers, or
            the one of a single-tower class). Leave ``None`` when passing ``target_modules``.
        target_modules: Advanced: names (or a regex over full module names) choosing among the model's
            pooled-embedding modules, e.g. in a model that holds two dual encoders. Every match must be
            such a module. ``None`` (the default) lets ``adapt`` choose them per model class.

    Raises:
        ValueError: if a value is out of range or of the wrong type, if both ``adapt`` and
            ``target_modules`` are given, or if ``task_type`` is set (the model keeps its own forward).

    Example:
        >>> import peft_clip_adapter
        >>> config = peft_clip_adapter.CLIPAdapterConfig(ratio=0.6, adapt="both")
        >>> config.adapt, config.target_modules
        ('both', None)
    """

    ratio: float = field(
        default=0.2,
        metadata={"help": "Residual blend alpha in [0, 1]: f' = ratio * A(f) + (1 - ratio) * f."},
    )
    reduction: int = field(
        default=4, metadata={"help": "Bottleneck factor: the adapter's hidden width is d // reduction."}
    )
    adapt: Optional[Adapt] = field(
        default=None,
        metadata={"help": "Tower to adapt: 'vision' (default), 'text', 'audio' or 'both' (every tower)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Advanced: pooled-embedding module names or a regex, instead of `adapt`."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.task_type is not None:
            raise ValueError(
                f"CLIP-Adapter does not use a peft task head, got task_type={self.task_type!r}. "
                "Leave task_type=None: the adapted model keeps CLIP's own forward()."
            )
        self._validate_ratio()
        self._validate_reduction()
        self._resolve_targets()

    def _validate_ratio(self) -> None:
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r} ({type(ratio).__name__}).")
        if math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1] (the residual blend alpha; the paper uses 0.2), got {ratio}.")
        self.ratio = float(ratio)

    def _validate_reduction(self) -> None:
        reduction = self.reduction
        if isinstance(reduction, float) and reduction.is_integer():
            reduction = int(reduction)
        if isinstance(reduction, bool) or not isinstance(reduction, int):
            raise ValueError(
                f"reduction must be a whole number >= 1 (the bottleneck factor; the paper uses 4), "
                f"got {self.reduction!r} ({type(self.reduction).__name__})."
            )
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1 (the bottleneck factor; the paper uses 4), got {reduction}.")
        self.reduction = reduction

    def _resolve_targets(self) -> None:
        if self.adapt is not None and self.adapt not in ADAPT_CHOICES:
            raise ValueError(
                f"adapt must be one of {sorted(ADAPT_CHOICES)} (or None with explicit target_modules), "
                f"got {self.adapt!r}."
            )
        targets = self.target_modules
        if targets is None:
            self.adapt = self.adapt or "vision"
            return
        if isinstance(targets, str):
            if targets == "all-linear":
                raise ValueError(
                    "target_modules='all-linear' would wrap every attention and MLP layer; CLIP-Adapter only "
                    "wraps the module that outputs a tower's pooled embedding. Use adapt='vision', 'text', "
                    "'audio' or 'both' instead."
                )
            if self.adapt is not None:
                raise ValueError(
                    f"Pass either adapt={self.adapt!r} or a target_modules regex ({targets!r}), not both."
                )
            return
        if isinstance(targets, (set, tuple)):
            targets = list(targets)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(
                f"target_modules must be a non-empty list of module names or a regex string, got {targets!r}."
            )
        self.target_modules = sorted(set(targets))
        if self.adapt is None:
            return
        if self.target_modules == _TARGETS_SAVED_WITH_ADAPT.get(self.adapt):
            self.target_modules = None
            return
        raise ValueError(
            f"Pass either adapt={self.adapt!r} or target_modules={self.target_modules}, not both: adapt picks "
            "each model's pooled-embedding modules itself."
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any
    ) -> CLIPAdapterConfig:
        """Load a config saved by ``save_pretrained`` (a local folder or a Hub id), checking it first.

        A local folder is checked as a whole before the config is built: its files against the record of
        the save that wrote them (``adapter_manifest.json``), the config (see ``from_json_file``) and, when
        present, ``adapter_model.safetensors``: complete, not a pickle, only adapter weights, floating point,
        finite, and of the config's ``reduction``. ``PeftModel.from_pretrained`` calls this, so those
        checks run before the base model is touched.

        Args:
            pretrained_model_name_or_path: A folder holding ``adapter_config.json``, or a Hub repository id.
            subfolder: Sub-folder of that folder or repository.
            **kwargs: Passed to ``peft.PeftConfig.from_pretrained`` (e.g. ``revision``).

        Returns:
            The ``CLIPAdapterConfig``.

        Raises:
            ValueError: naming the file and the fix, if the folder mixes two saves, has no
                ``adapter_config.json``, the config is not valid (see ``from_json_file``), or the weights
                are damaged, a pickle, or do not fit the config.

        Example:
            >>> import tempfile, peft_clip_adapter
            >>> folder = tempfile.mkdtemp()
            >>> peft_clip_adapter.CLIPAdapterConfig(ratio=0.6).save_pretrained(folder)
            >>> peft_clip_adapter.CLIPAdapterConfig.from_pretrained(folder).ratio
            0.6
        """
        from peft_clip_adapter.adapter_checks import check_adapter_folder
        from peft_clip_adapter.manifest import manifest_mismatch, verify_manifest

        path = (
            os.path.join(os.fspath(pretrained_model_name_or_path), subfolder)
            if subfolder
            else os.fspath(pretrained_model_name_or_path)
        )
        if not os.path.isdir(path):
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        try:
            if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
                raise ValueError(
                    f"{path} has no {CONFIG_NAME}; it holds {sorted(os.listdir(path))[:8]}. Pass the folder that "
                    "save_pretrained wrote (it holds adapter_config.json and adapter_model.safetensors)."
                )
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
            shapes = check_adapter_folder(path, reduction=config.reduction)
        except ValueError as error:
            # A folder that mixes two saves explains whatever failed: say that first.
            mismatch = manifest_mismatch(path)
            if mismatch:
                raise ValueError(f"{mismatch} Reading it failed with: {error}") from error
            raise
        verify_manifest(path)
        # Kept for the tuner, which compares the weights' widths with the model's before injecting anything.
        config._saved_weight_shapes = shapes
        config._saved_weights_source = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """Read ``adapter_config.json``, refusing anything that would not load as the adapter that was saved.

        Args:
            path_json_file: Path of the JSON file.
            **kwargs: Accepted for ``peft.PeftConfig.from_json_file``'s signature; unused.

        Returns:
            The file's fields as a dict (``from_pretrained`` builds the config from it).

        Raises:
            ValueError: if the file is not valid JSON or not a JSON object, its ``peft_type`` is not
                ``"CLIP_ADAPTER"`` (with a did-you-mean), it misses ``ratio``, ``reduction`` or its targets
                (which would silently load defaults), or has a field this version does not know.

        Example:
            >>> import json, tempfile
            >>> path = tempfile.mkstemp(suffix=".json")[1]
            >>> _ = open(path, "w").write(json.dumps({"peft_type": "LORA"}))
            >>> CLIPAdapterConfig.from_json_file(path)
            Traceback (most recent call last):
            ...
            ValueError: ... has peft_type='LORA'; a CLIP-Adapter config has peft_type='CLIP_ADAPTER'. ...
        """
        from peft_clip_adapter.adapter_checks import read_adapter_config

        loaded = read_adapter_config(path_json_file, config_name=cls.__name__)
        if loaded["peft_type"] != PEFT_TYPE.value:
            raise ValueError(
                f"{path_json_file} has peft_type={loaded['peft_type']!r}; a CLIP-Adapter config has "
                f"peft_type={PEFT_TYPE.value!r}. Load other methods with peft.PeftConfig.from_pretrained."
            )
        return loaded
