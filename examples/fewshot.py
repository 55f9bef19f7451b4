"""Few-shot image classification with CLIP-Adapter, on Accelerate.

Trains a CLIP-Adapter (Gao et al., https://arxiv.org/abs/2110.04544) on k labelled images per class and
reports zero-shot accuracy before and adapter accuracy after, on held-out images. The frozen backbone runs
once per training image and augmented view (and once per eval image); the features are cached on disk and
the adapter trains on them, so the paper's 200 epochs cost seconds.

One CPU, with no arguments (no network): a micro-CLIP pretrained on generated captioned scenes (built
once, about a minute on 2 cores, then cached) and a generated few-shot task, with the paper's recipe::

    python examples/fewshot.py

One process (CPU or one GPU) on a real model and your own image folders::

    accelerate launch examples/fewshot.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --train_dir data/eurosat/train --validation_dir data/eurosat/val --templates eurosat \\
        --shots 16 --output_dir runs/eurosat-16shot

Two CPU processes (gloo; ``accelerate launch --cpu --num_processes 2`` silently runs ONE process)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/fewshot.py --cpu --per_device_train_batch_size 16

N GPUs on one machine (the default global batch of 32 is split across them)::

    accelerate launch --multi_gpu --num_processes N examples/fewshot.py --model_name_or_path ... ...

Recipe (the paper's, from CoOp's config): SGD (lr 2e-3, momentum 0.9, weight decay 5e-4), global
batch 32, 200 epochs, cosine schedule after 1 warm-up epoch at a constant 1e-5, ratio 0.2, reduction 4.
Epoch ``e`` trains on view ``e % views`` of every image; ``--end_to_end`` re-runs the backbone on every
step on the same views and gives the same adapter. The seeded sampler drops the last incomplete batch
(as CoOp), so 2 processes x 8 images and 1 process x 16 images train the same adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import os
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
#: The flags all_results.json records as given (or as the search chose them).
RESULT_FLAGS = ("shots", "seed", "views", "ratio", "learning_rate", "reduction", "adapt", "end_to_end")
RESULT_FLAGS += ("dataloader_num_workers", "model_name_or_path")
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
    data = parser.add_argument_group("model and data (none of them: the offline default)").add_argument
    data("--model_name_or_path", help="A CLIP, SigLIP or SigLIP 2 checkpoint. Default: the offline micro-CLIP.")
    data(
        "--torch_dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="Dtype of the frozen backbone; the adapter trains in float32. Default: the checkpoint's.",
    )
    data("--dataset_name", help="A Hub dataset id, or a local dataset folder. Default: use --train_dir.")
    data("--dataset_config_name", help="The dataset's configuration name. Default: its default one.")
    data("--train_dir", help="An image folder with one sub-folder per class. Default: use --dataset_name.")
    data("--validation_dir", help="Held-out images, same classes. Default: a validation split or --train_val_split.")
    data("--image_column_name", default="image", help="The column holding the images.")
    data("--label_column_name", default="label", help="The column holding the class labels.")
    data("--train_val_split", type=float, default=0.2, help="Held-out fraction when the data has no validation split.")
    data("--cache_dir", default=default_cache_dir(), help="The offline default's files and the feature cache.")
    data("--feature_cache_dir", help="The frozen-feature cache. Default: <cache_dir>/features.")
    data("--offline_task", choices=OFFLINE_TASKS, default="dusk-pairs", help="The offline default's generated task.")

    method = parser.add_argument_group("CLIP-Adapter").add_argument
    method("--shots", type=int, help=f"Training images per class. {_recipe_default('shots')}")
    method(
        "--ratio",
        help=f"Residual blend in [0, 1], or 'auto' (k-fold cross-validation on the shots). {_recipe_default('ratio')}",
    )
    method("--reduction", type=int, default=4, help="Bottleneck factor: hidden width d // reduction.")
    method("--adapt", choices=["vision", "text", "both"], default="vision", help="Branch(es) to adapt.")
    method(
        "--templates",
        nargs="+",
        help="A template set (default, ensemble, " + ", ".join(_template_set_names()) + ") or prompt strings "
        "with {} for the class name. Default: the dataset's own set if its name is known, else default.",
    )
    method("--views", type=int, help=f"Cached augmented views per training image. {_recipe_default('views')}")
    method("--min_crop_scale", type=float, help=f"Smallest crop area share. {_recipe_default('min_crop_scale')}")
    method("--end_to_end", action="store_true", help="Train through the full model, no feature cache.")
    method("--ratio_grid", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], help="Candidates of --ratio auto.")
    method("--learning_rate_grid", type=float, nargs="+", default=[5e-4, 2e-3, 8e-3], help="Of --learning_rate auto.")
    method("--search_folds", type=int, default=4, help="Folds of the auto search (at most shots).")

    train = parser.add_argument_group("training").add_argument
    train("--num_train_epochs", type=int, default=200, help="Passes over the training images.")
    train(
        "--per_device_train_batch_size",
        type=int,
        help=f"Default: a global batch of {GLOBAL_BATCH_SIZE}, split over processes and accumulation steps.",
    )
    train("--per_device_eval_batch_size", type=int, default=256, help="Images per eval and extraction batch.")
    train(
        "--dataloader_num_workers",
        type=int,
        help="Processes decoding images for feature extraction; 0 decodes in the main process. Default: feeding a "
        "GPU, one per available core (shared among local processes) up to 8; on CPU, one per 8 cores.",
    )
    train("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    train("--learning_rate", help=f"Peak SGD rate, or 'auto' (see --ratio). {_recipe_default('learning_rate')}")
    train("--momentum", type=float, default=0.9, help="SGD momentum.")
    train("--weight_decay", type=float, default=5e-4, help="SGD weight decay.")
    train("--lr_scheduler_type", choices=["cosine", "linear", "constant"], default="cosine", help="After warm-up.")
    train("--num_warmup_steps", type=int, help="Default: one epoch.")
    train("--warmup_learning_rate", type=float, default=1e-5, help="Constant lr during warm-up.")
    train("--eval_every_epochs", type=int, help="Default: about 20 evaluations a run.")
    train("--seed", type=int, default=0, help="Seeds the shots, the crops, the shuffles and the adapter.")
    train("--cpu", action="store_true", help="Run on CPU even where a GPU is available.")

    output = parser.add_argument_group("output").add_argument
    output("--output_dir", default="fewshot-output", help="Where the adapter and results go.")
    output("--overwrite_output_dir", action="store_true", help="Replace a previous run's output.")
    output("--checkpointing_steps", help="Save state every N optimizer steps, or 'epoch'. Default: never.")
    output("--resume_from_checkpoint", help="A checkpoint folder, or 'latest'. Default: start afresh.")
    output(
        "--trust_checkpoint_settings",
        action="store_true",
        help="Resume a checkpoint that records no training settings (an older version's) as if made with these flags.",
    )
    output("--with_tracking", action="store_true", help="Log metrics to --report_to.")
    output("--report_to", default="tensorboard", help="tensorboard, wandb, ... or all.")
    output("--push_to_hub", action="store_true", help="Upload the adapter and its model card.")
    output("--hub_model_id", help="Repository id. Default: output_dir's name.")
    output("--hub_token", help="Hub token. Default: the stored login (hf auth login).")
    output("--license", help="The model card's licence (e.g. mit). Default: the base model's, when its card is known.")
    output("--debug", action="store_true", help="Show the Python traceback of an error.")
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
    """Refuse out-of-range values before anything is loaded, naming the flag and the accepted range."""
    positive = ["shots", "views", "reduction", "num_train_epochs", "per_device_train_batch_size", "eval_every_epochs"]
    positive += ["per_device_eval_batch_size", "gradient_accumulation_steps", "checkpointing_steps"]
    for name in positive:
        value = getattr(args, name)
        if value is not None and value != "epoch" and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")
    if args.ratio != "auto" and not 0.0 <= args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in [0, 1] (the residual blend; the paper uses 0.2), got {args.ratio}.")
    if any(not 0.0 <= ratio <= 1.0 for ratio in args.ratio_grid):
        raise ValueError(f"--ratio_grid values must be in [0, 1], got {args.ratio_grid}.")
    if any(not rate > 0 for rate in args.learning_rate_grid):
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
    named = ["default", "ensemble", *_template_set_names()]
    if args.templates and len(args.templates) == 1 and "{}" not in args.templates[0]:
        if args.templates[0] not in named:
            raise ValueError(
                f"Unknown template set {args.templates[0]!r}; choose one of {named} or pass template strings."
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


def prepare_offline_default(args: argparse.Namespace, accelerator) -> None:
    """Build the micro-CLIP and the task's image folders once (in cache_dir) and point the args at them."""
    from peft_clip_adapter.testing.offline_default import build_offline_default, offline_default_folders
    from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS

    folders = offline_default_folders(args.cache_dir, args.offline_task)
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            if not folders[0].is_dir():
                logger.info("Pretraining the offline micro-CLIP once (about a minute on 2 CPU cores).")
            build_offline_default(args.cache_dir, args.offline_task)
    args.model_name_or_path, args.train_dir, args.validation_dir = (str(folder) for folder in folders)
    task, recipe = (
        SCENE_TASKS[args.offline_task],
        ", ".join(f"{name}={getattr(args, name)}" for name in OFFLINE_DEFAULTS),
    )
    logger.warning(
        f"Offline default: a micro-CLIP pretrained on generated captioned scenes ({folders[0]}) and the generated "
        f"task {task.name!r}: {task.description} ({len(task.classes)} classes). The paper's recipe: {recipe}, "
        f"{args.num_train_epochs} epochs (no crops: the views of the 32 px scenes are flips)."
    )


def choose_hyperparameters(args, accelerator, peft_model, classifier, train_set, train_eval_set, global_batch):
    """--ratio / --learning_rate auto: k-fold cross-validation on the training shots, then set the winners."""
    from peft_clip_adapter.fewshot.recipe import TrainingRecipe
    from peft_clip_adapter.fewshot.search import set_ratio
    from peft_clip_adapter.fewshot.training import search_on_main_process

    flags = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainingRecipe)
        if field.name != "batch_size"
    }
    result = search_on_main_process(
        accelerator,
        classifier,
        train_set,
        train_eval_set.features[0],
        ratios=args.ratio_grid if args.ratio == "auto" else [args.ratio],
        learning_rates=args.learning_rate_grid if args.learning_rate == "auto" else [args.learning_rate],
        recipe=TrainingRecipe(batch_size=global_batch, **flags),
        num_folds=args.search_folds,
        fallback=(PAPER_DEFAULTS["ratio"], PAPER_DEFAULTS["learning_rate"]),
    )
    (logger.info if result.candidates else logger.warning)(f"Hyperparameter search: {result.summary()}")
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

    from peft_clip_adapter.fewshot import checkpoints, training
    from peft_clip_adapter.fewshot.data import build_eval_transform, build_train_transform
    from peft_clip_adapter.fewshot.embeddings import frozen, unwrap_model
    from peft_clip_adapter.fewshot.features import FeatureCache, dataset_labels
    from peft_clip_adapter.fewshot.logs import on_terminal
    from peft_clip_adapter.fewshot.shareable_classifier import FewShotClassifier
    from peft_clip_adapter.fewshot.templates import resolve_templates

    # Accelerator and logging ---------------------------------------------------------------------------
    if not on_terminal():  # library bars (weights, image folders) redraw in place: noise in a log file
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
    if args.push_to_hub and accelerator.is_main_process:  # seconds, not after training: login, network, repository
        repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
        base_model = None if args.license or args.offline_default else args.model_name_or_path  # for its licence
        args.hub_repo_id = training.check_hub_access(repo_id, token=args.hub_token, base_model=base_model)
    resuming, overwrite = bool(args.resume_from_checkpoint), args.overwrite_output_dir
    checkpoints.prepare_output_dir(
        accelerator, args.output_dir, overwrite=overwrite, resuming=resuming, also_remove=(TRACKING_PROJECT,)
    )
    if args.offline_default:
        prepare_offline_default(args, accelerator)

    # Model, data and class prototypes: everything that can be wrong is checked here, before training -----
    templates = resolve_templates(args.templates, args.dataset_name or args.train_dir or "")
    with accelerator.main_process_first():
        # With --ratio auto the search sets the ratio later; the initial weights do not depend on it.
        ratio = PAPER_DEFAULTS["ratio"] if args.ratio == "auto" else args.ratio
        peft_model, processor = training.load_adapted_model(
            args.model_name_or_path, dtype=args.torch_dtype, seed=args.seed, ratio=ratio, reduction=args.reduction,
            adapt=args.adapt,
        )  # fmt: skip
        source = {name: getattr(args, name) for name in ("dataset_name", "dataset_config_name", "train_dir")}
        train_dataset, eval_dataset, names = training.load_few_shot_data(
            shots=args.shots, seed=args.seed, image_column=args.image_column_name, label_column=args.label_column_name,
            validation_dir=args.validation_dir, validation_fraction=args.train_val_split, **source,
        )  # fmt: skip
    peft_model.to(accelerator.device).eval()  # the backbone stays frozen (and in eval mode) throughout
    logger.info(
        f"{len(names)} classes, {len(train_dataset)} training images ({args.shots} shots), {len(eval_dataset)} "
        f"held-out images; templates {templates}"
    )
    classifier = training.build_prompt_classifier(peft_model, processor, names, templates)

    # Frozen features, extracted once and cached ----------------------------------------------------------
    start = time.perf_counter()
    cache = FeatureCache(args.feature_cache_dir)
    extract = dict(image_column=args.image_column_name, label_column=args.label_column_name, show_progress=True)
    extract.update(batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers)
    extract["accelerator"] = accelerator  # its device and mixed precision
    eval_transform = build_eval_transform(processor.image_processor)
    train_transform = build_train_transform(
        processor.image_processor, seed=args.seed, scale=(args.min_crop_scale, 1.0)
    )
    eval_set = cache.load_or_extract(peft_model, eval_dataset, eval_transform, views=1, **extract)
    searching = "auto" in (args.ratio, args.learning_rate)
    if args.end_to_end:
        training.check_images(train_dataset, args.image_column_name)  # an unreadable file fails now, by name
    if not args.end_to_end or searching:  # the search always trains on cached features
        train_set = cache.load_or_extract(peft_model, train_dataset, train_transform, views=args.views, **extract)
    if searching:  # held-out shots are scored on their eval-transform embeddings, as test images are
        train_eval_set = cache.load_or_extract(peft_model, train_dataset, eval_transform, views=1, **extract)
    feature_seconds = time.perf_counter() - start

    # Data loaders over row indices (the features or images are looked up per batch), the ratio search ----
    num_processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    per_device = args.per_device_train_batch_size or max(1, GLOBAL_BATCH_SIZE // (num_processes * accumulation))
    global_batch, num_train = per_device * num_processes * accumulation, len(train_dataset)
    drop_last = num_train >= per_device * num_processes  # CoOp drops the last incomplete batch
    train_loader = DataLoader(TensorDataset(torch.arange(num_train)), per_device, shuffle=True, drop_last=drop_last)
    eval_loader = DataLoader(TensorDataset(torch.arange(len(eval_dataset))), args.per_device_eval_batch_size)
    search = None
    if searching:
        search = choose_hyperparameters(
            args, accelerator, peft_model, classifier, train_set, train_eval_set, global_batch
        )

    # Optimizer, Accelerate, the zero-shot baseline --------------------------------------------------------
    trainable = [parameter for parameter in classifier.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(
        trainable, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
    )
    head = training.EndToEndHead(peft_model, classifier) if args.end_to_end else classifier
    head, optimizer, train_loader, eval_loader = accelerator.prepare(head, optimizer, train_loader, eval_loader)
    how = "end to end through the model" if args.end_to_end else f"on {args.views} cached views per image"
    steps = math.ceil(len(train_loader) / accumulation)
    logger.info(
        f"Training {args.num_train_epochs} epochs x {steps} steps, global batch {global_batch} ({per_device} per "
        f"device x {num_processes} processes x {accumulation} accumulation), {how}"
    )
    with frozen(peft_model):  # the adapters off: CLIP's own zero-shot head
        zero_shot = training.evaluate(classifier, eval_set, eval_loader, accelerator)
    logger.info(f"Zero-shot accuracy: {zero_shot['accuracy']:.4f} ({zero_shot['count']} images)")
    if args.with_tracking:
        config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()
        }
        accelerator.init_trackers(TRACKING_PROJECT, config=config)  # trackers take scalars only
        accelerator.log({"eval_accuracy": zero_shot["accuracy"]}, step=0)

    # Training, from scratch or from a checkpoint ---------------------------------------------------------
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    state = checkpoints.new_training_state(settings)
    if args.resume_from_checkpoint:
        folder = checkpoints.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        trust = args.trust_checkpoint_settings
        state = checkpoints.load_checkpoint(accelerator, folder, settings, trust_unrecorded_settings=trust)
        logger.info(f"Resumed from {folder}")
    loop = training.LoopSettings(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(training.LoopSettings)}
    )
    trained = accelerator.unwrap_model(head).classifier if args.end_to_end else accelerator.unwrap_model(head)
    if args.end_to_end:
        batch_inputs = training.image_batch_inputs(train_dataset, args.image_column_name, train_transform)
    else:
        batch_inputs = training.cached_batch_inputs(train_set)
    start = time.perf_counter()
    state = training.train_loop(
        accelerator,
        head,
        optimizer,
        train_loader,
        loop,
        batch_inputs=batch_inputs,
        train_labels=dataset_labels(train_dataset, args.label_column_name),  # [N]
        evaluate_now=lambda: training.evaluate(trained, eval_set, eval_loader, accelerator)["accuracy"],
        state=state,
    )
    train_seconds = time.perf_counter() - start

    # Results and the adapter ----------------------------------------------------------------------------
    final = training.evaluate(trained, eval_set, eval_loader, accelerator)
    logger.info(
        f"CLIP-Adapter accuracy: {final['accuracy']:.4f} (zero-shot {zero_shot['accuracy']:.4f}) on "
        f"{final['count']} held-out images"
    )
    if accelerator.is_main_process:
        training.log_per_class(names, zero_shot["per_class"], final["per_class"])
    results = dict(
        zero_shot_accuracy=zero_shot["accuracy"],
        eval_accuracy=final["accuracy"],
        per_class_accuracy=dict(zip(names, final["per_class"], strict=True)),
        zero_shot_per_class_accuracy=dict(zip(names, zero_shot["per_class"], strict=True)),
        **{key: state[key] for key in ("train_loss_per_epoch", "eval_accuracy_per_epoch")},
        feature_extraction_seconds=feature_seconds,
        train_seconds=train_seconds,
        num_train_images=num_train,
        num_eval_images=final["count"],
        num_classes=len(names),
        class_names=names,
        hyperparameter_search=search.to_dict() if search else None,
        templates=templates,
        num_processes=num_processes,
        torch_dtype=str(unwrap_model(peft_model).dtype).removeprefix("torch."),
        mixed_precision=accelerator.mixed_precision,
        dataset=args.dataset_name or (f"offline-{args.offline_task}" if args.offline_default else args.train_dir),
        **{name: getattr(args, name) for name in RESULT_FLAGS},
    )
    shareable = FewShotClassifier(accelerator.unwrap_model(peft_model), processor, names, templates)
    settings = {name: getattr(args, name) for name in ("shots", "ratio", "learning_rate")}
    card = {"training_results": training.card_results(results, args.model_name_or_path, **settings)}
    card["license"] = args.license
    accelerator.wait_for_everyone()
    shareable.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process, **card)
    if accelerator.is_main_process:
        training.save_results(args.output_dir, results)  # all_results.json and training_curves.png
        logger.info(f"Saved the adapter, all_results.json and training_curves.png in {args.output_dir}")
        if args.push_to_hub:
            message = "Upload CLIP-Adapter (few-shot)"
            shareable.push_to_hub(args.hub_repo_id, token=args.hub_token, commit_message=message, **card)
            logger.info(f"Pushed the adapter to {args.hub_repo_id}")
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
