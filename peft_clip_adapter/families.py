"""Where each contrastive dual encoder pools a tower's final embedding: the one table of per-family knowledge.

That vector (the one the contrastive head compares) comes out of a projection ``nn.Linear`` (CLIP and its
relatives), an MLP block (GroupViT, CLAP), an attention-pooling head (SigLIP) or a parameter-free pooling
(ALIGN's image side). ``POOLED_EMBEDDINGS`` records it per transformers model class, as peft records target
modules per architecture. Classes match by name along the hierarchy, anywhere inside another module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

#: The towers a dual encoder can have. ``adapt="both"`` means every tower the model has.
BRANCHES: tuple[str, ...] = ("vision", "text", "audio")

PooledKind = Literal["linear", "block", "pool"]


@dataclass(frozen=True)
class PooledModule:
    """The module whose output is a tower's final pooled embedding (``path``, relative to its model class), and
    how its width ``d`` is read (``kind``): ``"linear"``, its ``out_features``; ``"block"``, its last Linear's;
    ``"pool"``, a pooling ``[N, C, h, w] -> [N, C, 1, 1]``, the tower's last ``Conv2d`` ``out_channels``."""

    path: str
    kind: PooledKind = "linear"


_VISUAL_PROJECTION = PooledModule("visual_projection")
_TEXT_PROJECTION = PooledModule("text_projection")
_CLIP_LIKE = {"vision": _VISUAL_PROJECTION, "text": _TEXT_PROJECTION}
_SIGLIP_VISION = PooledModule("head", "block")  # attention pooling: probe attention, LayerNorm, MLP
_SIGLIP_TEXT = PooledModule("head")  # a Linear on the last token's state
_SIGLIP = {"vision": PooledModule("vision_model.head", "block"), "text": PooledModule("text_model.head")}
_CLAP_AUDIO = PooledModule("audio_projection", "block")  # Linear, ReLU, Linear
_CLAP_TEXT = PooledModule("text_projection", "block")

#: Model class name -> {branch: the module whose output is that tower's final pooled embedding}.
POOLED_EMBEDDINGS: dict[str, dict[str, PooledModule]] = {
    "CLIPModel": _CLIP_LIKE,
    "CLIPVisionModelWithProjection": {"vision": _VISUAL_PROJECTION},
    "CLIPTextModelWithProjection": {"text": _TEXT_PROJECTION},
    "MetaClip2Model": _CLIP_LIKE,
    "MetaClip2VisionModelWithProjection": {"vision": _VISUAL_PROJECTION},
    "MetaClip2TextModelWithProjection": {"text": _TEXT_PROJECTION},
    "Aimv2Model": _CLIP_LIKE,
    "AltCLIPModel": _CLIP_LIKE,
    "ChineseCLIPModel": _CLIP_LIKE,
    "CLIPSegModel": _CLIP_LIKE,
    "OwlViTModel": _CLIP_LIKE,
    "Owlv2Model": _CLIP_LIKE,
    "BlipModel": _CLIP_LIKE,  # its image-text contrastive embeddings
    "VisionTextDualEncoderModel": _CLIP_LIKE,
    "SiglipModel": _SIGLIP,  # also SigLIP 2's fixed-resolution checkpoints
    "SiglipVisionModel": {"vision": _SIGLIP_VISION},
    "SiglipTextModel": {"text": _SIGLIP_TEXT},
    "Siglip2Model": _SIGLIP,  # SigLIP 2 NaFlex (variable resolution)
    "Siglip2VisionModel": {"vision": _SIGLIP_VISION},
    "Siglip2TextModel": {"text": _SIGLIP_TEXT},
    # ALIGN has no image projection: the embedding is the pooled last feature map itself.
    "AlignModel": {"vision": PooledModule("vision_model.pooler", "pool"), "text": _TEXT_PROJECTION},
    "AlignVisionModel": {"vision": PooledModule("pooler", "pool")},
    "GroupViTModel": {  # Linear, BatchNorm1d, ReLU, Linear
        "vision": PooledModule("visual_projection", "block"),
        "text": PooledModule("text_projection", "block"),
    },
    "ClapModel": {"audio": _CLAP_AUDIO, "text": _CLAP_TEXT},
    "ClapAudioModelWithProjection": {"audio": _CLAP_AUDIO},
    "ClapTextModelWithProjection": {"text": _CLAP_TEXT},
}


@dataclass(frozen=True)
class Tower:
    """One tower as found through ``POOLED_EMBEDDINGS``: its ``branch``, full module ``name``, the ``module``
    (the adapter layer, once adapted), ``kind``, embedding ``width`` and the table entry ``model_class``."""

    branch: str
    name: str
    module: nn.Module
    kind: PooledKind
    width: int
    model_class: str


def table_class(module: nn.Module) -> Optional[str]:
    """The ``POOLED_EMBEDDINGS`` key of ``module``'s class or its nearest listed base class, or ``None``."""
    return next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in POOLED_EMBEDDINGS), None)


def _listed_models(model: nn.Module) -> list[tuple[str, str]]:
    """``(prefix, table class)`` of the outermost listed models in ``model`` (a listed model's own towers,
    e.g. SiglipModel's SiglipVisionModel, are part of it and not looked at again)."""
    found: list[tuple[str, str]] = []
    for prefix, module in model.named_modules():
        if any(root == "" or prefix.startswith(root + ".") for root, _ in found):
            continue
        model_class = table_class(module)
        if model_class is not None:
            found.append((prefix, model_class))
    return found


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _width(model: nn.Module, name: str, module: nn.Module, kind: PooledKind) -> int:
    if kind == "linear":
        return module.out_features
    if kind == "block":
        linears = [inner for inner in module.modules() if isinstance(inner, nn.Linear)]
        return linears[-1].out_features
    tower = model.get_submodule(name.rpartition(".")[0])
    convolutions = [inner for inner in tower.modules() if isinstance(inner, nn.Conv2d)]
    return convolutions[-1].out_channels


def find_towers(model: nn.Module) -> dict[str, Tower]:
    """Every pooled-embedding module of every listed model inside ``model``, by full module name, in table order.

    Wrapped modules are found too (``Tower.module`` is then the layer); a listed module the model lacks (SigLIP
    built with ``vision_use_head=False``) gives no tower.
    """
    towers: dict[str, Tower] = {}
    for prefix, model_class in _listed_models(model):
        for branch, spec in POOLED_EMBEDDINGS[model_class].items():
            name = _join(prefix, spec.path)
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            towers[name] = Tower(branch, name, module, spec.kind, _width(model, name, base, spec.kind), model_class)
    return towers


def describe_towers(model: nn.Module) -> str:
    """``model``'s towers in words, for error messages, e.g. ``"vision ('visual_projection') and text (...)"``."""
    towers = find_towers(model)
    if not towers:
        return "no pooled-embedding module of a supported dual encoder"
    return " and ".join(f"{tower.branch} ({tower.name!r})" for tower in towers.values())


def missing_branch_error(model: nn.Module, branch: Optional[str], hint: str = "") -> ValueError:
    """The ``ValueError`` for a tower ``model`` lacks (``branch``, or any when ``None``): it names the model class
    and what the model has, then ``hint``."""
    expected = [
        f"a {model_class} pools it in {_join(prefix, POOLED_EMBEDDINGS[model_class][branch].path)!r}, "
        "which this model lacks"
        for prefix, model_class in _listed_models(model)
        if branch in POOLED_EMBEDDINGS[model_class]
    ]
    message = (
        f"{type(model).__name__} has no {branch + ' ' if branch else ''}tower with a pooled embedding known to "
        "CLIP-Adapter"
        + (f" ({'; '.join(expected)})" if expected else "")
        + f"; it has {describe_towers(model)}. Supported model classes are listed on the 'Supported models' "
        "page (peft_clip_adapter.families.POOLED_EMBEDDINGS)."
    )
    return ValueError(f"{message} {hint}".strip())


def towers_by_branch(model: nn.Module) -> dict[str, Tower]:
    """``{branch: Tower}``; ``ValueError`` if two towers share a branch (pass ``target_modules`` then)."""
    by_branch: dict[str, Tower] = {}
    for tower in find_towers(model).values():
        if tower.branch in by_branch:
            raise ValueError(
                f"{type(model).__name__} holds two {tower.branch} towers ({by_branch[tower.branch].name!r} and "
                f"{tower.name!r}), so the {tower.branch} branch is ambiguous. Pass target_modules naming the "
                "pooled-embedding modules to adapt."
            )
        by_branch[tower.branch] = tower
    return by_branch


def select_towers(model: nn.Module, adapt: str) -> dict[str, Tower]:
    """The towers ``adapt`` names (one branch, or ``"both"``: every tower), never empty: ``ValueError`` naming the
    model class and what it has otherwise."""
    by_branch = towers_by_branch(model)
    if adapt == "both":
        if not by_branch:
            raise missing_branch_error(model, None)
        return {tower.name: tower for tower in by_branch.values()}
    if adapt not in by_branch:
        choices = [*by_branch, "both"] if by_branch else []
        hint = f"Use adapt={' / '.join(repr(choice) for choice in choices)}." if choices else ""
        raise missing_branch_error(model, adapt, hint)
    tower = by_branch[adapt]
    return {tower.name: tower}


def embedding_width(model: nn.Module, branch: str) -> int:
    """Width ``d`` of the pooled embedding of ``model``'s ``branch`` tower; ``ValueError`` if it has none."""
    return next(iter(select_towers(model, branch).values())).width


def branch_of_module_path(path: str, candidates: tuple[str, ...] = BRANCHES) -> Optional[str]:
    """The branch of a saved pooled-embedding module path, or ``None`` when the table cannot tell.

    The longest table path that ``path`` ends with decides: ``"vision_model.head"`` is SigLIP's vision head;
    a bare ``"head"`` may be either tower, and ``candidates`` (the saved config's branches) must tell.
    """
    matches: dict[int, set[str]] = {}
    for towers in POOLED_EMBEDDINGS.values():
        for branch, spec in towers.items():
            if branch in candidates and (path == spec.path or path.endswith("." + spec.path)):
                matches.setdefault(len(spec.path), set()).add(branch)
    if not matches:
        return None
    branches = matches[max(matches)]
    return next(iter(branches)) if len(branches) == 1 else None
