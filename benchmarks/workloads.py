"""The training and inference steps that ``speed.py`` times, and a probe that runs one in a fresh process.

Each builder returns a callable doing one unit of work (an inference batch, a training step, an epoch on
cached features), so timing and memory measurement share the exact same code. Run as a script, this
module is the memory probe: it builds one workload, resets the peak-memory window, runs it and prints
one JSON line with the median step time and the peak memory above the resident baseline::

    python benchmarks/workloads.py '{"workload": "lora", "arch": "vit-b-32", "device": "cpu", "batch_size": 32}'
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from benchlib import build_clip, memory_bytes, reference_prompt_ids, reset_peak_memory, seconds
from torch.nn import functional as F

#: Workloads the probe knows, with what one step is.
WORKLOADS = {
    "inference": "one get_image_features pass over a batch, no gradients (adapter attached)",
    "cached": "one epoch of CLIP-Adapter training on cached pooled embeddings (one view per image)",
    "lora": "one training step of PEFT LoRA r=8 on the vision tower's q_proj/v_proj (AdamW)",
    "full": "one training step of full fine-tuning of the vision tower and its projection (AdamW)",
}


def clip_adapter(model, *, ratio: float = 0.2, reduction: int = 4):
    """``model`` with a vision CLIP-Adapter attached (a ``CLIPAdapterPeftModel``)."""
    from peft import get_peft_model

    import peft_clip_adapter

    return get_peft_model(model, peft_clip_adapter.CLIPAdapterConfig(ratio=ratio, reduction=reduction))


@torch.no_grad()
def zero_shot_weights(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot classifier ``[D, C]`` from prompt token ids ``[C, L]`` (normalised columns)."""
    text = model.get_text_features(input_ids=prompt_ids).pooler_output  # [C, D]
    return F.normalize(text.float(), dim=-1).T  # [D, C]


def inference_step(model, pixel_values: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One frozen forward pass of the vision tower over ``pixel_values`` ``[B, 3, H, W]``."""

    @torch.no_grad()
    def step() -> torch.Tensor:
        return model.get_image_features(pixel_values=pixel_values).pooler_output  # [B, D]

    return step


def cached_training_epoch(
    peft_model,
    class_embeddings: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> Callable[[], float]:
    """One epoch of the paper's recipe on cached embeddings: each call trains on the next view.

    Args:
        peft_model: A CLIP-Adapter ``PeftModel``; its adapter parameters are the ones trained.
        class_embeddings: ``[C, T, D]`` frozen prompt embeddings.
        features: ``[V, N, D]`` cached raw pooled embeddings (V augmented views of N images).
        labels: ``[N]`` class indices.
        batch_size: Images per step (the paper: 32).
        learning_rate: SGD learning rate (the paper: 2e-3).
        seed: Seed of the shuffling.

    Returns:
        A callable running one epoch and returning its mean loss.
    """
    from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier

    head = CLIPAdapterClassifier.from_model(peft_model, class_embeddings)
    parameters = [parameter for parameter in head.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    epoch = [0]

    def run_epoch() -> float:
        view = features[epoch[0] % features.shape[0]]  # [N, D]
        epoch[0] += 1
        order = torch.randperm(view.shape[0], generator=generator)
        losses = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            losses.append(optimizer_step(optimizer, head(view[rows]), labels[rows]))  # head: [B, D] -> [B, C]
        return statistics.fmean(losses)

    return run_epoch


def optimizer_step(optimizer: torch.optim.Optimizer, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy of ``logits`` ``[B, C]`` against ``labels`` ``[B]``, back-propagated and applied."""
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _training_step(model, parameters, pixel_values, labels, text_weights) -> Callable[[], float]:
    """A step that back-propagates through the vision tower: CLIP's logits against fixed class weights."""
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    scale = model.logit_scale.detach().exp()

    def step() -> float:
        features = model.get_image_features(pixel_values=pixel_values).pooler_output  # [B, D]
        logits = scale * F.normalize(features, dim=-1) @ text_weights  # [B, C]
        return optimizer_step(optimizer, logits, labels)

    return step


def lora_training_step(model, pixel_values, labels, text_weights) -> Callable[[], float]:
    """PEFT LoRA (r=8, alpha=16) on the vision tower's ``q_proj``/``v_proj``; a step trains only LoRA."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=r".*vision_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, config)
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    return _training_step(peft_model.get_base_model(), parameters, pixel_values, labels, text_weights)


def full_finetune_step(model, pixel_values, labels, text_weights) -> Callable[[], float]:
    """Full fine-tuning of the vision tower and ``visual_projection``; the text tower stays frozen."""
    model.requires_grad_(False)
    vision = [model.vision_model, model.visual_projection]
    for module in vision:
        module.requires_grad_(True)
    parameters = [parameter for module in vision for parameter in module.parameters()]
    return _training_step(model, parameters, pixel_values, labels, text_weights)


def build_workload(spec: dict[str, Any]) -> Callable[[], Any]:
    """The step of ``spec["workload"]`` on a model of ``spec["arch"]``, with random inputs of the real shapes.

    ``spec`` keys: workload, arch, device, batch_size, classes; for "cached" also views and images. The
    step holds on to the model (``step.model``), so every workload is measured with the backbone
    resident, as in the trainer, which keeps it to evaluate and save.

    Raises:
        ValueError: for an unknown workload.
    """
    if spec["workload"] not in WORKLOADS:
        raise ValueError(f"Unknown workload {spec['workload']!r}; choose one of {sorted(WORKLOADS)}.")
    model = build_clip(spec["arch"]).to(spec["device"])
    step = _build_step(spec, model)
    step.model = model
    return step


def _build_step(spec: dict[str, Any], model) -> Callable[[], Any]:
    name, device = spec["workload"], spec["device"]
    generator = torch.Generator().manual_seed(0)
    classes, batch = spec["classes"], spec["batch_size"]
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(device)  # [B, 3, H, W]
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)  # [B]
    prompt_ids = reference_prompt_ids(model.config.text_config, classes).to(device)  # [C, L]
    if name == "inference":
        return inference_step(clip_adapter(model), pixel_values)
    text_weights = zero_shot_weights(model, prompt_ids)  # [D, C]
    if name == "cached":
        views, images, width = spec["views"], spec["images"], model.config.projection_dim
        features = torch.randn(views, images, width, generator=generator).to(device)  # [V, N, D]
        image_labels = (torch.arange(images) % classes).to(device)  # [N]
        class_embeddings = text_weights.T[:, None, :].contiguous()  # [C, 1, D]
        return cached_training_epoch(clip_adapter(model), class_embeddings, features, image_labels, batch_size=batch)
    if name == "lora":
        return lora_training_step(model, pixel_values, labels, text_weights)
    return full_finetune_step(model, pixel_values, labels, text_weights)


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a workload (``spec["warmup"]`` untimed then ``spec["steps"]`` timed calls) and measure it.

    Returns:
        ``{"step_seconds": median, "baseline_bytes": memory before the first call, "peak_bytes": highest
        memory during the calls, "increment_bytes": peak - baseline}``.
    """
    device = spec["device"]
    step = build_workload(spec)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    baseline, _ = memory_bytes(device)
    for _ in range(spec.get("warmup", 1)):
        step()
    times = [seconds(step, device) for _ in range(spec.get("steps", 1))]
    _, peak = memory_bytes(device)
    return {
        "step_seconds": statistics.median(times),
        "step_times_s": times,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "increment_bytes": peak - baseline,
    }


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``images`` (the last batch may be partial).

    Example:
        >>> steps_per_epoch(160, 32), steps_per_epoch(161, 32)
        (5, 6)
    """
    return math.ceil(images / batch_size)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    print(json.dumps(probe(json.loads(sys.argv[1]))))
