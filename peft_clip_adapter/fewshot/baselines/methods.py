"""Every baseline on one sampled training set, by name: fit once, then score each test set.

``run_method`` takes what a cell shares (``FewShotCell``: the cached features of the shots, the prompts, the
model) and the test sets (``EvalSet``), and returns the accuracies, the chosen hyperparameters and the seconds
spent on training and selection (not on the shared extraction). A test set of classes never trained on
(base-to-novel's novel half) is scored by the method where it can classify unseen names (zero-shot, the
CLIP-Adapters, LoRA); the others (the linear probe, the Tip-Adapter caches) report zero-shot there and list the
test set under ``"zero_shot_for"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from peft_clip_adapter.fewshot import training
from peft_clip_adapter.fewshot.baselines import linear_probe
from peft_clip_adapter.fewshot.baselines.clip_adapter import train_clip_adapter
from peft_clip_adapter.fewshot.baselines.tip_adapter import fit_tip_adapter, tip_logits
from peft_clip_adapter.fewshot.baselines.zero_shot import text_prototypes, zero_shot_logits
from peft_clip_adapter.fewshot.features import FeatureSet
from peft_clip_adapter.fewshot.search import DEFAULT_RATIO_GRID

#: Every method, in the order tables list them.
METHODS = ("zero-shot", "linear-probe", "tip-adapter", "tip-adapter-f", "clip-adapter", "clip-adapter-auto", "lora")
#: The methods that classify class names they were not trained on.
CLASSIFY_UNSEEN = ("zero-shot", "clip-adapter", "clip-adapter-auto", "lora")


def parse_methods(text: str) -> list[str]:
    """``"all"`` or comma-separated names of ``METHODS``, in ``METHODS`` order.

    Example:
        >>> parse_methods("tip-adapter,zero-shot")
        ['zero-shot', 'tip-adapter']
    """
    names = list(METHODS) if text.strip() == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if not names or unknown:
        raise ValueError(f"Unknown method(s) {unknown or text!r}; choose 'all' or names from {list(METHODS)}.")
    return [name for name in METHODS if name in names]


@dataclass
class MethodSettings:
    """The settings a run shares: CLIP-Adapter's epochs, ratio and grid, LoRA's iterations per shot."""

    num_train_epochs: int = 200
    learning_rate: float = 2e-3
    ratio: float = 0.2
    ratio_grid: tuple[float, ...] = DEFAULT_RATIO_GRID
    lora_iterations_per_shot: int = 500


@dataclass
class FewShotCell:
    """One sampled training set: ``shots`` images of each class drawn with ``seed``, and what every method shares.

    ``train_set`` holds the augmented views, ``train_eval`` the eval-transform view of the same shots;
    ``class_embeddings`` ``[C, T, D]`` the prompts of the trained classes; ``scale`` the model's
    ``exp(logit_scale)``; ``train_dataset`` the images (LoRA trains on pixels).
    """

    model_name_or_path: str
    class_names: list[str]
    templates: list[str]
    class_embeddings: torch.Tensor
    scale: float
    train_set: FeatureSet
    train_eval: FeatureSet
    shots: int
    seed: int
    train_dataset: Any = None


@dataclass
class EvalSet:
    """Test images and their classes: ``class_indices`` maps each to a trained class, ``None`` for unseen classes."""

    name: str
    features: FeatureSet
    class_names: list[str]
    class_embeddings: torch.Tensor
    class_indices: Optional[list[int]] = None
    dataset: Any = None


@dataclass
class MethodResult:
    """A method's accuracy (%) per test set, its chosen hyperparameters and its training + selection seconds."""

    accuracy: dict[str, float]
    hyperparameters: dict[str, Any]
    seconds: float
    zero_shot_for: list[str] = field(default_factory=list)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # Integer counts, so that 47 of 60 is 78.333..., not float32's 78.33333611.
    return 100.0 * (logits.argmax(dim=-1).cpu() == labels).sum().item() / len(labels)


def _zero_shot(test: EvalSet, scale: float) -> float:
    logits = zero_shot_logits(test.features.features[0], text_prototypes(test.class_embeddings), scale)
    return _accuracy(logits, test.features.labels)


def _cache_method(name: str, cell: FewShotCell) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Fit a feature-cache method: its logits over the trained classes, and its hyperparameters."""
    prototypes = text_prototypes(cell.class_embeddings)
    if name == "zero-shot":
        return (lambda features: zero_shot_logits(features, prototypes, cell.scale)), {}
    if name == "linear-probe":
        weight = linear_probe.train_linear_probe(cell.train_set, prototypes, cell.scale, seed=cell.seed)
        recipe = {"optimizer": "adam", "learning_rate": linear_probe.LEARNING_RATE, "steps": linear_probe.STEPS}
        return (lambda features: linear_probe.linear_probe_logits(features, weight, cell.scale)), recipe
    fine_tune = name == "tip-adapter-f"
    keys, choice = fit_tip_adapter(
        cell.train_set, cell.train_eval.features[0], prototypes, cell.scale, fine_tune=fine_tune, seed=cell.seed
    )
    labels = cell.train_set.labels

    def logits(features: torch.Tensor) -> torch.Tensor:
        return tip_logits(features, keys, labels, prototypes, cell.scale, alpha=choice.alpha, beta=choice.beta)

    return logits, choice.to_dict()


def run_method(name: str, cell: FewShotCell, tests: list[EvalSet], settings: MethodSettings) -> MethodResult:
    """Fit method ``name`` on ``cell`` (timed) and score it on every test set (accuracy in %)."""
    if name == "lora":
        return _run_lora(cell, tests, settings)
    start = time.perf_counter()
    accuracy, zero_shot_for = {}, []
    if name in ("clip-adapter", "clip-adapter-auto"):
        adapter = train_clip_adapter(
            cell.model_name_or_path, cell.class_names, cell.templates, cell.train_set, cell.train_eval,
            seed=cell.seed, ratio="auto" if name == "clip-adapter-auto" else settings.ratio,
            ratio_grid=settings.ratio_grid, num_train_epochs=settings.num_train_epochs,
            learning_rate=settings.learning_rate,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        for test in tests:
            accuracy[test.name] = 100.0 * adapter.accuracy(test.class_embeddings, test.features)
        return MethodResult(accuracy, adapter.hyperparameters, seconds)
    with training.one_thread_on_cpu(torch.device("cpu")):  # tiny matrices: more threads only synchronise
        logits_of, hyperparameters = _cache_method(name, cell)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for test in tests:
            if test.class_indices is None:  # unseen classes: zero-shot on their own prompts
                accuracy[test.name] = _zero_shot(test, cell.scale)
                if name not in CLASSIFY_UNSEEN:
                    zero_shot_for.append(test.name)
                continue
            logits = logits_of(test.features.features[0])[:, test.class_indices]
            accuracy[test.name] = _accuracy(logits, test.features.labels)
    return MethodResult(accuracy, hyperparameters, seconds, zero_shot_for)


def check_lora_model(model_name_or_path: str) -> torch.nn.Module:
    """The model, loaded fresh; ``ValueError`` (from ``lora.lora_config_for``) if LoRA's projections are missing."""
    from transformers import AutoModel

    from peft_clip_adapter.fewshot.baselines import lora

    model = AutoModel.from_pretrained(model_name_or_path)
    lora.lora_config_for(model)
    return model


def _run_lora(cell: FewShotCell, tests: list[EvalSet], settings: MethodSettings) -> MethodResult:
    """CLIP-LoRA's recipe end to end on the shots' images (``baselines.lora``), scored on the test images."""
    from transformers import AutoProcessor

    from peft_clip_adapter.fewshot.baselines import lora

    model = check_lora_model(cell.model_name_or_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # end to end: both towers run every step
    processor = AutoProcessor.from_pretrained(cell.model_name_or_path)
    iterations = settings.lora_iterations_per_shot * cell.shots
    start = time.perf_counter()
    # One thread on a CPU: measured 20x faster per iteration on the micro-CLIP on a busy 2-core machine.
    with training.one_thread_on_cpu(model.device):
        train = (model, processor, cell.train_dataset, cell.class_names, cell.templates)
        peft_model = lora.train_lora(*train, seed=cell.seed, iterations=iterations)
        seconds = time.perf_counter() - start
        accuracy = {}
        with torch.no_grad():
            for test in tests:
                logits = lora.lora_logits(peft_model, processor, test.dataset, test.class_names, cell.templates)
                accuracy[test.name] = _accuracy(logits, test.features.labels)
    hyperparameters = {"rank": 2, "learning_rate": 2e-4, "batch_size": 32, "iterations": iterations}
    return MethodResult(accuracy, hyperparameters, seconds)
