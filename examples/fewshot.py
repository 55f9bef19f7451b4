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
import importlib.util
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
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
#: Global batch (per device x processes x accumulation) used when --per_device_train_batch_size is unset.
GLOBAL_BATCH_SIZE = 32
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
# Arguments (parsed before the heavy imports in main, so that --help and bad flags answer at once)


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
    if args.templates and len(args.templates) == 1 and "{}" not in args.templates[0]:
        known = ["default", "ensemble", *_template_set_names()]
        if args.templates[0] not in known:
            raise ValueError(
                f"Unknown template set {args.templates[0]!r}; choose one of {known} or pass template strings."
            )
    elif args.templates and any("{}" not in value for value in args.templates):
        raise ValueError(
            f"--templates {[value for value in args.templates if '{}' not in value]} have no '{{}}' placeholder: "
            "pass one template-set name or prompt strings like 'a photo of a {}.'."
        )
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


# -----------------------------------------------------------------------------
# Setup: output folder, offline default, model, data and prompts

logger = logging.getLogger(__name__)


def prepare_output_dir(args: argparse.Namespace, accelerator) -> None:
    """Refuse an output_dir holding another run's files unless --overwrite_output_dir (or resuming).

    With --overwrite_output_dir the previous run's checkpoints and tracking logs are removed, so that
    neither ``--resume_from_checkpoint latest`` nor the logs can mix two runs; other files are overwritten.
    """
    from peft_clip_adapter.fewshot.checkpoints import find_checkpoints

    output_dir = Path(args.output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output_dir {output_dir} is a file; pass a folder.")
    entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        # Resuming is only worth suggesting when there is a checkpoint to resume from.
        resume = ", --resume_from_checkpoint latest to continue that run" if find_checkpoints(output_dir) else ""
        raise ValueError(
            f"--output_dir {output_dir} already holds another run's files ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}). Pass --overwrite_output_dir to replace them{resume}, "
            "or choose another --output_dir."
        )
    accelerator.wait_for_everyone()  # every process has checked before anything is removed
    if accelerator.is_main_process:
        if entries and args.overwrite_output_dir and not args.resume_from_checkpoint:
            temporaries = output_dir.glob(".*.tmp-*")  # left by a killed save (peft_clip_adapter.atomic)
            for path in [*find_checkpoints(output_dir), *temporaries, output_dir / TRACKING_PROJECT]:
                shutil.rmtree(path, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def prepare_offline_default(args: argparse.Namespace, accelerator) -> None:
    """Build the micro-CLIP and the task's image folders once (in cache_dir) and point the args at them."""
    from peft_clip_adapter.testing.offline_default import build_offline_default, offline_default_folders
    from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS

    with accelerator.main_process_first():
        folders = offline_default_folders(args.cache_dir, args.offline_task)
        if accelerator.is_main_process:
            if not folders[0].is_dir():
                logger.info("Pretraining the offline micro-CLIP once (about a minute on 2 CPU cores).")
            build_offline_default(args.cache_dir, args.offline_task)
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


def fetch_base_model_card(args: argparse.Namespace) -> None:
    """For --push_to_hub: download the base model's card, so that the adapter's card inherits its licence."""
    from huggingface_hub import hf_hub_download

    if args.license is None and not os.path.exists(args.model_name_or_path or ""):
        try:
            hf_hub_download(args.model_name_or_path, "README.md", token=args.hub_token)
        except Exception:  # best effort: the card then has no licence, and says so
            logger.warning(
                "The base model's card is unavailable, so the adapter's card has no licence; pass --license."
            )


def load_model(args: argparse.Namespace):
    """The frozen dual encoder with an adapter on --adapt, and its processor (tokenizer + image processor)."""
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import AutoModel, AutoProcessor

    from peft_clip_adapter import CLIPAdapterConfig
    from peft_clip_adapter.adapter_checks import from_pretrained_safetensors
    from peft_clip_adapter.families import describe_towers, towers_by_branch
    from peft_clip_adapter.fewshot.logs import quiet_peft_wrapping

    # A pickle is refused, never unpickled.
    model = from_pretrained_safetensors(AutoModel, args.model_name_or_path, dtype=args.torch_dtype)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    missing = [branch for branch in ("vision", "text") if branch not in towers_by_branch(model)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} from {args.model_name_or_path} has no {' / '.join(missing)} tower with a pooled "
            f"embedding (it has {describe_towers(model)}): the trainer classifies images by class-name prompts, so it "
            "needs an image and a text tower. Use a CLIP or SigLIP checkpoint such as openai/clip-vit-base-patch16."
        )
    # With --ratio auto the search sets the ratio later (set_ratio); the initial weights do not depend on it.
    ratio = PAPER_DEFAULTS["ratio"] if args.ratio == "auto" else args.ratio
    config = CLIPAdapterConfig(ratio=ratio, reduction=args.reduction, adapt=args.adapt)
    # Seeded right here, so the adapter's initial weights depend on --seed alone (building the offline model
    # on a first run reseeds torch, for one).
    set_seed(args.seed)
    with quiet_peft_wrapping():
        return get_peft_model(model, config), processor


def load_data(args: argparse.Namespace):
    """The k-shot training sample, the full held-out split and the class names, checked."""
    import datasets

    from peft_clip_adapter.fewshot.data import (
        check_columns,
        class_names,
        load_image_classification_data,
        sample_few_shot,
    )

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
    from peft_clip_adapter.fewshot.templates import DATASET_TEMPLATES, templates_for

    values = args.templates
    if not values:
        hint = "".join(char for char in (args.dataset_name or args.train_dir or "").lower() if char.isalnum())
        known = [name for name in DATASET_TEMPLATES if name.replace("_", "") in hint]
        values = [max(known, key=len)] if known else ["default"]
    return templates_for(values[0]) if len(values) == 1 and "{}" not in values[0] else list(values)


def build_classifier(args: argparse.Namespace, peft_model, processor, names: list[str], templates: list[str]):
    """The prompt classifier sharing the model's adapters; identical class prototypes are refused."""
    from peft_clip_adapter.fewshot.classifier import (
        NEAR_DUPLICATE_COSINE,
        CLIPAdapterClassifier,
        check_class_prototypes,
        encode_class_prompts,
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
    return CLIPAdapterClassifier.from_model(peft_model, class_embeddings)


def check_images(dataset, image_column: str) -> None:
    """Decode every image once, so an unreadable file fails (by name) before end-to-end training starts."""
    import datasets

    from peft_clip_adapter.fewshot.data import load_image

    raw = dataset.select_columns([image_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    for value in raw[image_column]:
        load_image(value)


def choose_hyperparameters(args, accelerator, peft_model, classifier, train_set, train_eval_set, global_batch):
    """--ratio / --learning_rate auto: k-fold cross-validation on the training shots, then set the winners.

    The search runs on the main process and its choice is broadcast, so every process trains with the same values.
    """
    from accelerate.utils import broadcast_object_list

    from peft_clip_adapter.fewshot.recipe import TrainingRecipe
    from peft_clip_adapter.fewshot.search import search_hyperparameters, set_ratio
    from peft_clip_adapter.fewshot.training import one_thread_on_cpu

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
    found = [None]
    if accelerator.is_main_process:
        with one_thread_on_cpu(accelerator.device):
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


# -----------------------------------------------------------------------------
# Main


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the trainer with command-line arguments ``argv`` (default: ``sys.argv``); return the results."""
    args = parse_args(argv)

    import datasets
    import torch
    import transformers
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, TensorDataset

    from peft_clip_adapter.fewshot.checkpoints import load_checkpoint, new_training_state, resolve_checkpoint
    from peft_clip_adapter.fewshot.data import build_eval_transform, build_train_transform
    from peft_clip_adapter.fewshot.embeddings import frozen, unwrap_model
    from peft_clip_adapter.fewshot.features import FeatureCache, dataset_labels
    from peft_clip_adapter.fewshot.logs import on_terminal
    from peft_clip_adapter.fewshot.shareable_classifier import FewShotClassifier
    from peft_clip_adapter.fewshot.training import (
        EndToEndHead,
        LoopSettings,
        cached_batch_inputs,
        check_hub_access,
        evaluate,
        image_batch_inputs,
        log_per_class,
        save_results,
        train_loop,
    )

    # Accelerator and logging ---------------------------------------------------------------
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
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)  # one process reports
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.push_to_hub and accelerator.is_main_process:  # seconds, not after training: login, network, repo
        args.hub_repo_id = check_hub_access(
            args.hub_model_id or Path(args.output_dir).resolve().name, token=args.hub_token
        )
        fetch_base_model_card(args)
    prepare_output_dir(args, accelerator)
    if args.offline_default:
        prepare_offline_default(args, accelerator)

    # Model, data and class prototypes: everything that can be wrong is checked here, before training ----
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
    classifier = build_classifier(args, peft_model, processor, names, templates)

    # Frozen features, extracted once and cached ---------------------------------------------
    start = time.perf_counter()
    cache = FeatureCache(args.feature_cache_dir)
    extract = {
        "image_column": args.image_column_name,
        "label_column": args.label_column_name,
        "batch_size": args.per_device_eval_batch_size,
        "accelerator": accelerator,  # the mixed precision comes from it
        "show_progress": True,
        "num_workers": args.dataloader_num_workers,
    }
    eval_transform = build_eval_transform(processor.image_processor)
    train_transform = build_train_transform(
        processor.image_processor, seed=args.seed, scale=(args.min_crop_scale, 1.0)
    )
    eval_set = cache.load_or_extract(peft_model, eval_dataset, eval_transform, views=1, **extract)
    searching = "auto" in (args.ratio, args.learning_rate)
    if args.end_to_end:
        check_images(train_dataset, args.image_column_name)
    train_set = None
    if not args.end_to_end or searching:  # the search always trains on cached features
        train_set = cache.load_or_extract(peft_model, train_dataset, train_transform, views=args.views, **extract)
    if searching:  # held-out shots are scored on their eval-transform embeddings, as test images are
        train_eval_set = cache.load_or_extract(peft_model, train_dataset, eval_transform, views=1, **extract)
    feature_seconds = time.perf_counter() - start

    # Data loaders over row indices: the cached features (or images) are looked up per batch ------------
    num_processes = accelerator.num_processes
    per_device = args.per_device_train_batch_size or max(
        1, GLOBAL_BATCH_SIZE // (num_processes * args.gradient_accumulation_steps)
    )
    global_batch = per_device * num_processes * args.gradient_accumulation_steps
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
        search = choose_hyperparameters(
            args, accelerator, peft_model, classifier, train_set, train_eval_set, global_batch
        )

    # Optimizer, Accelerate, zero-shot baseline ------------------------------------------------
    trainable = [parameter for parameter in classifier.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(
        trainable, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
    )
    head = EndToEndHead(peft_model, classifier) if args.end_to_end else classifier
    head, optimizer, train_loader, eval_loader = accelerator.prepare(head, optimizer, train_loader, eval_loader)
    logger.info(
        "Training %d epochs x %d steps, global batch %d (%d per device x %d processes x %d accumulation), %s",
        args.num_train_epochs,
        math.ceil(len(train_loader) / args.gradient_accumulation_steps),
        global_batch,
        per_device,
        num_processes,
        args.gradient_accumulation_steps,
        "end to end through the model" if args.end_to_end else f"on {args.views} cached views per image",
    )
    with frozen(peft_model):  # the adapters off: CLIP's own zero-shot head
        zero_shot = evaluate(classifier, eval_set, eval_loader, accelerator)
    logger.info("Zero-shot accuracy: %.4f (%d images)", zero_shot["accuracy"], zero_shot["count"])
    if args.with_tracking:
        accelerator.init_trackers(TRACKING_PROJECT, config=_tracker_config(args))
        accelerator.log({"eval_accuracy": zero_shot["accuracy"]}, step=0)

    # Training, from scratch or from a checkpoint ----------------------------------------------
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    state = new_training_state(settings)
    if args.resume_from_checkpoint:
        folder = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = load_checkpoint(
            accelerator, folder, settings, trust_unrecorded_settings=args.trust_checkpoint_settings
        )
        logger.info("Resumed from %s", folder)
    loop = LoopSettings(
        num_train_epochs=args.num_train_epochs,
        views=args.views,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        num_warmup_steps=args.num_warmup_steps,
        warmup_learning_rate=args.warmup_learning_rate,
        eval_every_epochs=args.eval_every_epochs,
        checkpointing_steps=args.checkpointing_steps,
        output_dir=args.output_dir,
        with_tracking=args.with_tracking,
    )
    unwrapped = accelerator.unwrap_model(head)
    unwrapped_classifier = unwrapped.classifier if args.end_to_end else unwrapped
    if args.end_to_end:
        batch_inputs = image_batch_inputs(train_dataset, args.image_column_name, train_transform)
    else:
        batch_inputs = cached_batch_inputs(train_set)
    start = time.perf_counter()
    state = train_loop(
        accelerator,
        head,
        optimizer,
        train_loader,
        loop,
        batch_inputs=batch_inputs,
        train_labels=dataset_labels(train_dataset, args.label_column_name),  # [N]
        evaluate_now=lambda: evaluate(unwrapped_classifier, eval_set, eval_loader, accelerator)["accuracy"],
        state=state,
    )
    train_seconds = time.perf_counter() - start

    # Results and the adapter ---------------------------------------------------------------
    final = evaluate(unwrapped_classifier, eval_set, eval_loader, accelerator)
    logger.info(
        "CLIP-Adapter accuracy: %.4f (zero-shot %.4f) on %d held-out images",
        final["accuracy"],
        zero_shot["accuracy"],
        final["count"],
    )
    if accelerator.is_main_process:
        log_per_class(names, zero_shot["per_class"], final["per_class"])
    dataset = args.dataset_name or (f"offline-{args.offline_task}" if args.offline_default else args.train_dir)
    results = {
        "zero_shot_accuracy": zero_shot["accuracy"],
        "eval_accuracy": final["accuracy"],
        "per_class_accuracy": dict(zip(names, final["per_class"], strict=True)),
        "zero_shot_per_class_accuracy": dict(zip(names, zero_shot["per_class"], strict=True)),
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
    shareable = FewShotClassifier(accelerator.unwrap_model(peft_model), processor, names, templates)
    card = {"training_results": _card_results(args, results), "license": args.license}
    accelerator.wait_for_everyone()
    shareable.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process, **card)
    if accelerator.is_main_process:
        save_results(args.output_dir, results)
        logger.info("Saved the adapter, all_results.json and training_curves.png in %s", args.output_dir)
        if args.push_to_hub:
            commit = "Upload CLIP-Adapter (few-shot)"
            shareable.push_to_hub(args.hub_repo_id, token=args.hub_token, commit_message=commit, **card)
            logger.info("Pushed the adapter to %s", args.hub_repo_id)
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    return results


def _card_results(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """What the model card reports: where the adapter comes from, how it trained and how well it does."""
    card = {
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
        card["hyperparameter_search"] = results["hyperparameter_search"]["summary"]
    return card


def _card_name(name: Optional[str]) -> Optional[str]:
    """A local path becomes its folder's name: a full path means nothing elsewhere, and would publish the
    trainer's file system."""
    if name and os.path.exists(name):
        return f"{Path(name).resolve().name} (local folder)"
    return name


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    # Trackers accept scalars only.
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }


if __name__ == "__main__":
    run_cli(main)
