"""Where each contrastive dual encoder pools a tower's final embedding: the one table of per-family knowledge.

CLIP-Adapter acts on the final pooled embedding of a tower, the vector the contrastive head compares.
That vector comes out of a different module in each family: a projection ``nn.Linear`` (CLIP and its
relatives), an MLP block (GroupViT, CLAP), an attention-pooling head (SigLIP's image side) or a
parameter-free pooling of the last feature map (ALIGN's image side). ``POOLED_EMBEDDINGS`` records that
module per transformers model class, the way peft records default target modules per architecture;
``adapt``, the tuner, the adapter layer and the few-shot toolkit all ask this module and nothing else.

Model classes are matched by name along the class hierarchy, so subclasses qualify, and anywhere inside
another module (a ``PeftModel``, a user's wrapper): module paths are relative to the matched model.
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
    """The module whose output is a tower's final pooled embedding, and how to read the embedding's width.

    Args:
        path: Module path relative to the model class it belongs to (e.g. ``"vision_model.head"``).
        kind: What the module is, which says how to find the width ``d``:
            ``"linear"``, an ``nn.Linear`` (``out_features``); ``"block"``, a module whose output comes
            out of its last ``nn.Linear``, such as an MLP or an attention-pooling head (that Linear's
            ``out_features``); ``"pool"``, a parameter-free pooling of a convolutional feature map
            ``[N, C, h, w] -> [N, C, 1, 1]`` (``C``, the ``out_channels`` of the tower's last ``nn.Conv2d``;
            the adapter then acts on the channels).

    Example:
        >>> POOLED_EMBEDDINGS["SiglipModel"]["vision"]
        PooledModule(path='vision_model.head', kind='block')
    """

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
    """One tower of a model as found through ``POOLED_EMBEDDINGS``.

    Args:
        branch: ``"vision"``, ``"text"`` or ``"audio"``.
        name: Full name of the pooled-embedding module in the model searched.
        module: That module (the adapter layer wrapping it, once adapted).
        kind: The ``PooledModule.kind``.
        width: Width ``d`` of the pooled embedding, which the adapter works on.
        model_class: The table entry the tower was found through (e.g. ``"SiglipModel"``).

    Example:
        >>> import torch
        >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        >>> text = CLIPTextModelWithProjection(CLIPTextConfig(
        ...     hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, projection_dim=4))
        >>> tower = find_towers(text)["text_projection"]
        >>> tower.branch, tower.kind, tower.width, tower.model_class
        ('text', 'linear', 4, 'CLIPTextModelWithProjection')
    """

    branch: str
    name: str
    module: nn.Module
    kind: PooledKind
    width: int
    model_class: str


def table_class(module: nn.Module) -> Optional[str]:
    """The ``POOLED_EMBEDDINGS`` entry for ``module``'s class or its nearest listed base class, if any.

    Args:
        module: Any module.

    Returns:
        The class name used as table key, or ``None`` when no class in its hierarchy is listed.

    Example:
        >>> from torch import nn
        >>> table_class(nn.Linear(2, 2)) is None
        True
    """
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
    """Every pooled-embedding module of every listed model inside ``model``, by full module name.

    Modules already wrapped by an adapter are found too (``Tower.module`` is then the layer). A listed
    module the model lacks (e.g. SigLIP built with ``vision_use_head=False``) gives no tower.

    Args:
        model: A transformers model, a ``PeftModel`` around one, or any module holding one.

    Returns:
        ``{full module name: Tower}`` in table order; empty when no listed model is inside.

    Example:
        >>> from transformers import CLIPConfig, CLIPModel
        >>> tiny = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        >>> clip = CLIPModel(CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 8, "patch_size": 4},
        ...                             projection_dim=4))
        >>> {name: tower.branch for name, tower in find_towers(clip).items()}
        {'visual_projection': 'vision', 'text_projection': 'text'}
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
    """What ``model`` has, in words, for error messages: its towers and where they pool, or that it has none.

    Args:
        model: Any module.

    Returns:
        E.g. ``"vision ('visual_projection') and text ('text_projection')"``.

    Example:
        >>> from torch import nn
        >>> describe_towers(nn.Linear(2, 2))
        'no pooled-embedding module of a supported dual encoder'
    """
    towers = find_towers(model)
    if not towers:
        return "no pooled-embedding module of a supported dual encoder"
    return " and ".join(f"{tower.branch} ({tower.name!r})" for tower in towers.values())


def missing_branch_error(model: nn.Module, branch: Optional[str], hint: str = "") -> ValueError:
    """The error for a tower ``model`` does not have: it names the model class and what the model has.

    Args:
        model: The model asked for the branch.
        branch: The requested branch (``"vision"``, ``"text"`` or ``"audio"``), or ``None`` for any tower.
        hint: A sentence appended to the message (what to do instead).

    Returns:
        A ``ValueError`` to raise.

    Example:
        >>> from torch import nn
        >>> print(missing_branch_error(nn.Linear(2, 2), "audio"))  # doctest: +NORMALIZE_WHITESPACE
        Linear has no audio tower with a pooled embedding known to CLIP-Adapter; it has no pooled-embedding
        module of a supported dual encoder. Supported model classes are listed on the 'Supported models'
        page (peft_clip_adapter.families.POOLED_EMBEDDINGS).
    """
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
    """The model's towers keyed by branch.

    Args:
        model: A transformers model, a ``PeftModel`` around one, or any module holding one.

    Returns:
        ``{branch: Tower}``, e.g. ``{"vision": ..., "text": ...}`` for a ``CLIPModel``.

    Raises:
        ValueError: if ``model`` holds two towers of one branch (e.g. two CLIP models), which makes a
            branch ambiguous; pass ``target_modules`` to choose.

    Example:
        >>> from torch import nn
        >>> towers_by_branch(nn.Linear(2, 2))
        {}
    """
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
    """The towers ``adapt`` names in ``model``: one branch, or ``"both"`` (every tower the model has).

    Args:
        model: A transformers model, a ``PeftModel`` around one, or any module holding one.
        adapt: ``"vision"``, ``"text"``, ``"audio"`` or ``"both"``.

    Returns:
        ``{full module name: Tower}``, never empty.

    Raises:
        ValueError: naming the model class and what it has, if it has no such tower (or no tower at all).

    Example:
        >>> from transformers import CLIPConfig, CLIPModel
        >>> tiny = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        >>> clip = CLIPModel(CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 8, "patch_size": 4},
        ...                             projection_dim=4))
        >>> list(select_towers(clip, "text"))
        ['text_projection']
        >>> select_towers(clip, "audio")
        Traceback (most recent call last):
        ...
        ValueError: CLIPModel has no audio tower with a pooled embedding known to CLIP-Adapter; it has vision ...
    """
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
    """Width ``d`` of the pooled embedding of ``model``'s ``branch`` tower (what the adapter works on).

    Args:
        model: A transformers model, a ``PeftModel`` around one, or any module holding one.
        branch: ``"vision"``, ``"text"`` or ``"audio"``.

    Returns:
        ``d``.

    Raises:
        ValueError: if the model has no such tower.

    Example:
        >>> from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        >>> text = CLIPTextModelWithProjection(CLIPTextConfig(
        ...     hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, projection_dim=4))
        >>> embedding_width(text, "text")
        4
    """
    return next(iter(select_towers(model, branch).values())).width


def branch_of_module_path(path: str, candidates: tuple[str, ...] = BRANCHES) -> Optional[str]:
    """The branch a pooled-embedding module path belongs to, read from the table (for loading saved adapters).

    The longest table path that ``path`` ends with decides: ``"vision_model.head"`` is SigLIP's vision head,
    while a bare ``"head"`` may be SigLIP's vision or text head, and ``candidates`` (the branches the saved
    config adapted) must then tell.

    Args:
        path: A module path as saved in a checkpoint, e.g. ``"base_model.model.vision_model.head"``.
        candidates: The branches the path may belong to.

    Returns:
        The branch, or ``None`` when the table does not tell (unknown or ambiguous).

    Example:
        >>> branch_of_module_path("base_model.model.vision_model.head"), branch_of_module_path("head")
        ('vision', None)
        >>> branch_of_module_path("head", candidates=("text",))
        'text'
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
