"""Few-shot image classification with CLIP-Adapter, on Accelerate.

Trains a CLIP-Adapter (Gao et al., https://arxiv.org/abs/2110.04544) on k labelled images per class and
reports zero-shot accuracy before and adapter accuracy after, on held-out images. The frozen CLIP
backbone runs once per training image and augmented view (and once per eval image); the features are
cached on disk and the adapter trains on them, so the paper's 200 epochs cost seconds.

One CPU, with no arguments (no network): a micro-CLIP pretrained on generated captioned scenes (built
once, about a minute on 2 cores, then cached) and a generated few-shot task, trained with the paper's
recipe; it prints zero-shot and adapter accuracy on held-out images::

    python examples/fewshot.py

One process (CPU or one GPU) on a real model and your own image folders::

    accelerate launch examples/fewshot.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --train_dir data/eurosat/train --validation_dir data/eurosat/val --templates eurosat \\
        --shots 16 --output_dir runs/eurosat-16shot

Two CPU processes (gloo). ``accelerate launch --cpu --num_processes 2`` silently runs ONE process; this
runs two::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/fewshot.py --cpu --per_device_train_batch_size 16

N GPUs on one machine (the default global batch of 32 is split across them)::

    accelerate launch --multi_gpu --num_processes N examples/fewshot.py --model_name_or_path ... ...

Several machines (run on each, with its own --machine_rank; M machines x G GPUs each)::

    accelerate launch --multi_gpu --num_machines M --num_processes $((M * G)) --machine_rank R \\
        --main_process_ip <ip of rank 0> --main_process_port 29500 examples/fewshot.py ...

Recipe (the paper's, from CoOp's config): SGD (lr 2e-3, momentum 0.9, weight decay 5e-4), global
batch 32, 200 epochs, cosine schedule after 1 warm-up epoch at a constant 1e-5, ratio 0.2,
reduction 4. Epoch ``e`` trains on augmented view ``e % views`` of every image (``--views`` crops +
flips per image, fixed by ``--seed``), so with ``--views 200`` every epoch sees a fresh crop, as in the
reference code. ``--end_to_end`` trains through the full PEFT model instead (the backbone re-runs on
every step) on the same views, and gives the same adapter to float tolerance. Evaluation always runs on
the cached eval features: the eval transform is deterministic, so that equals running the full model.

Feature extraction: DataLoader workers (``--dataloader_num_workers``; by default, feeding a GPU, one per
available core up to 8) decode each image once and make its views; on a GPU the views are made on the
device. On a GPU,
``--torch_dtype bfloat16`` loads the backbone in bf16 and ``accelerate launch --mixed_precision bf16``
autocasts it; the cached features stay float32 either way.

Batches: the sampler is seeded (``--seed``) and the last incomplete batch is dropped (as in CoOp)
whenever the training set holds at least one global batch, so 2 processes x 8 images and 1 process x 16
images see the same global batches and train the same adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

#: The paper's recipe (CoOp's RN50 config), used for real models.
PAPER_DEFAULTS = {"shots": 16, "ratio": 0.2, "learning_rate": 2e-3, "views": 10, "min_crop_scale": 0.08}
#: The offline default's settings: the paper's recipe (ratio, learning rate, 200 epochs, its schedule) on the
#: micro-CLIP. Only the augmentation differs: in 32 px scenes a random crop cuts off the shape or changes
#: its size, which the classes and prompts describe, so the views are whole images, randomly flipped.
OFFLINE_DEFAULTS = {"shots": 16, "ratio": 0.2, "learning_rate": 2e-3, "views": 10, "min_crop_scale": 1.0}
#: The offline default's generated tasks: the keys of peft_clip_adapter.testing.scene_tasks.SCENE_TASKS (named here,
#: so that --help needs no import of the package; a test keeps them equal).
OFFLINE_TASKS = ("dusk-pairs", "held-out-pairs")
#: The offline default's model folder (bump it when the pretraining changes) and its images per class.
MICRO_CLIP_FOLDER = "micro-clip-v1"
OFFLINE_IMAGES_PER_CLASS = {"train": 32, "validation": 50}
#: Global batch (per device x processes x accumulation) used when --per_device_train_batch_size is unset.
GLOBAL_BATCH_SIZE = 32

#: After this many epochs (or all, if fewer), a training loss that has moved by less than STALL_TOLERANCE
#: (relative) is reported: the classes' prototypes are likely (nearly) identical.
STALL_CHECK_EPOCHS = 5
STALL_TOLERANCE = 1e-4
RESULTS_FILE = "all_results.json"
PLOT_FILE = "training_curves.png"
TRAINER_STATE_FILE = "trainer_state.json"
TRACKING_PROJECT = "fewshot"
#: The flags that define what a run trains; a checkpoint resumes only under the same values.
RUN_SETTINGS = (
    "model_name_or_path", "dataset_name", "dataset_config_name", "train_dir", "validation_dir", "image_column_name",
    "label_column_name", "train_val_split", "shots", "ratio", "reduction", "adapt", "templates", "views",
    "min_crop_scale", "end_to_end", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "momentum", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "warmup_learning_rate",
    "seed", "torch_dtype",
)  # fmt: skip


# -----------------------------------------------------------------------------
# Arguments (parsed before the heavy imports below, so that --help and bad flags answer at once)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; flag names follow transformers' image-classification example."""
    args = build_parser().parse_args(argv)
    _resolve_defaults(args)
    _check_args(args)
    return args


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its default shown in --help, and the launch recipes after them."""
    parser = _Parser(description=__doc__.split("\n")[0], epilog=_launch_recipes(), formatter_class=_HelpFormatter)
    data = parser.add_argument_group("model and data (none of them: the offline default)")
    data.add_argument(
        "--model_name_or_path",
        default=None,
        help="A CLIP, SigLIP or SigLIP 2 checkpoint (Hub id or folder). Default: the offline micro-CLIP.",
    )
    data.add_argument(
        "--torch_dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="Dtype to load the frozen backbone in; the adapter trains in float32. Default: the checkpoint's.",
    )
    data.add_argument(
        "--dataset_name", default=None, help="A Hub dataset id, or a local dataset folder. Default: use --train_dir."
    )
    data.add_argument(
        "--dataset_config_name", default=None, help="The dataset's configuration name. Default: its default one."
    )
    data.add_argument(
        "--train_dir", default=None, help="An image folder with one sub-folder per class. Default: use --dataset_name."
    )
    data.add_argument(
        "--validation_dir",
        default=None,
        help="Held-out image folder, same classes. Default: the dataset's validation split, or --train_val_split.",
    )
    data.add_argument("--image_column_name", default="image", help="The column holding the images.")
    data.add_argument("--label_column_name", default="label", help="The column holding the class labels.")
    data.add_argument(
        "--train_val_split", type=float, default=0.2, help="Held-out fraction when the data has no validation split."
    )
    data.add_argument(
        "--cache_dir",
        default=default_cache_dir(),
        help="The offline default's model and images, and the feature cache (under HF_HOME, like the HF caches).",
    )
    data.add_argument(
        "--feature_cache_dir", default=None, help="The frozen-feature cache. Default: <cache_dir>/features."
    )
    data.add_argument(
        "--offline_task",
        choices=OFFLINE_TASKS,
        default="dusk-pairs",
        help="The offline default's generated few-shot task (peft_clip_adapter.testing.scene_tasks).",
    )

    method = parser.add_argument_group("CLIP-Adapter")
    method.add_argument(
        "--shots", type=int, default=None, help=f"Training images per class. {_recipe_default('shots')}"
    )
    method.add_argument(
        "--ratio",
        default=None,
        help="Residual blend alpha in [0, 1], or 'auto': chosen by k-fold cross-validation on the shots. "
        f"{_recipe_default('ratio')}",
    )
    method.add_argument("--reduction", type=int, default=4, help="Bottleneck factor: hidden width d // reduction.")
    method.add_argument("--adapt", choices=["vision", "text", "both"], default="vision", help="Branch(es) to adapt.")
    method.add_argument(
        "--templates",
        nargs="+",
        default=None,
        help="A template set (default, ensemble, " + ", ".join(_template_set_names()) + ") or prompt "
        "strings with {} for the class name. Default: the dataset's own set if its name is known, else default.",
    )
    method.add_argument(
        "--views",
        type=int,
        default=None,
        help=f"Cached augmented views per training image. {_recipe_default('views')}",
    )
    method.add_argument(
        "--min_crop_scale",
        type=float,
        default=None,
        help=f"Smallest random-resized-crop area share. {_recipe_default('min_crop_scale')}",
    )
    method.add_argument("--end_to_end", action="store_true", help="Train through the full model, no feature cache.")
    method.add_argument(
        "--ratio_grid",
        type=float,
        nargs="+",
        default=[0.2, 0.4, 0.6, 0.8],
        help="Candidates of --ratio auto (default: 0.2 0.4 0.6 0.8).",
    )
    method.add_argument(
        "--learning_rate_grid",
        type=float,
        nargs="+",
        default=[5e-4, 2e-3, 8e-3],
        help="Candidates of --learning_rate auto (default: 5e-4 2e-3 8e-3).",
    )
    method.add_argument(
        "--search_folds",
        type=int,
        default=4,
        help="Folds of the --ratio / --learning_rate auto search (at most shots).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--num_train_epochs", type=int, default=200, help="Passes over the training images.")
    train.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=None,
        help=f"Default: a global batch of {GLOBAL_BATCH_SIZE}, split over processes and accumulation steps.",
    )
    train.add_argument(
        "--per_device_eval_batch_size",
        type=int,
        default=256,
        help="Images per evaluation batch, and per backbone pass when extracting features.",
    )
    train.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Processes decoding images for feature extraction; 0 decodes in the main process. "
        "Default: feeding a GPU, one per available core (shared among local processes), up to 8; with the backbone "
        "on the CPU, one per 8 cores; fewer for a few dozen images.",
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    train.add_argument(
        "--learning_rate",
        default=None,
        help=f"Peak SGD learning rate, or 'auto' (see --ratio). {_recipe_default('learning_rate')}",
    )
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum.")
    train.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay.")
    train.add_argument(
        "--lr_scheduler_type",
        choices=["cosine", "linear", "constant"],
        default="cosine",
        help="Schedule after warm-up.",
    )
    train.add_argument("--num_warmup_steps", type=int, default=None, help="Default: one epoch.")
    train.add_argument("--warmup_learning_rate", type=float, default=1e-5, help="Constant lr during warm-up.")
    train.add_argument("--eval_every_epochs", type=int, default=None, help="Default: about 20 evaluations a run.")
    train.add_argument("--seed", type=int, default=0, help="Seeds the shots, the crops, the shuffles and the adapter.")
    train.add_argument("--cpu", action="store_true", help="Run on CPU even where a GPU is available.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="fewshot-output", help="Where the adapter and results go.")
    output.add_argument("--overwrite_output_dir", action="store_true", help="Replace a previous run's output.")
    output.add_argument(
        "--checkpointing_steps", default=None, help="Save state every N optimizer steps, or 'epoch'. Default: never."
    )
    output.add_argument(
        "--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'. Default: start afresh."
    )
    output.add_argument(
        "--trust_checkpoint_settings",
        action="store_true",
        default=False,
        help="Resume a checkpoint that records no training settings (an older version's), trusting that it was "
        "made with these same flags.",
    )
    output.add_argument("--with_tracking", action="store_true", help="Log metrics to --report_to.")
    output.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, ... or all.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the adapter and its model card.")
    output.add_argument("--hub_model_id", default=None, help="Repository id. Default: output_dir's name.")
    output.add_argument("--hub_token", default=None, help="Hub token. Default: the stored login (hf auth login).")
    output.add_argument(
        "--license",
        default=None,
        help="Licence of the model card (e.g. mit, apache-2.0). Default: the base model's, when its card is known.",
    )
    output.add_argument("--debug", action="store_true", help="Show the Python traceback of an error.")
    return parser


class _Parser(argparse.ArgumentParser):
    """``argparse`` with its usage errors in the script's one-line ``error:`` form, and --help printed once."""

    def error(self, message: str) -> None:
        report_error(f"{message} (see --help)")
        sys.exit(2)

    def print_help(self, file: Any = None) -> None:
        if _is_first_process():  # `accelerate launch ... --help` runs every process
            super().print_help(file)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default: argparse's own ``(default: ...)``, or the help's words when it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if not shown and "default:" not in text.lower():
            text += " (default: %(default)s)"
        return text


def _recipe_default(name: str) -> str:
    return f"Default: {PAPER_DEFAULTS[name]} (the paper's); {OFFLINE_DEFAULTS[name]} for the offline default."


def _launch_recipes() -> str:
    """The module docstring's launch commands, for the end of --help."""
    recipes = __doc__.split("\n\n", 2)[2].split("\nRecipe (")[0]
    return "how to launch:\n\n" + recipes.replace("::\n", ":\n")


def _template_set_names() -> list[str]:
    """The shipped template sets, read from the package's templates.py without importing the package.

    ``import peft_clip_adapter`` imports torch, transformers and peft (seconds); --help must not wait for them.
    """
    package = importlib.util.find_spec("peft_clip_adapter")  # finds the package without importing it
    path = os.path.join(package.submodule_search_locations[0], "fewshot", "templates.py")
    spec = importlib.util.spec_from_file_location("_peft_clip_adapter_templates", path)
    templates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(templates)
    return sorted(templates.DATASET_TEMPLATES)


def default_cache_dir() -> str:
    """``$HF_HOME/peft-clip-adapter``; HF_HOME defaults to ``$XDG_CACHE_HOME/huggingface``, as in huggingface_hub."""
    xdg_cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    hf_home = os.environ.get("HF_HOME", os.path.join(xdg_cache, "huggingface"))
    return os.path.join(os.path.expandvars(os.path.expanduser(hf_home)), "peft-clip-adapter")


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the recipe: the offline default's settings with no model and no data, the paper's otherwise."""
    data_flags = (args.dataset_name, args.train_dir, args.validation_dir)
    args.offline_default = args.model_name_or_path is None and not any(data_flags)
    if args.model_name_or_path is None and any(data_flags):
        raise ValueError(
            "Pass --model_name_or_path with your own data (e.g. openai/clip-vit-base-patch16): the offline "
            "micro-CLIP only knows the words of its generated scenes."
        )
    if args.model_name_or_path is not None and not any(data_flags):
        raise ValueError(f"--model_name_or_path {args.model_name_or_path} needs data: --dataset_name or --train_dir.")
    defaults = OFFLINE_DEFAULTS if args.offline_default else PAPER_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ratio = _number_or_auto("ratio", args.ratio)
    args.learning_rate = _number_or_auto("learning_rate", args.learning_rate)
    args.feature_cache_dir = args.feature_cache_dir or os.path.join(args.cache_dir, "features")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit():
            raise ValueError(
                f"--checkpointing_steps {args.checkpointing_steps!r} must be a whole number of steps or 'epoch'."
            )
        args.checkpointing_steps = int(args.checkpointing_steps)


def _number_or_auto(flag: str, value: Any) -> Any:
    """A flag that takes a number or 'auto' (chosen by the hyperparameter search)."""
    if isinstance(value, float) or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"--{flag} must be a number or 'auto' (chosen by cross-validation on the shots), got {value!r}."
        ) from None


def _check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before anything is loaded, naming the flag and the accepted range."""
    at_least_one = {
        "shots": args.shots,
        "views": args.views,
        "reduction": args.reduction,
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "per_device_eval_batch_size": args.per_device_eval_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "eval_every_epochs": args.eval_every_epochs,
        "checkpointing_steps": None if args.checkpointing_steps == "epoch" else args.checkpointing_steps,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")
    if args.ratio != "auto" and not 0.0 <= args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in [0, 1] (the residual blend; the paper uses 0.2), got {args.ratio}.")
    if any(not 0.0 <= ratio <= 1.0 for ratio in args.ratio_grid):
        raise ValueError(f"--ratio_grid values must be in [0, 1], got {args.ratio_grid}.")
    if any(not learning_rate > 0 for learning_rate in args.learning_rate_grid):
        raise ValueError(f"--learning_rate_grid values must be > 0, got {args.learning_rate_grid}.")
    if args.search_folds < 2:
        raise ValueError(
            f"--search_folds must be at least 2 (one fold held out, the rest train), got {args.search_folds}."
        )
    if (args.learning_rate != "auto" and not args.learning_rate > 0) or not args.warmup_learning_rate >= 0:
        raise ValueError(
            f"--learning_rate must be > 0 and --warmup_learning_rate >= 0, got {args.learning_rate} and "
            f"{args.warmup_learning_rate}."
        )
    if not 0.0 < args.train_val_split < 1.0:
        raise ValueError(f"--train_val_split must be in (0, 1), got {args.train_val_split}.")
    if args.num_warmup_steps is not None and args.num_warmup_steps < 0:
        raise ValueError(f"--num_warmup_steps must be >= 0, got {args.num_warmup_steps}.")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        raise ValueError(
            f"--dataloader_num_workers must be >= 0 (0 decodes images in the main process), got "
            f"{args.dataloader_num_workers}."
        )


# -----------------------------------------------------------------------------
# Errors: a user error is one `error:` line and exit code 2; a bug keeps its traceback


class LaunchError(RuntimeError):
    """The processes were launched in a way that cannot work (a user error, reported like a bad flag)."""


#: What a user can cause and fix: bad values (ValueError), missing files, models or network (OSError,
#: including the Hub's HTTP errors), a wrong launch command. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, LaunchError)


def report_error(message: str) -> None:
    """Print ``error: <message>`` on one line, once per run: only the first process of a launch prints it."""
    if _is_first_process():  # every process raises the same error; one line is enough
        print("error: " + " ".join(str(message).split()), file=sys.stderr)


def _is_first_process() -> bool:
    """Whether this is the launch's process 0 (``RANK``, set by ``accelerate launch``), before Accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(function: Callable[[Sequence[str]], Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Call ``function(argv)``: a user error becomes one ``error:`` line and exit code 2 (a traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return function(argv)
    except USER_ERRORS as error:
        if "--debug" in argv:
            raise
        report_error(str(error))
        sys.exit(2)


if __name__ == "__main__":
    run_cli(parse_args)  # --help and bad flags answer here, before the imports below (seconds)

# The heavy imports, only now: see above.
import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402

import peft_clip_adapter  # noqa: E402
from peft_clip_adapter.adapter_checks import from_pretrained_safetensors  # noqa: E402
from peft_clip_adapter.families import describe_towers, towers_by_branch  # noqa: E402
from peft_clip_adapter.fewshot.classifier import (  # noqa: E402
    NEAR_DUPLICATE_COSINE,
    CLIPAdapterClassifier,
    check_class_prototypes,
    encode_class_prompts,
)
from peft_clip_adapter.fewshot.data import (  # noqa: E402
    build_eval_transform,
    build_train_transform,
    check_columns,
    class_names,
    load_image,
    load_image_classification_data,
    sample_few_shot,
)
from peft_clip_adapter.fewshot.embeddings import frozen, unwrap_model  # noqa: E402
from peft_clip_adapter.fewshot.features import FeatureCache, FeatureSet, dataset_labels  # noqa: E402
from peft_clip_adapter.fewshot.inputs.transforms import move_model_inputs, stack_model_inputs  # noqa: E402
from peft_clip_adapter.fewshot.logs import on_terminal, progress, quiet_peft_wrapping  # noqa: E402
from peft_clip_adapter.fewshot.recipe import TrainingRecipe, scheduled_learning_rate  # noqa: E402
from peft_clip_adapter.fewshot.search import SearchResult, search_hyperparameters, set_ratio  # noqa: E402
from peft_clip_adapter.fewshot.templates import DATASET_TEMPLATES, templates_for  # noqa: E402
from peft_clip_adapter.manifest import apply_default_permissions  # noqa: E402
from peft_clip_adapter.model_card import CLASS_PROMPTS_FILE, CardFacts  # noqa: E402
from peft_clip_adapter.testing.microclip import PretrainingConfig, build_micro_clip  # noqa: E402
from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS, write_task_dataset  # noqa: E402

logger = get_logger(__name__)
#: The offline default's micro-CLIP: the pretraining settings it is built with.
MICRO_CLIP_CONFIG = PretrainingConfig()


# -----------------------------------------------------------------------------
# Output folder, offline default, model and data


def prepare_output_dir(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse an output_dir holding another run's files unless --overwrite_output_dir (or resuming).

    With --overwrite_output_dir the previous run's checkpoints and tracking logs are removed, so that
    neither ``--resume_from_checkpoint latest`` nor the logs can mix two runs; other files are overwritten.
    """
    output_dir = Path(args.output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output_dir {output_dir} is a file; pass a folder.")
    entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        # Resuming is only worth suggesting when there is a checkpoint to resume from.
        resume = ", --resume_from_checkpoint latest to continue that run" if _checkpoints(output_dir) else ""
        raise ValueError(
            f"--output_dir {output_dir} already holds another run's files ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}). Pass --overwrite_output_dir to replace them{resume}, "
            "or choose another --output_dir."
        )
    accelerator.wait_for_everyone()  # every process has checked before anything is removed
    if accelerator.is_main_process:
        if entries and args.overwrite_output_dir and not args.resume_from_checkpoint:
            staged = [*output_dir.glob(".*.saving"), *output_dir.glob(".*.replaced")]  # left by a killed save
            for path in [*_checkpoints(output_dir), *staged, output_dir / TRACKING_PROJECT]:
                shutil.rmtree(path, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def check_hub_access(args: argparse.Namespace) -> str:
    """For --push_to_hub: reach the Hub, check the login and create the repository, before any data is loaded.

    Returns the repository id (``user/name``). Also fetches the base model's card, so the adapter's card can
    inherit its licence.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"--hub_model_id {repo_id!r} is not a Hub repository id such as 'me/my-adapter': {error}"
        ) from error
    upload_later = (
        "or drop --push_to_hub and upload the output folder later: "
        "FewShotClassifier.from_pretrained(<output_dir>).push_to_hub(<repo id>)"
    )
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, {upload_later}."
        )
    api = HfApi(token=args.hub_token)
    try:
        user = api.whoami()["name"]
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    except LocalTokenNotFoundError as error:
        raise ValueError(
            "--push_to_hub needs a Hugging Face login: run `hf auth login` or pass --hub_token (a token with "
            "write access)."
        ) from error
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise ValueError(
                "--push_to_hub: the Hub refused the token (401 Unauthorized); log in again with `hf auth login` or "
                "pass a valid --hub_token."
            ) from error
        raise ValueError(
            f"--push_to_hub: cannot create or reach the repository {repo_id!r} (HTTP {status}). Check --hub_model_id "
            f"and that your token may write there, {upload_later}."
        ) from error
    except Exception as error:  # no network, DNS, proxy, TLS: whatever the HTTP client raises
        raise ValueError(
            f"--push_to_hub: cannot reach the Hugging Face Hub ({type(error).__name__}: {error}); check the network, "
            f"{upload_later}."
        ) from error
    logger.info("Will push to %s as %s", repo_id, user)
    if args.license is None and not os.path.exists(args.model_name_or_path or ""):
        try:  # the base model's card, for its licence (see peft_clip_adapter.model_card.base_model_license)
            hf_hub_download(args.model_name_or_path, "README.md", token=args.hub_token)
        except Exception:  # best effort: the card then has no licence, and says so
            logger.warning(
                "The base model's card is unavailable, so the adapter's card has no licence; pass --license."
            )
    return repo_id


def prepare_offline_default(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Build the micro-CLIP and the task's image folders once (in cache_dir) and point the args at them."""
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            if not offline_default_folders(args.cache_dir, args.offline_task)[0].is_dir():
                logger.info("Pretraining the offline micro-CLIP once (about a minute on 2 CPU cores).")
            folders = build_offline_default(args.cache_dir, args.offline_task)
        else:
            folders = offline_default_folders(args.cache_dir, args.offline_task)
    args.model_name_or_path, args.train_dir, args.validation_dir = (str(folder) for folder in folders)
    task = SCENE_TASKS[args.offline_task]
    logger.warning(
        "Offline default: a micro-CLIP pretrained on generated captioned scenes (%s) and the generated task %r: %s "
        "(%d classes). The paper's recipe: %s, %d epochs (no crops: the views of the 32 px scenes are flips).",
        folders[0],
        task.name,
        task.description,
        len(task.classes),
        ", ".join(f"{name}={getattr(args, name)}" for name in OFFLINE_DEFAULTS),
        args.num_train_epochs,
    )


def offline_default_folders(cache_dir: str, task_name: str) -> tuple[Path, Path, Path]:
    """Where the offline default's model, training images and held-out images live under ``cache_dir``."""
    root = Path(cache_dir) / "offline-default"
    return root / MICRO_CLIP_FOLDER, root / f"{task_name}-train", root / f"{task_name}-validation"


def build_offline_default(cache_dir: str, task_name: str) -> tuple[Path, Path, Path]:
    """Build whatever of the offline default is missing: the pretrained micro-CLIP and the task's images.

    Each folder is built aside and renamed into place (``_build_once``), so a killed build is never mistaken
    for a whole one, and concurrent runs may build the same folder.
    """
    model_dir, train_dir, validation_dir = offline_default_folders(cache_dir, task_name)
    _build_once(model_dir, lambda path: build_micro_clip(path, MICRO_CLIP_CONFIG))
    task = SCENE_TASKS[task_name]
    for folder, split, seed in ((train_dir, "train", 0), (validation_dir, "validation", 1)):
        images = OFFLINE_IMAGES_PER_CLASS[split]
        _build_once(folder, functools.partial(write_task_dataset, task=task, images_per_class=images, seed=seed))
    return model_dir, train_dir, validation_dir


def _build_once(target: Path, build) -> None:
    """Build ``target`` aside and rename it into place; another run building it at the same time may win."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        apply_default_permissions(staging)  # mkdtemp makes it private; the cache is shared like any other folder
        try:
            os.replace(staging, target)
        except OSError:
            # Renaming onto a folder fails when it is not empty: a concurrent run finished the same build first.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The frozen dual encoder with an adapter on --adapt, and its processor (tokenizer + image processor)."""
    # A pickle is refused, never unpickled.
    model = from_pretrained_safetensors(AutoModel, args.model_name_or_path, dtype=args.torch_dtype)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    towers = towers_by_branch(model)
    missing = [branch for branch in ("vision", "text") if branch not in towers]
    if missing:
        raise ValueError(
            f"{type(model).__name__} from {args.model_name_or_path} has no {' / '.join(missing)} tower with a pooled "
            f"embedding (it has {describe_towers(model)}): the trainer classifies images by class-name prompts, so it "
            "needs an image and a text tower. Use a CLIP or SigLIP checkpoint such as openai/clip-vit-base-patch16."
        )
    # With --ratio auto the search sets the ratio later (set_ratio); the initial weights do not depend on it.
    ratio = PAPER_DEFAULTS["ratio"] if args.ratio == "auto" else args.ratio
    config = peft_clip_adapter.CLIPAdapterConfig(ratio=ratio, reduction=args.reduction, adapt=args.adapt)
    # Seed right here: the adapter's initial weights then depend on --seed alone, not on what ran before
    # (building the offline model on a first run reseeds torch, for one).
    set_seed(args.seed)
    with quiet_peft_wrapping():
        return get_peft_model(model, config), processor


def load_data(args: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """The k-shot training sample, the full held-out split and the class names, checked."""
    splits = load_image_classification_data(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        image_column=args.image_column_name,
        label_column=args.label_column_name,
        validation_fraction=args.train_val_split,
        seed=args.seed,
    )
    for split in ("train", "validation"):
        check_columns(splits[split], args.image_column_name, args.label_column_name)
    names = class_names(splits["train"], args.label_column_name)
    if not isinstance(splits["train"].features[args.label_column_name], datasets.ClassLabel):
        # Class ids alone make prompts like "a photo of a 0.": training still works, zero-shot cannot.
        logger.warning(
            "Label column %r holds integer ids without class names, so the prompts name the classes %s. The "
            "zero-shot accuracy means little; give the names with dataset.cast_column(%r, ClassLabel(names=...)).",
            args.label_column_name,
            names[:5],
            args.label_column_name,
        )
    if len(names) < 2:
        raise ValueError(
            f"The training data has {len(names)} class ({names}) in column {args.label_column_name!r}; "
            "classification needs at least 2 classes."
        )
    train = sample_few_shot(splits["train"], args.shots, label_column=args.label_column_name, seed=args.seed)
    return train, splits["validation"], names


def resolve_templates(args: argparse.Namespace) -> list[str]:
    """The prompt templates: a named set, explicit strings, or the dataset's own set when its name is known."""
    values = args.templates
    if not values:
        hint = "".join(char for char in (args.dataset_name or args.train_dir or "").lower() if char.isalnum())
        known = [name for name in DATASET_TEMPLATES if name.replace("_", "") in hint]
        values = [max(known, key=len)] if known else ["default"]
    if len(values) == 1 and "{}" not in values[0]:
        return templates_for(values[0])
    bad = [value for value in values if "{}" not in value]
    if bad:
        raise ValueError(
            f"--templates {bad} have no '{{}}' placeholder: pass one template-set name or prompt strings like "
            "'a photo of a {}.'."
        )
    return list(values)


def check_images(dataset: datasets.Dataset, image_column: str) -> None:
    """Decode every image once, so an unreadable file fails (by name) before training starts."""
    raw = dataset.select_columns([image_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    for value in raw[image_column]:
        load_image(value)


# -----------------------------------------------------------------------------
# Training and evaluation


class EndToEndHead(nn.Module):
    """Logits from pixels through the full PEFT model: ``exp(logit_scale) * normalize(f') @ text_weights + bias``.

    ``f'`` comes out of the model's own adapted module (CLIP's ``visual_projection``, SigLIP's pooling
    head, ...), so every step re-runs the frozen backbone on the transform's inputs (``pixel_values``;
    SigLIP 2 NaFlex adds ``pixel_attention_mask`` and ``spatial_shapes``). The PEFT model is deliberately
    kept out of this module's children: the only trainable parameters are the adapters, which
    ``classifier`` already registers, so DDP synchronises exactly those and checkpoints hold only the
    classifier (under a ``classifier.`` prefix, so a checkpoint resumes in the mode that wrote it).
    """

    def __init__(self, peft_model: nn.Module, classifier: CLIPAdapterClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self._peft_model = (peft_model,)  # a tuple: not registered as a submodule (see above)

    def forward(self, pixel_values: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        backbone = self._peft_model[0]
        # Floating-point inputs in the backbone's dtype (a bf16 backbone too); masks and shapes stay integers.
        inputs = move_model_inputs({"pixel_values": pixel_values, **inputs}, pixel_values.device, backbone.dtype)
        output = backbone.get_image_features(**inputs)
        features = output if isinstance(output, torch.Tensor) else output.pooler_output  # [B, D], adapted
        return self.classifier.logits_of_adapted(features)  # [B, C]


def learning_rate_at(step: int, args: argparse.Namespace, warmup_steps: int, total_steps: int) -> float:
    """CoOp's schedule, per optimizer step (``recipe.scheduled_learning_rate``, which the search follows too).

    A constant warm-up lr, then the schedule over the whole run; a pure function of the step, so resuming
    needs no scheduler state.
    """
    return scheduled_learning_rate(
        step,
        peak=args.learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        schedule=args.lr_scheduler_type,
        warmup_learning_rate=args.warmup_learning_rate,
    )


@torch.no_grad()
def evaluate(
    classifier: CLIPAdapterClassifier, eval_set: FeatureSet, loader: DataLoader, accelerator: Accelerator
) -> dict[str, Any]:
    """Top-1 and per-class accuracy (and each image's predicted class) over the cached eval features.

    Rows are split across processes; ``gather_for_metrics`` drops the samples Accelerate repeats to even
    out the last batch, so every eval image counts exactly once.
    """
    features = eval_set.features[0].to(accelerator.device)  # [N, D]
    labels = eval_set.labels.to(accelerator.device)  # [N]
    predictions, targets = [], []
    for (rows,) in loader:
        logits = classifier(features[rows])  # [B, C]
        batch_predictions, batch_labels = accelerator.gather_for_metrics((logits.argmax(dim=-1), labels[rows]))
        predictions.append(batch_predictions)
        targets.append(batch_labels)
    predictions, targets = torch.cat(predictions).cpu(), torch.cat(targets).cpu()  # [N], [N]
    correct = predictions == targets
    per_class = []
    for label in range(classifier.num_classes):
        members = targets == label
        # Integer counts, so that 11 of 50 is reported as 0.22 and not as float32's 0.2199999988.
        per_class.append(correct[members].sum().item() / members.sum().item() if members.any() else None)
    accuracy = correct.sum().item() / len(targets)
    return {"accuracy": accuracy, "per_class": per_class, "count": len(targets), "predictions": predictions.tolist()}


def make_batch_inputs(
    args: argparse.Namespace,
    train_set: Optional[FeatureSet],
    train_dataset: datasets.Dataset,
    transform,
) -> Callable[[torch.Tensor, int], dict[str, torch.Tensor]]:
    """What the head takes for a batch of training rows in augmented view ``view``, by keyword.

    Cached raw pooled embeddings ``[B, D]``, or with --end_to_end the freshly transformed images
    (``pixel_values`` ``[B, 3, H, W]``, or SigLIP 2 NaFlex's three inputs): the same view of the same rows,
    so both modes train the same adapter.
    """
    if not args.end_to_end:
        return lambda rows, view: {"image_features": train_set.features[view, rows.cpu()]}  # [B, D]
    images = train_dataset.select_columns([args.image_column_name])
    if isinstance(images.features[args.image_column_name], datasets.Image):
        # Undecoded, so that the transform reads each file itself, decoding as the feature cache does.
        images = images.cast_column(args.image_column_name, datasets.Image(decode=False))

    def pixels(rows: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        indices = rows.tolist()
        pictures = images[indices][args.image_column_name]
        crops = [transform(image, index=row, view=view) for row, image in zip(indices, pictures, strict=True)]
        return stack_model_inputs(crops)  # pixel_values [B, 3, H, W] (NaFlex: [B, patches, 3*p*p], ...)

    return pixels


def choose_hyperparameters(
    args: argparse.Namespace,
    accelerator: Accelerator,
    peft_model: nn.Module,
    classifier: CLIPAdapterClassifier,
    train_set: FeatureSet,
    train_eval_set: FeatureSet,
    global_batch: int,
) -> SearchResult:
    """--ratio / --learning_rate auto: k-fold cross-validation on the training shots, then set the winners.

    ``peft_clip_adapter.fewshot.search`` trains every candidate x fold with this script's recipe, all at once. It
    runs on the main process and its choice is broadcast, so every process trains with the same values.
    """
    recipe = TrainingRecipe(
        num_train_epochs=args.num_train_epochs,
        batch_size=global_batch,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        num_warmup_steps=args.num_warmup_steps,
        warmup_learning_rate=args.warmup_learning_rate,
        seed=args.seed,
    )
    found: list[Optional[SearchResult]] = [None]
    if accelerator.is_main_process:
        with _one_thread_on_cpu(accelerator):
            found = [
                search_hyperparameters(
                    classifier,
                    train_set,
                    train_eval_set.features[0],
                    ratios=args.ratio_grid if args.ratio == "auto" else [args.ratio],
                    learning_rates=args.learning_rate_grid if args.learning_rate == "auto" else [args.learning_rate],
                    recipe=recipe,
                    num_folds=args.search_folds,
                    fallback=(PAPER_DEFAULTS["ratio"], PAPER_DEFAULTS["learning_rate"]),
                )
            ]
    result = broadcast_object_list(found)[0]
    (logger.info if result.candidates else logger.warning)("Hyperparameter search: %s", result.summary())
    set_ratio(peft_model, result.ratio)
    args.ratio, args.learning_rate = result.ratio, result.learning_rate
    return result


@contextlib.contextmanager
def _one_thread_on_cpu(accelerator: Accelerator) -> Iterator[None]:
    """One intra-op thread on CPU, as ``train`` uses for the tiny adapters (see there)."""
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    *,
    batch_inputs: Callable[[torch.Tensor, int], dict[str, torch.Tensor]],
    train_labels: torch.Tensor,
    evaluate_now: Callable[[], float],
    schedule: dict[str, int],
) -> dict[str, Any]:
    """The epoch loop, from scratch or from --resume_from_checkpoint; returns the loss and accuracy history.

    Epoch ``e`` trains on view ``e % views``. The loop's state (optimizer steps done, history, the running
    loss of the current epoch) goes into every checkpoint, so a resumed run continues mid-epoch
    (``skip_first_batches``) and reports the same history as an uninterrupted one.
    """
    state = {"completed_steps": 0, "train_loss_per_epoch": [], "eval_accuracy_per_epoch": {}}
    state.update(epoch_loss_sum=0.0, epoch_steps=0, settings={name: getattr(args, name) for name in RUN_SETTINGS})
    if args.resume_from_checkpoint:
        state = load_checkpoint(args, accelerator, expected_settings=state["settings"])
    steps_per_epoch, accumulation = schedule["steps_per_epoch"], args.gradient_accumulation_steps
    start_epoch, skip_steps = divmod(state["completed_steps"], steps_per_epoch)
    eval_every = args.eval_every_epochs or max(1, args.num_train_epochs // 20)
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu" and not args.end_to_end:
        # The adapter's matrices are tiny: on CPU, intra-op threads only add synchronisation (measured
        # 50x slower with 2 threads on a busy 2-core machine), so train on cached features with one.
        torch.set_num_threads(1)
    bar = progress(
        total=schedule["total_steps"],
        initial=state["completed_steps"],
        desc="Training",
        enabled=accelerator.is_local_main_process,
        unit="steps",
    )
    for epoch in range(start_epoch, args.num_train_epochs):
        head.train()
        view = epoch % args.views
        train_loader.set_epoch(epoch)  # the seeded shuffle of this epoch, on every process
        batches = train_loader
        if epoch == start_epoch and skip_steps:
            batches = accelerator.skip_first_batches(train_loader, skip_steps * accumulation)
        loss_sum = torch.tensor(state["epoch_loss_sum"], device=accelerator.device)
        for (rows,) in batches:
            with accelerator.accumulate(head):
                inputs = {name: value.to(accelerator.device) for name, value in batch_inputs(rows, view).items()}
                logits = head(**inputs)  # [B, C]
                loss = F.cross_entropy(logits, train_labels[rows.cpu()].to(accelerator.device))
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(
                        state["completed_steps"], args, schedule["warmup_steps"], schedule["total_steps"]
                    )
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.detach() / accumulation
            if not accelerator.sync_gradients:
                continue
            state["completed_steps"] += 1
            state["epoch_steps"] += 1
            bar.update(1)
            # refresh=False: the bar redraws at its own pace, not once per step.
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", refresh=False)
            if isinstance(args.checkpointing_steps, int) and state["completed_steps"] % args.checkpointing_steps == 0:
                state["epoch_loss_sum"] = accelerator.reduce(loss_sum, "mean").item()
                save_checkpoint(accelerator, Path(args.output_dir) / f"step_{state['completed_steps']}", state)

        epoch_loss = accelerator.reduce(loss_sum, "mean").item() / max(state["epoch_steps"], 1)
        state["train_loss_per_epoch"].append(epoch_loss)
        if len(state["train_loss_per_epoch"]) == min(STALL_CHECK_EPOCHS, args.num_train_epochs) > 1:
            _warn_if_loss_stalled(state["train_loss_per_epoch"], num_classes=int(train_labels.max()) + 1)
        state["epoch_loss_sum"], state["epoch_steps"] = 0.0, 0
        metrics = {"train_loss": epoch_loss, "learning_rate": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == args.num_train_epochs:
            metrics["eval_accuracy"] = state["eval_accuracy_per_epoch"][str(epoch + 1)] = evaluate_now()
            logger.info("epoch %d: loss %.4f, eval accuracy %.4f", epoch + 1, epoch_loss, metrics["eval_accuracy"])
        if args.with_tracking:
            accelerator.log(metrics, step=epoch + 1)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, Path(args.output_dir) / f"epoch_{epoch + 1}", state)
    bar.close()
    torch.set_num_threads(threads)
    return state


def _warn_if_loss_stalled(losses: list[float], num_classes: int) -> None:
    """Training that has not moved the loss at all is stuck (e.g. classes with one prototype): say so early."""
    if max(losses) - min(losses) > STALL_TOLERANCE * max(1.0, abs(losses[0])):
        return
    logger.warning(
        "The training loss has not moved in the first %d epochs (%.6f; ln(%d classes) = %.4f is a classifier that "
        "cannot tell the classes apart). Check the warnings about near-identical class prompts above, the "
        "learning rate (--learning_rate) and --ratio (0 disables the adapter).",
        len(losses),
        losses[-1],
        num_classes,
        math.log(num_classes),
    )


def _checkpoints(output_dir: Path) -> list[Path]:
    """Every saved checkpoint (a folder with a trainer state), oldest first; unreadable ones by age last.

    Checkpoints are written into a hidden staging folder and renamed into place whole (see
    ``save_checkpoint``), so a folder here is complete unless damaged later.
    """
    found = [
        path.parent for path in output_dir.glob(f"*/{TRAINER_STATE_FILE}") if not path.parent.name.startswith(".")
    ]
    return sorted(found, key=lambda folder: (_completed_steps(folder), (folder / TRAINER_STATE_FILE).stat().st_mtime))


def _completed_steps(folder: Path) -> float:
    try:
        return _read_trainer_state(folder)["completed_steps"]
    except ValueError:
        return math.inf  # damaged: sorted last, so that `latest` reports it rather than silently skipping it


def _read_trainer_state(folder: Path, hint: str = "") -> dict[str, Any]:
    """The loop's state saved with a checkpoint, checked, so a damaged file is named instead of a parser error."""
    path = folder / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error}): the checkpoint is damaged.{hint}") from error
    required = {
        "completed_steps": int,
        "train_loss_per_epoch": list,
        "eval_accuracy_per_epoch": dict,
        "epoch_loss_sum": (int, float),
        "epoch_steps": int,
    }
    bad = [
        name for name, kind in required.items() if not isinstance(state, dict) or not isinstance(state.get(name), kind)
    ]
    if bad or state["completed_steps"] < 0 or not isinstance(state.get("settings", {}), dict):
        raise ValueError(f"{path} is damaged: {bad or ['completed_steps']} missing or of the wrong type.{hint}")
    return state


def save_checkpoint(accelerator: Accelerator, folder: Path, state: dict[str, Any]) -> None:
    """``accelerator.save_state`` plus the loop's own state (step and history), committed as one folder.

    Everything is written into a hidden staging folder first, then renamed into place, so a run killed while
    saving leaves the previous checkpoints and no partial one (``latest`` skips hidden folders).
    """
    staging = folder.with_name(f".{folder.name}.saving")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process's files are in
    if accelerator.is_main_process:
        (staging / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
        apply_default_permissions(staging)  # safetensors writes 0600: a shared run folder needs the usual modes
        replaced = folder.with_name(f".{folder.name}.replaced")
        if folder.exists():  # saved again after resuming from an earlier checkpoint
            os.replace(folder, replaced)
        os.replace(staging, folder)
        shutil.rmtree(replaced, ignore_errors=True)
    accelerator.wait_for_everyone()


def _check_checkpoint_files(folder: Path, accelerator: Accelerator, hint: str) -> None:
    """Refuse a damaged checkpoint before Accelerate reads it.

    Accelerate would fail on a raw parser error, unpickle a pickled model file, or, for the random states,
    silently resume without them. The model must be safetensors (never unpickled); the optimizer and random
    states, which Accelerate pickles itself, must load with weights-only unpickling, which refuses any
    object that could run code.
    """
    from accelerate.utils import load as weights_only_load
    from safetensors.torch import load_file

    from peft_clip_adapter.adapter_checks import refuse_pickles, verify_safetensors_file

    model = folder / "model.safetensors"
    if not model.is_file():  # Accelerate pickles the optimizer and random states itself: those are checked below
        ignore = ["optimizer*.bin", "scheduler*.bin", "sampler*.bin", "random_states_*.pkl"]
        refuse_pickles(folder, model.name, what="checkpoint's model weights", ignore=ignore, hint=hint.strip())
    needed = [model, folder / "optimizer.bin", folder / f"random_states_{accelerator.process_index}.pkl"]
    missing = [path.name for path in needed if not path.is_file()]
    if missing:
        raise ValueError(f"--resume_from_checkpoint {folder} lacks {missing}: the checkpoint is incomplete.{hint}")
    verify_safetensors_file(model, hint=hint.strip())
    tensors = load_file(model)
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{model} holds NaN or infinite values in {bad[:3]}: training had diverged.{hint}")
    for path in needed[1:]:
        try:
            weights_only_load(path, map_location="cpu")
        except Exception as error:  # zip, pickle and torch errors alike: all mean "do not resume from this"
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{path} cannot be loaded safely ({type(error).__name__}: {reason}): it is damaged, or holds objects "
                f"that weights-only loading refuses because loading them could run code.{hint}"
            ) from error


def load_checkpoint(
    args: argparse.Namespace, accelerator: Accelerator, expected_settings: dict[str, Any]
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states from --resume_from_checkpoint and return the loop's state.

    A checkpoint saved under other ``RUN_SETTINGS`` is refused: it would fail to load (another --adapt or
    --end_to_end) or silently continue another run (other shots, seed, schedule, ...). One that records no
    settings resumes only with --trust_checkpoint_settings. Every file is checked before Accelerate reads
    it; a damaged one is named, with the previous checkpoint to resume from instead.
    """
    found = _checkpoints(Path(args.output_dir))
    if args.resume_from_checkpoint == "latest":
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: {args.output_dir} holds no complete checkpoint.")
        folder = found[-1]
    else:
        folder = Path(args.resume_from_checkpoint)
        if not (folder / TRAINER_STATE_FILE).is_file():
            raise ValueError(f"--resume_from_checkpoint {folder} is not a complete checkpoint of this script.")
    steps = _completed_steps(folder)  # infinite when damaged: then every readable one is earlier
    earlier = [path for path in found if _completed_steps(path) < steps and path.resolve() != folder.resolve()]
    hint = (
        f" Resume from the previous checkpoint instead: --resume_from_checkpoint {earlier[-1]}"
        if earlier
        else " No earlier checkpoint is readable: start afresh with --overwrite_output_dir."
    )
    state = _read_trainer_state(folder, hint)
    _check_settings(args, folder, state.get("settings"), expected_settings)
    _check_checkpoint_files(folder, accelerator, hint)
    accelerator.load_state(str(folder))
    logger.info("Resumed from %s", folder)
    state["settings"] = expected_settings  # recorded from now on, also for a trusted checkpoint that had none
    return state


def _check_settings(
    args: argparse.Namespace, folder: Path, saved: Optional[dict[str, Any]], expected: dict[str, Any]
) -> None:
    unrecorded = [name for name in expected if name not in (saved or {})]
    if unrecorded and not args.trust_checkpoint_settings:
        what = "no training settings" if saved is None else f"no value for {', '.join('--' + n for n in unrecorded)}"
        raise ValueError(
            f"--resume_from_checkpoint {folder} records {what} (saved by an older version of this script), so "
            "nothing shows it was trained with these flags. Resume with exactly that run's flags and pass "
            "--trust_checkpoint_settings, or start afresh."
        )
    changed = [
        f"--{name} {saved[name]!r} -> {value!r}"
        for name, value in expected.items()
        if name in (saved or {}) and saved[name] != value
    ]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {folder} was saved by a run with other settings ({'; '.join(changed)}). "
            "Resume with that run's flags, or start afresh in another --output_dir (or with --overwrite_output_dir)."
        )


# -----------------------------------------------------------------------------
# Results


def save_plot(path: Path, results: dict[str, Any]) -> None:
    """Training loss per epoch and eval accuracy (with the zero-shot baseline), side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    losses = results["train_loss_per_epoch"]
    loss_axis.plot(range(1, len(losses) + 1), losses)
    loss_axis.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="Training loss")
    history = results["eval_accuracy_per_epoch"]
    accuracy_axis.plot([int(epoch) for epoch in history], list(history.values()), marker="o", label="CLIP-Adapter")
    accuracy_axis.axhline(results["zero_shot_accuracy"], color="gray", linestyle="--", label="zero-shot")
    accuracy_axis.set(xlabel="epoch", ylabel="top-1 accuracy", title="Held-out accuracy", ylim=(0, 1))
    accuracy_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


#: Up to this many classes the log lists each one; above, it summarises (the full table is in all_results.json).
PER_CLASS_LOG_LIMIT = 20


def log_per_class(names: list[str], zero_shot: list[Optional[float]], adapter: list[Optional[float]]) -> None:
    """Per-class accuracy in the log: every class for a few, a summary for many (weakest, strongest, changes)."""
    rows = list(zip(names, zero_shot, adapter, strict=True))
    if len(rows) <= PER_CLASS_LOG_LIMIT:
        for name, before, after in rows:
            logger.info("  %-30s zero-shot %s  adapter %s", name, _percent(before), _percent(after))
        return
    scored = sorted((row for row in rows if row[2] is not None), key=lambda row: row[2])
    better = sum(after > before for _, before, after in scored if before is not None)
    worse = sum(after < before for _, before, after in scored if before is not None)
    logger.info(
        "Per class (%d classes; every one in %s): %d better than zero-shot, %d worse, %d unchanged, %d not evaluated",
        len(rows),
        RESULTS_FILE,
        better,
        worse,
        len(scored) - better - worse,
        len(rows) - len(scored),
    )

    def listing(selected: list[tuple[str, Optional[float], float]]) -> str:
        return ", ".join(
            f"{name} {_percent(after).strip()} (zero-shot {_percent(before).strip()})"
            for name, before, after in selected
        )

    logger.info("  weakest:   %s", listing(scored[:5]))
    logger.info("  strongest: %s", listing(scored[::-1][:5]))


def _per_class(names: list[str], values: list[Optional[float]]) -> dict[str, Optional[float]]:
    return dict(zip(names, values, strict=True))


# -----------------------------------------------------------------------------
# Main


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the trainer with command-line arguments ``argv`` (default: ``sys.argv``); return the results.

    Raises:
        ValueError: for bad arguments or data, each before training starts.
        LaunchError: (a ``RuntimeError``) if ``WORLD_SIZE > 1`` but Accelerate sees a single process.
    """
    args = parse_args(argv)
    if not on_terminal():
        # Library bars (loading weights, reading image folders) redraw in place: noise in a log file.
        for library in (transformers.utils.logging, datasets.utils.logging):
            library.disable_progress_bar()
    accelerator = Accelerator(
        cpu=args.cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        # A sampler seeded per epoch gives the same global batches for any process count and after resuming.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise LaunchError(
            f"WORLD_SIZE={world_size} but Accelerate sees one process, so each launched process would train alone. "
            "On CPU launch with `accelerate launch --multi_gpu --num_processes N ... examples/fewshot.py --cpu` "
            "(`accelerate launch --cpu --num_processes N` runs a single process)."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.push_to_hub and accelerator.is_main_process:
        args.hub_repo_id = check_hub_access(args)  # seconds, not after training: login, network, repository
    prepare_output_dir(args, accelerator)
    if args.offline_default:
        prepare_offline_default(args, accelerator)

    # Model, data and class prototypes: everything that can be wrong is checked here, before training.
    templates = resolve_templates(args)
    with accelerator.main_process_first():
        peft_model, processor = load_model(args)
        train_dataset, eval_dataset, names = load_data(args)
    peft_model.to(accelerator.device).eval()  # the backbone stays frozen (and in eval mode) throughout
    logger.info(
        "%d classes, %d training images (%d shots), %d held-out images; templates %s",
        len(names),
        len(train_dataset),
        args.shots,
        len(eval_dataset),
        templates,
    )
    class_embeddings = encode_class_prompts(peft_model, processor, names, templates)  # [C, T, D]
    # Identical prototypes are a ValueError; nearly identical ones a warning.
    near_duplicates = check_class_prototypes(class_embeddings, names, near_duplicate_cosine=NEAR_DUPLICATE_COSINE)
    if near_duplicates:
        logger.warning(
            "Classes with nearly identical prompt embeddings (cosine > %.2f): %s. The classifier will hardly tell "
            "them apart; check the class names and --templates.",
            NEAR_DUPLICATE_COSINE,
            "; ".join(f"{a!r} / {b!r} ({cosine:.4f})" for a, b, cosine in near_duplicates),
        )
    classifier = CLIPAdapterClassifier.from_model(peft_model, class_embeddings)

    start = time.perf_counter()
    cache = FeatureCache(args.feature_cache_dir)
    columns = {"image_column": args.image_column_name, "label_column": args.label_column_name}
    extract = {
        **columns,
        "batch_size": args.per_device_eval_batch_size,
        "accelerator": accelerator,
        "show_progress": True,
        "num_workers": args.dataloader_num_workers,  # the mixed precision comes from the accelerator
    }
    train_transform = build_train_transform(
        processor.image_processor, seed=args.seed, scale=(args.min_crop_scale, 1.0)
    )
    eval_set = cache.load_or_extract(
        peft_model, eval_dataset, build_eval_transform(processor.image_processor), views=1, **extract
    )
    searching = "auto" in (args.ratio, args.learning_rate)
    if args.end_to_end:
        check_images(train_dataset, args.image_column_name)
    train_set = None
    if not args.end_to_end or searching:  # the search always trains on cached features
        train_set = cache.load_or_extract(peft_model, train_dataset, train_transform, views=args.views, **extract)
    if searching:  # held-out shots are scored on their eval-transform embeddings, as test images are
        eval_view = build_eval_transform(processor.image_processor)
        train_eval_set = cache.load_or_extract(peft_model, train_dataset, eval_view, views=1, **extract)
    feature_seconds = time.perf_counter() - start

    # Data loaders over row indices: the cached features (or images) are looked up per batch.
    num_processes = accelerator.num_processes
    per_device = args.per_device_train_batch_size or max(
        1, GLOBAL_BATCH_SIZE // (num_processes * args.gradient_accumulation_steps)
    )
    num_train = len(train_dataset)
    train_loader = DataLoader(
        TensorDataset(torch.arange(num_train)),
        batch_size=per_device,
        shuffle=True,
        drop_last=num_train >= per_device * num_processes,  # CoOp drops the last incomplete batch
    )
    eval_loader = DataLoader(
        TensorDataset(torch.arange(len(eval_dataset))), batch_size=args.per_device_eval_batch_size
    )
    search = None
    if searching:
        global_batch = per_device * num_processes * args.gradient_accumulation_steps
        search = choose_hyperparameters(
            args, accelerator, peft_model, classifier, train_set, train_eval_set, global_batch
        )

    trainable = [parameter for parameter in classifier.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(
        trainable, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
    )
    head = EndToEndHead(peft_model, classifier) if args.end_to_end else classifier
    head, optimizer, train_loader, eval_loader = accelerator.prepare(head, optimizer, train_loader, eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_train_epochs
    warmup_steps = steps_per_epoch if args.num_warmup_steps is None else args.num_warmup_steps
    logger.info(
        "Training %d epochs x %d steps, global batch %d (%d per device x %d processes x %d accumulation), %s",
        args.num_train_epochs,
        steps_per_epoch,
        per_device * num_processes * args.gradient_accumulation_steps,
        per_device,
        num_processes,
        args.gradient_accumulation_steps,
        "end to end through the model" if args.end_to_end else f"on {args.views} cached views per image",
    )

    zero_shot = _evaluate_zero_shot(peft_model, classifier, eval_set, eval_loader, accelerator)
    logger.info("Zero-shot accuracy: %.4f (%d images)", zero_shot["accuracy"], zero_shot["count"])
    if args.with_tracking:
        accelerator.init_trackers(TRACKING_PROJECT, config=_tracker_config(args))
        accelerator.log({"eval_accuracy": zero_shot["accuracy"]}, step=0)

    start = time.perf_counter()
    unwrapped = accelerator.unwrap_model(head)
    unwrapped_classifier = unwrapped.classifier if args.end_to_end else unwrapped
    schedule = {"warmup_steps": warmup_steps, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
    state = train(
        args,
        accelerator,
        head,
        optimizer,
        train_loader,
        batch_inputs=make_batch_inputs(args, train_set, train_dataset, train_transform),
        train_labels=dataset_labels(train_dataset, args.label_column_name),  # [N]
        evaluate_now=lambda: evaluate(unwrapped_classifier, eval_set, eval_loader, accelerator)["accuracy"],
        schedule=schedule,
    )
    train_seconds = time.perf_counter() - start

    final = evaluate(unwrapped_classifier, eval_set, eval_loader, accelerator)
    logger.info(
        "CLIP-Adapter accuracy: %.4f (zero-shot %.4f) on %d held-out images",
        final["accuracy"],
        zero_shot["accuracy"],
        final["count"],
    )
    log_per_class(names, zero_shot["per_class"], final["per_class"])

    dataset = args.dataset_name or (f"offline-{args.offline_task}" if args.offline_default else args.train_dir)
    results = {
        "zero_shot_accuracy": zero_shot["accuracy"],
        "eval_accuracy": final["accuracy"],
        "per_class_accuracy": _per_class(names, final["per_class"]),
        "zero_shot_per_class_accuracy": _per_class(names, zero_shot["per_class"]),
        "train_loss_per_epoch": state["train_loss_per_epoch"],
        "eval_accuracy_per_epoch": state["eval_accuracy_per_epoch"],
        "feature_extraction_seconds": feature_seconds,
        "train_seconds": train_seconds,
        "num_train_images": num_train,
        "num_eval_images": final["count"],
        "num_classes": len(names),
        "class_names": names,
        "shots": args.shots,
        "seed": args.seed,
        "views": args.views,
        "ratio": args.ratio,
        "learning_rate": args.learning_rate,
        "hyperparameter_search": search.to_dict() if search else None,
        "reduction": args.reduction,
        "adapt": args.adapt,
        "templates": templates,
        "end_to_end": args.end_to_end,
        "num_processes": num_processes,
        "torch_dtype": str(unwrap_model(peft_model).dtype).removeprefix("torch."),
        "mixed_precision": accelerator.mixed_precision,
        "dataloader_num_workers": args.dataloader_num_workers,
        "model_name_or_path": args.model_name_or_path,
        "dataset": dataset,
    }
    _save_outputs(args, accelerator, peft_model, results)
    if args.with_tracking:
        accelerator.end_training()
    return results


def _evaluate_zero_shot(peft_model, classifier, eval_set, eval_loader, accelerator) -> dict[str, Any]:
    # `frozen` disables the adapters the classifier shares with the model: this is CLIP's own zero-shot head.
    with frozen(peft_model):
        return evaluate(classifier, eval_set, eval_loader, accelerator)


def _save_outputs(args, accelerator: Accelerator, peft_model, results: dict[str, Any]) -> None:
    """The adapter with its classes and model card, all_results.json, the plot, and the Hub upload if asked."""
    training_results = {
        "base_model": _card_name(args.model_name_or_path),
        "dataset": _card_name(results["dataset"]),
        "shots": args.shots,
        "ratio": args.ratio,
        "learning_rate": args.learning_rate,
        "accuracy": results["eval_accuracy"],
        "zero_shot_accuracy": results["zero_shot_accuracy"],
        "num_eval_images": results["num_eval_images"],
    }
    if results["hyperparameter_search"]:  # the grid, every candidate's held-out accuracy and the choice
        training_results["hyperparameter_search"] = results["hyperparameter_search"]["summary"]
    # Saved beside the adapter (class_prompts.json): FewShotClassifier.from_pretrained rebuilds this classifier.
    prompts = {"class_names": results["class_names"], "templates": results["templates"]}
    shared = {
        "extra_files": {CLASS_PROMPTS_FILE: json.dumps(prompts, indent=2, ensure_ascii=False)},
        "card_facts": CardFacts(results=training_results, license=args.license, **prompts),
    }
    accelerator.wait_for_everyone()
    output_dir = Path(args.output_dir)
    accelerator.unwrap_model(peft_model).save_pretrained(
        str(output_dir), is_main_process=accelerator.is_main_process, **shared
    )
    if accelerator.is_main_process:
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        save_plot(output_dir / PLOT_FILE, results)
        logger.info("Saved the adapter, %s and %s in %s", RESULTS_FILE, PLOT_FILE, output_dir)
        if args.push_to_hub:
            peft_model.push_to_hub(
                args.hub_repo_id, token=args.hub_token, commit_message="Upload CLIP-Adapter (few-shot)", **shared
            )
            logger.info("Pushed the adapter to %s", args.hub_repo_id)
    accelerator.wait_for_everyone()


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    # Trackers accept scalars only.
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }


def _percent(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def _card_name(name: Optional[str]) -> Optional[str]:
    """A model or dataset name for the model card: a local path becomes its folder's name (a full path means
    nothing elsewhere, and would publish the trainer's file system)."""
    if name and os.path.exists(name):
        return f"{Path(name).resolve().name} (local folder)"
    return name


if __name__ == "__main__":
    run_cli(main)
