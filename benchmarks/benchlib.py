"""Helpers shared by the benchmark scripts: models at real size, timing, peak memory, result files.

Nothing here is specific to one benchmark: ``speed.py`` and ``reproduce.py`` import it as a sibling
module (``python benchmarks/speed.py`` puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

#: Vision-tower sizes of the OpenAI CLIP ViT-B checkpoints. ``CLIPConfig()``'s defaults ARE ViT-B/32
#: (text 512 x 12 layers, vision 768 x 12 layers, quick_gelu, projection 512); B/16 only changes the patch.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit-b-32": {"patch_size": 32, "image_size": 224},
    "vit-b-16": {"patch_size": 16, "image_size": 224},
}

#: Text length of the reference code's prompts: ``clip.tokenize`` pads every prompt to 77 tokens.
REFERENCE_CONTEXT_LENGTH = 77


def parse_architectures(text: str) -> list[str]:
    """Split ``"vit-b-32,vit-b-16"`` into known architecture names.

    Raises:
        ValueError: for an empty list or an unknown name (the message lists the known ones).

    Example:
        >>> parse_architectures("vit-b-32, vit-b-16")
        ['vit-b-32', 'vit-b-16']
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if not names or unknown:
        raise ValueError(f"--arch must list architectures from {sorted(ARCHITECTURES)}, got {text!r}.")
    return names


def build_clip(arch: str, *, seed: int = 0):
    """A randomly initialised ``CLIPModel`` of real size (speed does not depend on the weights).

    Args:
        arch: A key of ``ARCHITECTURES``, or a saved checkpoint folder (the tiny CLIP of ``--tiny``).
        seed: Seed of the initialisation.

    Returns:
        The model in eval mode, on the CPU, float32.

    Raises:
        ValueError: for an unknown ``arch`` that is not a folder either.
    """
    from transformers import CLIPConfig, CLIPModel

    if os.path.isdir(arch):
        return CLIPModel.from_pretrained(arch).eval()
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)} or a folder.")
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(vision_config=ARCHITECTURES[arch], projection_dim=512)).eval()


def reference_prompt_ids(text_config, num_classes: int, *, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like the reference code's class prompts: ``[C, 77]``, start, words, end, padding.

    The words are random ids: the text tower's cost depends on the length, not on which tokens.

    Example:
        >>> from transformers import CLIPTextConfig
        >>> ids = reference_prompt_ids(CLIPTextConfig(), 3)
        >>> ids.shape, int(ids[0, 0]), int(ids[0, 9])
        (torch.Size([3, 77]), 49406, 49407)
    """
    generator = torch.Generator().manual_seed(seed)
    special = {text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id}
    words = torch.tensor([index for index in range(text_config.vocab_size) if index not in special])
    length = min(REFERENCE_CONTEXT_LENGTH, text_config.max_position_embeddings)
    ids = torch.full((num_classes, length), text_config.pad_token_id, dtype=torch.long)  # [C, L]
    # "a photo of a <name>." is about 8 words: start token, 8 words, end token, then padding.
    ids[:, 1:9] = words[torch.randint(0, len(words), (num_classes, 8), generator=generator)]
    ids[:, 0], ids[:, 9] = text_config.bos_token_id, text_config.eos_token_id
    return ids


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Wall-clock seconds of one call of ``fn``, GPU work included.

    Example:
        >>> seconds(lambda: sum(range(10))) >= 0.0
        True
    """
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    calls: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Median time of each call, measured in turns (A, B, A, B, ...) after ``warmup`` untimed rounds.

    Taking turns spreads slow drifts of a shared machine (other jobs, clock changes) over every call
    alike, so their ratio stays meaningful even when the absolute times move.

    Returns:
        ``{name: {"median_s": ..., "times_s": [...]}}``.

    Raises:
        ValueError: if ``repeats < 1`` or ``warmup < 0``.

    Example:
        >>> result = interleaved_medians({"a": lambda: None, "b": lambda: None}, warmup=1, repeats=3)
        >>> sorted(result), len(result["a"]["times_s"])
        (['a', 'b'], 3)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats):
        # Alternate the order as well, so that no call always runs right after the same neighbour.
        order = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        for name in order:
            times[name].append(seconds(calls[name], device))
    return {name: {"median_s": statistics.median(values), "times_s": values} for name, values in times.items()}


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` rounded to 4 digits (``inf`` for a zero denominator).

    Example:
        >>> ratio(3.0, 2.0)
        1.5
    """
    return round(numerator / denominator, 4) if denominator > 0 else float("inf")


def machine_description(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, load, GPU and library versions: what a reader needs to compare numbers.

    Example:
        >>> sorted(machine_description("cpu"))[:3]
        ['accelerate', 'cpu', 'cpu_cores']
    """
    import accelerate
    import peft
    import transformers

    description = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_5m_15m": [round(value, 2) for value in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    if device.startswith("cuda"):
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or "unknown"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with up to 4 significant digits.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 0.123456]]))
        | a | b |
        |---|---|
        | 1 | 0.1235 |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_results(data: dict[str, Any], markdown: str, output_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``output_dir`` (created if needed).

    Returns:
        The two paths written.

    Example:
        >>> import tempfile
        >>> paths = write_results({"x": 1}, "| x |", tempfile.mkdtemp(), "demo")
        >>> [path.name for path in paths]
        ['demo.json', 'demo.md']
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    markdown_path.write_text(markdown.rstrip() + "\n")
    return [json_path, markdown_path]


#: How peak memory is measured, by device kind (recorded beside every number).
MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensor memory on the GPU)",
    "cpu": (
        "peak resident set size (VmHWM of /proc/self/status, reset by writing 5 to /proc/self/clear_refs) of a "
        "fresh process per workload, run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the "
        "OS and the resident size follows live memory"
    ),
}

#: Environment of a memory probe process on the CPU (see ``MEMORY_METHODS``).
PROBE_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window (GPU allocator stats, or the process's peak resident size)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def memory_bytes(device: str) -> tuple[int, int]:
    """``(current, peak)`` bytes since the last ``reset_peak_memory``, measured as in ``MEMORY_METHODS``.

    Raises:
        ValueError: on a CPU without ``/proc/self/status`` (CPU memory is only measured on Linux).

    Example:
        >>> current, peak = memory_bytes("cpu")
        >>> 0 < current <= peak
        True
    """
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if not status.exists():
        raise ValueError("CPU memory is measured from /proc/self/status (Linux); run with --skip_memory here.")
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kib = {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] * 1024, kib["VmHWM"] * 1024


class GpuUtilisation:
    """The GPU's utilisation while a block runs, sampled in a thread: NVML (``torch.cuda.utilization``) or
    ``nvidia-smi`` every ``interval`` seconds. On a CPU ``mean`` stays ``None``.

    Example:
        >>> with GpuUtilisation("cpu") as gpu:
        ...     pass
        >>> gpu.mean is None, gpu.samples
        (True, [])
    """

    def __init__(self, device: str, interval: float = 0.25) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = None
        self._thread = None

    def _read(self) -> float | None:
        if self.source in (None, "nvml"):
            try:
                value = float(torch.cuda.utilization(self.device))
                self.source = "nvml"
                return value
            except Exception:  # no pynvml / NVML: fall back to nvidia-smi
                self.source = "nvidia-smi"
        import subprocess

        index = torch.device(self.device).index or 0
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)]
        try:
            return float(subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            self.source = "unavailable"
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self) -> GpuUtilisation:
        if self.device.startswith("cuda"):
            import threading

            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        """Mean utilisation in percent over the samples, or ``None`` without samples."""
        return statistics.fmean(self.samples) if self.samples else None
