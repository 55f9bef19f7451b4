"""``CLIPAdapterConfig``: the hyper-parameters of CLIP-Adapter and their validation."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import PeftConfig
from peft.utils import CONFIG_NAME


class CLIPAdapterPeftType(str, enum.Enum):
    """The ``peft_type`` written to ``adapter_config.json``.

    A ``str`` enum compares and hashes like its value, so ``"CLIP_ADAPTER"`` read back from JSON finds the same
    registry entries. As with peft's ``PeftType``, ``str()`` gives ``"<class>.<name>"``, which peft splits.
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

    A residual bottleneck MLP on a tower's final pooled embedding ``f``, of width ``d`` read from the model::

        f' = ratio * ReLU(W2 @ ReLU(W1 @ f)) + (1 - ratio) * f,   W1: d -> d // reduction, W2: back to d

    Args:
        ratio: Residual blend in ``[0, 1]``: 0 keeps the model's embedding. The paper uses 0.2, and 0.6 for
            fine-grained datasets (EuroSAT, DTD, Aircraft).
        reduction: Bottleneck factor, an integer in ``[1, d]``; 4 in the paper.
        adapt: The tower to adapt: ``"vision"`` (default), ``"text"`` (the class prototypes), ``"audio"``
            (CLAP) or ``"both"`` (every tower). ``None`` with ``target_modules``.
        target_modules: Advanced: names or a regex choosing among the model's pooled-embedding modules.

    ``task_type`` must stay ``None``: the model keeps its own forward.
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
        """Load a config saved by ``save_pretrained`` (a folder or a Hub id); a local folder is checked whole first.

        Checked before the config is built: the files against ``adapter_manifest.json`` (a mix of two saves is
        refused), the config (``from_json_file``), and the weights when present (damaged, not the adapter's,
        not float, not finite, or of another ``reduction``). ``PeftModel.from_pretrained`` calls this, so the
        checks run before the base model is touched. ``**kwargs`` go to ``PeftConfig.from_pretrained``.
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
            check_adapter_folder(path, reduction=config.reduction)
        except ValueError as error:
            # A folder that mixes two saves explains whatever failed: say that first.
            mismatch = manifest_mismatch(path)
            if mismatch:
                raise ValueError(f"{mismatch} Reading it failed with: {error}") from error
            raise
        verify_manifest(path)
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """Read ``adapter_config.json`` as ``read_adapter_config`` does, refusing another method's config."""
        from peft_clip_adapter.adapter_checks import read_adapter_config

        loaded = read_adapter_config(path_json_file, config_name=cls.__name__)
        if loaded["peft_type"] != PEFT_TYPE.value:
            raise ValueError(
                f"{path_json_file} has peft_type={loaded['peft_type']!r}; a CLIP-Adapter config has "
                f"peft_type={PEFT_TYPE.value!r}. Load other methods with peft.PeftConfig.from_pretrained."
            )
        return loaded
