"""A tiny CLIP and a small labelled image folder, built locally with no download.

They make the package demonstrable and testable on a machine with no access to the Hugging Face Hub:
the few-shot trainer's default run, the tests and the documentation snippets use them through the same
``from_pretrained`` / ``load_dataset`` code paths as a real checkpoint and a real dataset. The tiny
model is randomly initialised, so its zero-shot accuracy is near chance; it only shows the mechanics.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

#: Class names of the generated dataset: each class is a shape drawn in its own colour.
SHAPE_CLASSES: tuple[str, ...] = ("red circle", "green square", "blue triangle", "yellow cross")
_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")


def build_tiny_clip(
    save_directory: str | os.PathLike,
    *,
    words: Sequence[str] = (),
    projection_dim: int = 32,
    hidden_size: int = 32,
    image_size: int = 32,
    seed: int = 0,
) -> str:
    """Save a randomly initialised tiny ``CLIPModel`` and its ``CLIPProcessor`` to ``save_directory``.

    The folder then loads like a Hub checkpoint: ``CLIPModel.from_pretrained(path)`` and
    ``AutoProcessor.from_pretrained(path)``. The tokenizer is a word-level vocabulary over ``words``,
    the dataset class names and the words of the shipped prompt templates; other words map to
    ``<|unk|>``.

    Args:
        save_directory: Folder to write (created if needed).
        words: Extra words the tokenizer should know.
        projection_dim: Width ``d`` of the pooled embeddings (what the adapter sees).
        hidden_size: Width of both towers.
        image_size: Input resolution of the vision tower.
        seed: Seed of the random initialisation, so the same arguments give the same weights.

    Returns:
        ``str(save_directory)``, for ``from_pretrained``.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> path = build_tiny_clip(tempfile.mkdtemp())
        >>> CLIPModel.from_pretrained(path).config.projection_dim
        32
    """
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    try:  # the PIL backend by name: asking for CLIPImageProcessor without torchvision logs a fallback warning
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers before the image-processor backends
        from transformers import CLIPImageProcessor

    from peft_clip_adapter.templates import DATASET_TEMPLATES, ENSEMBLE_TEMPLATES

    vocabulary = set(words)
    for text in (*SHAPE_CLASSES, *DATASET_TEMPLATES.values(), *ENSEMBLE_TEMPLATES):
        vocabulary.update(_split_words(text.replace("{}", " ")))
    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS)}
    for word in sorted(vocabulary):
        vocab.setdefault(word, len(vocab))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]

    backend = Tokenizer(WordLevel(vocab, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|endoftext|>",
        model_max_length=32,
    )
    image_processor = CLIPImageProcessor(
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
            "vocab_size": len(vocab),
            "max_position_embeddings": 32,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={**tower, "num_hidden_layers": 2, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(save_directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(save_directory)
    return str(save_directory)


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
    """Write an image folder (``root/<class name>/<n>.png``) of coloured shapes on noisy backgrounds.

    Each class is one shape in one colour (``"red circle"``, ...), drawn at a random position and size
    over a random background, so that the classes are easy to tell apart from pixels but no two images
    are alike. The folder loads with ``datasets.load_dataset("imagefolder", data_dir=root)``, which
    turns the folder names into a ``ClassLabel``.

    Args:
        root: Folder to write.
        images_per_class: Images written per class.
        classes: Class names of the form ``"<colour> <shape>"`` with colours red, green, blue, yellow
            and shapes circle, square, triangle, cross.
        image_size: Side of the square images, in pixels.
        seed: Seed for positions, sizes and backgrounds.

    Returns:
        ``str(root)``.

    Raises:
        ValueError: for a class name that is not ``"<colour> <shape>"`` with a known colour and shape.

    Example:
        >>> import tempfile
        >>> from datasets import load_dataset
        >>> root = write_shapes_dataset(tempfile.mkdtemp(), images_per_class=2)
        >>> dataset = load_dataset("imagefolder", data_dir=root, split="train")
        >>> dataset.features["label"].names
        ['blue triangle', 'green square', 'red circle', 'yellow cross']
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
