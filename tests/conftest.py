"""Shared fixtures: a tiny CLIP checkpoint, a small image folder and the pretrained micro-CLIP, built locally.

``HF_HUB_OFFLINE=1`` is set before anything imports ``huggingface_hub``, so an accidental download
fails at once instead of hanging.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_clip_adapter  # noqa: E402, F401  (registers the method)
from peft_clip_adapter.testing.tiny_models import build_tiny_clip, write_shapes_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> str:
    """A saved tiny CLIPModel + CLIPProcessor (projection width 32), loadable with from_pretrained."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def tiny_clip(tiny_clip_path):
    """A fresh tiny CLIPModel for each test, in eval mode."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_path).eval()


@pytest.fixture(scope="session")
def tiny_processor(tiny_clip_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_clip_path)


@pytest.fixture(scope="session")
def siglip2_path(tmp_path_factory) -> str:
    """A saved tiny SigLIP 2 NaFlex ``Siglip2Model`` + ``Siglip2Processor`` (patches of 16 px, at most 256)."""
    from peft_clip_adapter.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-siglip2"), family="siglip2")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """An image folder with the four shape classes, 12 images each."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), images_per_class=12)


@pytest.fixture(scope="session")
def offline_cache_dir(tmp_path_factory):
    """A --cache_dir holding the trainer's offline default: the pretrained micro-CLIP (about a minute, once
    per session) and the generated task's images."""
    from peft_clip_adapter.testing.offline_default import build_offline_default

    cache_dir = tmp_path_factory.mktemp("offline-cache")
    build_offline_default(cache_dir, "dusk-pairs")
    return cache_dir


@pytest.fixture(scope="session")
def micro_clip_path(offline_cache_dir) -> str:
    """The pretrained micro-CLIP of the offline default (see ``offline_cache_dir``)."""
    return str(next((offline_cache_dir / "offline-default").glob("micro-clip-*")))


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def hostile_pickle(tmp_path):
    """``write(path)`` saves a torch pickle whose unpickling creates a marker file, and returns that marker's
    path: a loader that never unpickles it leaves the marker absent."""

    def write(path: Path, key: str = "weights") -> Path:
        marker = tmp_path / f"code-ran-{Path(path).name}"
        torch.save({key: _RunsCodeWhenUnpickled(marker)}, path)
        return marker

    return write
