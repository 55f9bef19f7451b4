"""Packaging for peft-clip-adapter.

Tested at both ends of the supported range (`.ci/run`): the newest releases, and the floors below, pinned in
`.ci/oldest.txt` (peft 0.21.0, transformers 5.13.0, accelerate 1.15.0, datasets 4.0.0), both with torch 2.13.
Earlier peft releases cannot carry this method: 0.17 does not import with transformers 5, and 0.18-0.20 save
only methods of peft's own closed `PeftType`; `.ci/oldest.txt` says why transformers and
Accelerate start where they do.
"""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).parent / "README.md"

EXAMPLES = ["tensorboard>=2.14", "matplotlib>=3.7", "tqdm>=4.66"]
DOCS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]
TEST = ["pytest>=8", "ruff>=0.6", *EXAMPLES, *DOCS]

setup(
    name="peft-clip-adapter",
    version="0.1.0",
    description="CLIP-Adapter (Gao et al.) as a PEFT method for Hugging Face transformers CLIP models",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["peft_clip_adapter", "peft_clip_adapter.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.2",  # transformers 5's floor
        "transformers>=5.13,<6",
        "peft>=0.21,<1",
        "accelerate>=1.15,<2",
        "datasets>=4.0,<6",
        "safetensors>=0.8",  # transformers 5.13's floor
        "huggingface_hub>=1.5,<3",
        "pillow>=10.0.1",
    ],
    extras_require={"examples": EXAMPLES, "docs": DOCS, "test": TEST},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
