"""Tiny dual encoders and a small labelled image folder, built locally with no download.

The trainer's offline run, the tests and the docs' snippets load them through the same ``from_pretrained`` /
``load_dataset`` paths as a real checkpoint and dataset. Randomly initialised, their zero-shot accuracy is
near chance: they show the mechanics only.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

#: Class names of the generated dataset: each class is a shape drawn in its own colour.
SHAPE_CLASSES: tuple[str, ...] = ("red circle", "green square", "blue triangle", "yellow cross")
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}

#: The families ``build_tiny_model`` builds: CLIP (``CLIPModel``), SigLIP (``SiglipModel``, the class of
#: SigLIP and of SigLIP 2's fixed-resolution checkpoints), SigLIP 2 NaFlex (``Siglip2Model``) and the
#: audio-text CLAP (``ClapModel``).
TINY_FAMILIES: tuple[str, ...] = ("clip", "siglip", "siglip2", "clap")

_CLIP_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")
_SIGLIP_TOKENS = ("<pad>", "</s>", "<unk>")
_ROBERTA_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # CLAP's text tower is a RoBERTa: ids 0-3 as there
#: CLAP's feature extractor: 1 s of 8 kHz audio gives 63 frames of 16 mel bins, which the tiny audio
#: tower (spectrogram size 32, so at most 64 frames) takes whole.
CLAP_SAMPLING_RATE = 8000
#: ``ClapFeatureExtractor`` arguments of the tiny CLAP.
TINY_CLAP_FEATURES: dict[str, Any] = {
    "feature_size": 16,
    "sampling_rate": CLAP_SAMPLING_RATE,
    "hop_length": 128,
    "max_length_s": 1,
    "fft_window_size": 256,
    "frequency_max": CLAP_SAMPLING_RATE // 2,
    "truncation": "rand_trunc",
}
#: ``ClapAudioConfig`` of the tiny CLAP (without ``projection_dim``): a two-stage HTS-AT over 16 mel bins.
TINY_CLAP_AUDIO: dict[str, Any] = {
    "num_mel_bins": 16,
    "spec_size": 32,
    "patch_size": 4,
    "patch_stride": [4, 4],
    "depths": [1, 1],
    "num_attention_heads": [2, 2],
    "patch_embeds_hidden_size": 8,
    "hidden_size": 16,  # 8 channels, doubled by the one patch merging
    "window_size": 4,
    "num_hidden_layers": 2,
}
#: SigLIP's text length: its checkpoints were trained on prompts padded to 64 tokens.
_SIGLIP_TEXT_LENGTH = 64
#: SigLIP 2's processor cuts images into at most 256 patches of 16 x 16 pixels (its defaults).
_SIGLIP2_PATCH, _SIGLIP2_PATCHES = 16, 256


def build_tiny_model(
    save_directory: str | os.PathLike,
    *,
    family: str = "clip",
    words: Sequence[str] = (),
    projection_dim: int = 32,
    hidden_size: int = 32,
    image_size: int = 32,
    seed: int = 0,
) -> str:
    """Save a randomly initialised tiny dual encoder and its processor; returns ``str(save_directory)``.

    ``family`` is ``"clip"``, ``"siglip"``, ``"siglip2"`` (NaFlex) or ``"clap"`` (audio and text); another raises
    ``ValueError``. The tokenizer is word-level over ``words``, the shapes' class names and the shipped templates'
    words (others map to the unknown token). SigLIP pads with ``</s>`` to 64 tokens as the released checkpoints;
    SigLIP 2's processor makes NaFlex inputs (``pixel_values`` ``[N, 256, 768]``); CLAP's turns up to one second
    of ``CLAP_SAMPLING_RATE`` audio into ``input_features``. ``projection_dim`` is the pooled width the adapter
    sees (SigLIP: the vision width, which its pooling head keeps); the same ``seed`` gives the same weights.
    """
    import torch

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {list(TINY_FAMILIES)}, got {family!r}.")
    vocabulary = _vocabulary(words)
    build = {"clip": _tiny_clip, "siglip": _tiny_siglip, "siglip2": _tiny_siglip2, "clap": _tiny_clap}[family]
    torch.manual_seed(seed)
    model, processor = build(vocabulary, projection_dim=projection_dim, hidden_size=hidden_size, image_size=image_size)
    with _quiet_transformers():
        model.save_pretrained(save_directory)
        processor.save_pretrained(save_directory)
    return str(save_directory)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide what transformers prints while saving a generated model, none of which a user can act on.

    Saving builds a default config to compare against, and transformers' default ``SiglipTextConfig`` warns
    that its own default token ids lie outside its own default vocabulary; each save also draws a progress bar.
    """
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def build_tiny_clip(
    save_directory: str | os.PathLike,
    *,
    words: Sequence[str] = (),
    projection_dim: int = 32,
    hidden_size: int = 32,
    image_size: int = 32,
    seed: int = 0,
) -> str:
    """``build_tiny_model(save_directory, family="clip", ...)``: a tiny ``CLIPModel`` and ``CLIPProcessor``."""
    return build_tiny_model(
        save_directory,
        family="clip",
        words=words,
        projection_dim=projection_dim,
        hidden_size=hidden_size,
        image_size=image_size,
        seed=seed,
    )


def _vocabulary(words: Sequence[str]) -> list[str]:
    """``words``, the dataset's class names and every word of the shipped prompt templates, sorted."""
    from peft_clip_adapter.fewshot.templates import DATASET_TEMPLATES, ENSEMBLE_TEMPLATES

    vocabulary = set(words)
    for text in (*SHAPE_CLASSES, *DATASET_TEMPLATES.values(), *ENSEMBLE_TEMPLATES):
        vocabulary.update(_split_words(text.replace("{}", " ")))
    return sorted(vocabulary)


def _word_tokenizer(vocabulary: list[str], special: Sequence[str], template: str, **tokens: Any):
    """A word-level fast tokenizer: lower-cased, split on whitespace and punctuation, ``template`` around it."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(special)}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token=tokens["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    marks = [token for token in special if token in template]
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in marks]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


def _image_processor_class(name: str) -> Any:
    """The PIL backend of an image processor by name: asking for the default class without torchvision
    logs a fallback warning. Older transformers have only the default class."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _tiny_clip(vocabulary: list[str], *, projection_dim: int, hidden_size: int, image_size: int) -> tuple[Any, Any]:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    bos, eos, unk = _CLIP_TOKENS
    tokenizer = _word_tokenizer(
        vocabulary, _CLIP_TOKENS, f"{bos} $A {eos}", bos_token=bos, eos_token=eos, unk_token=unk, pad_token=eos,
        model_max_length=32,
    )  # fmt: skip
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # Each tower config carries projection_dim too (as released CLIP checkpoints do), so that
    # CLIPVisionModelWithProjection / CLIPTextModelWithProjection load this folder with width d.
    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "num_hidden_layers": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.eos_token_id,
        },
        vision_config={**tower, "num_hidden_layers": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _siglip_towers(tokenizer: Any, *, projection_dim: int, hidden_size: int) -> tuple[dict, dict]:
    """The tower configs shared by SigLIP and SigLIP 2: the text head maps onto the image width."""
    text = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": _SIGLIP_TEXT_LENGTH,
        "projection_size": projection_dim,  # the text head maps onto the image embedding's width
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    vision = {
        "hidden_size": projection_dim,
        "intermediate_size": 2 * projection_dim,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    }
    return text, vision


def _tiny_siglip(vocabulary: list[str], *, projection_dim: int, hidden_size: int, image_size: int) -> tuple[Any, Any]:
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    _, eos, unk = _SIGLIP_TOKENS
    # Like SigLIP's own tokenizer: each prompt ends with </s>, which also pads it to the trained length.
    tokenizer = _word_tokenizer(
        vocabulary, _SIGLIP_TOKENS, f"$A {eos}", eos_token=eos, unk_token=unk, pad_token=eos,
        model_max_length=_SIGLIP_TEXT_LENGTH,
    )  # fmt: skip
    text, vision = _siglip_towers(tokenizer, projection_dim=projection_dim, hidden_size=hidden_size)
    config = SiglipConfig(text_config=text, vision_config={**vision, "image_size": image_size, "patch_size": 8})
    image_processor = _image_processor_class("SiglipImageProcessor")(size={"height": image_size, "width": image_size})
    return SiglipModel(config), SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _tiny_siglip2(vocabulary: list[str], *, projection_dim: int, hidden_size: int, image_size: int) -> tuple[Any, Any]:
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor, Siglip2Tokenizer

    # SigLIP 2's processor always loads its own (Gemma-style BPE) tokenizer class; a character-level
    # vocabulary without merges is the smallest one that round-trips through it.
    characters = sorted({char for word in vocabulary for char in word} | set(".,'-&()/"))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for token in ["\u2581", *characters]:  # "\u2581" stands for a space, as in SentencePiece
        vocab.setdefault(token, len(vocab))
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=_SIGLIP_TEXT_LENGTH)
    text, vision = _siglip_towers(tokenizer, projection_dim=projection_dim, hidden_size=hidden_size)
    config = Siglip2Config(
        text_config=text, vision_config={**vision, "patch_size": _SIGLIP2_PATCH, "num_patches": _SIGLIP2_PATCHES}
    )
    image_processor = _image_processor_class("Siglip2ImageProcessor")(
        patch_size=_SIGLIP2_PATCH, max_num_patches=_SIGLIP2_PATCHES
    )
    return Siglip2Model(config), Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def _tiny_clap(vocabulary: list[str], *, projection_dim: int, hidden_size: int, image_size: int) -> tuple[Any, Any]:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    bos, pad, eos, unk = _ROBERTA_TOKENS
    tokenizer = _word_tokenizer(
        vocabulary, _ROBERTA_TOKENS, f"{bos} $A {eos}", bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        model_max_length=32,
    )  # fmt: skip
    text = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 40,  # RoBERTa positions start after the padding id
        "projection_dim": projection_dim,
    }
    audio = {**TINY_CLAP_AUDIO, "projection_dim": projection_dim}
    config = ClapConfig(text_config=text, audio_config=audio, projection_dim=projection_dim)
    return ClapModel(config), ClapProcessor(
        feature_extractor=ClapFeatureExtractor(**TINY_CLAP_FEATURES), tokenizer=tokenizer
    )


def _split_words(text: str) -> list[str]:
    cleaned = "".join(char if char.isalnum() else " " for char in text.lower())
    return cleaned.split()


def write_shapes_dataset(
    root: str | os.PathLike,
    *,
    images_per_class: int = 24,
    classes: Sequence[str] = SHAPE_CLASSES,
    image_size: int = 48,
    seed: int = 0,
) -> str:
    """Write an image folder ``root/<class name>/<n>.png`` of coloured shapes; returns ``str(root)``.

    Each class (``"<colour> <shape>"``: red, green, blue, yellow; circle, square, triangle, cross) is one shape in
    one colour at a random position and size over a noisy background: easy to tell apart, no two images alike.
    Raises ``ValueError`` for another class name.
    """
    rng = random.Random(seed)
    for name in classes:
        colour, _, shape = name.partition(" ")
        if colour not in _COLOURS or shape not in {"circle", "square", "triangle", "cross"}:
            raise ValueError(
                f"Class {name!r} must be '<colour> <shape>' with colour in {sorted(_COLOURS)} and shape in "
                "['circle', 'cross', 'square', 'triangle']."
            )
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            image = _draw_shape(rng, _COLOURS[colour], shape, image_size)
            image.save(folder / f"{index:03d}.png")
    return str(root)


def _draw_shape(rng: random.Random, colour: tuple[int, int, int], shape: str, size: int) -> Image.Image:
    background = tuple(rng.randint(60, 160) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(size // 4):  # speckle noise so that no two backgrounds are alike
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    extent = rng.randint(size // 3, size * 2 // 3)
    left, top = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(left, top + extent), (left + extent // 2, top), (left + extent, top + extent)], fill=colour)
    else:
        bar = max(extent // 4, 2)
        middle = extent // 2 - bar // 2
        draw.rectangle((left, top + middle, left + extent, top + middle + bar), fill=colour)
        draw.rectangle((left + middle, top, left + middle + bar, top + extent), fill=colour)
    return image
