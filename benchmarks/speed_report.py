"""The markdown report of ``speed.py``: the ratios against their targets, then the raw measurements."""

from __future__ import annotations

from typing import Any

from benchlib import markdown_table

#: What each headline ratio should be, from the benchmark's issue.
TARGETS = {
    "inference_overhead": "<= 1.02",
    "ours_over_floor": "<= 1.25",
    "reference_over_ours": ">= 20 at 10 views",
    "cached_training_over_inference_memory": "<= 1.1",
}

ALTERNATIVES = {"lora": "LoRA r=8 (vision q/v)", "full": "full fine-tuning (vision tower)"}


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def ratio_rows(arch: str, result: dict[str, Any]) -> list[list[Any]]:
    """``[arch, ratio, value, target]`` rows of one architecture's results.

    Example:
        >>> ratio_rows("b32", {"memory": {"cached_training_over_inference": 1.01}})[0][2:]
        [1.01, '<= 1.1']
    """
    rows = []
    if "overhead" in result:
        overhead, target = result["overhead"], TARGETS["inference_overhead"]
        rows += [
            [arch, "inference overhead, CLIPModel.forward (adapter / bare)", overhead["forward"]["ratio"], target],
            [arch, "inference overhead, get_image_features", overhead["get_image_features"]["ratio"], target],
            [arch, "inference overhead, (backbone + adapter alone) / backbone", overhead["component_ratio"], target],
        ]
    if "adapter" in result:
        adapter = result["adapter"]
        for entry, how in ((adapter, "measured"), (adapter.get("at_10_views"), "extrapolated")):
            if entry is None:
                continue
            views = entry["views"]
            rows += [
                [arch, f"ours / floor ({views} views, {how})", entry["ours_over_floor"], TARGETS["ours_over_floor"]],
                [
                    arch,
                    f"reference / ours ({views} views, {how}; reference extrapolated)",
                    entry["reference_over_ours"],
                    TARGETS["reference_over_ours"],
                ],
            ]
    for name, label in ALTERNATIVES.items():
        if "alternatives" in result:
            entry = result["alternatives"][name]
            rows += [
                [arch, f"{label} / ours, time per epoch", entry["epoch_over_ours"], ""],
                [arch, f"{label} / ours, peak memory", entry["peak_over_ours"], ""],
            ]
    if "memory" in result:
        value = result["memory"]["cached_training_over_inference"]
        target = TARGETS["cached_training_over_inference_memory"]
        rows.append([arch, "peak memory, training on cached features / one inference pass", value, target])
    return rows


def detail_rows(arch: str, result: dict[str, Any]) -> list[list[Any]]:
    """``[arch, what, value]`` rows with the measurements behind the ratios (seconds unless stated)."""
    rows = []
    if "overhead" in result:
        overhead = result["overhead"]
        for name in ("forward", "get_image_features"):
            entry = overhead[name]
            what = f"{name}, batch {overhead['batch_size']}: bare / with adapter"
            rows.append([arch, what, f"{entry['bare_s']:.4g} / {entry['adapter_s']:.4g}"])
        rows.append([arch, "layer.adapt alone on the batch's pooled embeddings", f"{overhead['adapter_alone_s']:.3g}"])
    if "adapter" in result:
        adapter = result["adapter"]
        reference, ours = adapter["reference"], adapter["ours"]
        steps = f"{reference['total_steps']} steps x {reference['step_s']:.3g} s, {reference['measured_steps']} timed"
        rows += [
            [arch, f"reference recipe, {adapter['epochs']} epochs (extrapolated: {steps})", reference["total_s"]],
            [
                arch,
                f"ours: feature extraction, {adapter['images']} images x {adapter['views']} views",
                ours["extraction_s"],
            ],
            [arch, f"ours: training on cached features, {adapter['epochs']} epochs", ours["training_s"]],
            [arch, "floor: one bare forward pass over images x views", adapter["floor_s"]],
        ]
    if "alternatives" in result:
        alternatives = result["alternatives"]
        rows.append([arch, "ours: one epoch on cached features", alternatives["ours_epoch_s"]])
        for name, label in ALTERNATIVES.items():
            entry = alternatives[name]
            what = f"{label}: one epoch ({alternatives['steps_per_epoch']} steps x {entry['step_s']:.3g} s)"
            rows.append([arch, what, entry["epoch_s"]])
    if "memory" in result:
        memory = result["memory"]
        peaks = f"{_mib(memory['inference_peak_bytes'])} / {_mib(memory['cached_training_peak_bytes'])}"
        increments = f"{_mib(memory['inference_increment_bytes'])} / {_mib(memory['cached_training_increment_bytes'])}"
        rows += [
            [arch, "peak memory MiB: one inference pass / training on cached features", peaks],
            [arch, "memory above the loaded model MiB: inference / cached training", increments],
            [arch, "adapter_model.safetensors bytes", memory["adapter_file_bytes"]],
            [arch, "trainable parameters", memory["trainable_parameters"]],
        ]
        for name, label in ALTERNATIVES.items():
            if "alternatives" in result:
                rows.append([arch, f"peak memory MiB: {label}", _mib(result["alternatives"][name]["peak_bytes"])])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report: command, machine, the ratio table, the measurements and the notes."""
    machine = report["machine"]
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    lines = [
        f"# Speed and memory ({report['settings']['device']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads){gpu}; "
        f"load average (1/5/15 min) {machine['load_average_1m_5m_15m']} at start, "
        f"{machine.get('load_average_at_end')} at end; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}.",
        "",
    ]
    ratios = [row for arch, result in report["results"].items() for row in ratio_rows(arch, result)]
    details = [row for arch, result in report["results"].items() for row in detail_rows(arch, result)]
    lines += ["## Ratios", "", markdown_table(["arch", "ratio", "value", "target"], ratios), ""]
    lines += ["## Measurements (seconds unless stated)", "", markdown_table(["arch", "what", "value"], details), ""]
    lines += ["## Notes", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines)
