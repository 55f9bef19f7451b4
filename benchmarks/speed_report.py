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
    "workers_speedup": ">= 1.7",
    "cpu_ms_per_train_view": "<= 1.5",
    "big_jpeg_views_speedup": ">= 4",
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
        if "extraction_over_floor" in adapter:
            rows.append([arch, "ours, extraction alone / floor (measured)", adapter["extraction_over_floor"], ""])
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
        utilisation = adapter.get("gpu_utilisation_percent") or {}
        if utilisation.get("extraction") is not None:
            what = "GPU utilisation %: extraction / training (sampled)"
            rows.append([arch, what, f"{utilisation['extraction']:.0f} / {utilisation['training'] or 0:.0f}"])
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


def pipeline_ratio_rows(pipeline: dict[str, Any]) -> list[list[Any]]:
    """``[ratio, value, target]`` rows of the input-pipeline section.

    Example:
        >>> costs = {"500x375": {"train_cpu_views_ms_per_view": 1.2, "train_device_views_cpu_ms_per_view": 0.3,
        ...          "eval_speedup": 1.0}, "12MP": {"train_views_speedup_cpu_views": 3.0,
        ...          "train_views_speedup_device_views": 6.0, "eval_speedup": 2.5}}
        >>> throughput = {"workers_speedup": 1.8, "workers_compared": [0, 2], "workers_speedup_free_cores": 2.5}
        >>> pipeline_ratio_rows({"views": 10, "costs": costs, "throughput": throughput})[0]
        ['extraction images/s, 2 workers / 0 (tiny 224-px backbone, CPU views)', 1.8, '>= 1.7']
    """
    costs, throughput, views = pipeline["costs"], pipeline["throughput"], pipeline["views"]
    fewest, most = throughput["workers_compared"]
    small, big = costs["500x375"], costs["12MP"]
    per_view, big_views = TARGETS["cpu_ms_per_train_view"], TARGETS["big_jpeg_views_speedup"]
    return [
        [
            f"extraction images/s, {most} workers / {fewest} (tiny 224-px backbone, CPU views)",
            throughput["workers_speedup"],
            TARGETS["workers_speedup"],
        ],
        [
            f"extraction, {most} workers / {fewest}: bound from CPU time (a free core per process)",
            throughput["workers_speedup_free_cores"],
            TARGETS["workers_speedup"],
        ],
        ["CPU ms per training view, 500x375, CPU views", small["train_cpu_views_ms_per_view"], per_view],
        [
            "CPU ms per training view, 500x375, device views (CPU side)",
            small["train_device_views_cpu_ms_per_view"],
            per_view,
        ],
        [f"12 MP JPEG to its {views} views: before / CPU views", big["train_views_speedup_cpu_views"], big_views],
        [
            f"12 MP JPEG to its {views} views: before / device views (CPU side)",
            big["train_views_speedup_device_views"],
            big_views,
        ],
        ["eval image, 500x375: before / ours", small["eval_speedup"], ""],
        ["eval image, 12 MP: before / ours", big["eval_speedup"], ""],
    ]


def pipeline_detail_rows(pipeline: dict[str, Any]) -> list[list[Any]]:
    """``[what, value]`` rows with the milliseconds and throughputs behind the pipeline's ratios."""
    rows = []
    views = pipeline["views"]
    for label, entry in pipeline["costs"].items():
        scales = f"1/{entry['train_decode_scale']} for training, 1/{entry['eval_decode_scale']} for eval"
        rows += [
            [
                f"{label}: decode in full / at the scale the transforms allow ({scales}), ms",
                f"{entry['decode_full_ms']:.3g} / {entry['decode_train_ms']:.3g} / {entry['decode_eval_ms']:.3g}",
            ],
            [
                f"{label}: {views} training views, ms: before / CPU views / device views (CPU side)",
                f"{entry['train_legacy_ms']:.3g} / {entry['train_cpu_views_ms']:.3g} / "
                f"{entry['train_device_views_cpu_ms']:.3g}",
            ],
            [
                f"{label}: per training view, ms: before / CPU views / device views (CPU side)",
                f"{entry['train_legacy_ms_per_view']:.3g} / {entry['train_cpu_views_ms_per_view']:.3g} / "
                f"{entry['train_device_views_cpu_ms_per_view']:.3g}",
            ],
            [
                f"{label}: device's own work per training view (render + normalise), ms",
                f"{entry['train_device_ops_ms_per_view']:.3g}",
            ],
            [
                f"{label}: eval image, ms: before / ours",
                f"{entry['eval_legacy_ms']:.3g} / {entry['eval_ours_ms']:.3g}",
            ],
        ]
    throughput = pipeline["throughput"]
    for run in throughput["runs"].values():
        where = "device" if run["views_on_device"] else "CPU"
        what = f"extraction, {run['workers']} workers, views on the {where}: images/s (views/s); CPU s main / workers"
        cpu = f"{run['main_cpu_s']:.2f} / {run['workers_cpu_s']:.2f}"
        value = f"{run['images_per_s']:.1f} ({run['views_per_s']:.0f}); {cpu}"
        rows.append([what, value])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report: command, machine, the ratio table, the measurements and the notes."""
    machine = report["machine"]
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    title = "Speed and memory" if report["results"] else "Input pipeline of feature extraction"
    lines = [
        f"# {title} ({report['settings']['device']})",
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
    if ratios:
        lines += ["## Ratios", "", markdown_table(["arch", "ratio", "value", "target"], ratios), ""]
        lines += [
            "## Measurements (seconds unless stated)",
            "",
            markdown_table(["arch", "what", "value"], details),
            "",
        ]
    if "pipeline" in report:
        pipeline = report["pipeline"]
        lines += ["## Input pipeline", "", markdown_table(["ratio", "value", "target"], pipeline_ratio_rows(pipeline))]
        lines += ["", markdown_table(["what", "value"], pipeline_detail_rows(pipeline)), ""]
    lines += ["## Notes", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines)
