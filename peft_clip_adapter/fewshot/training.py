"""A few-shot run's steps: its data and prompt classifier, the training loop on Accelerate, evaluation, results.

``examples/fewshot.py`` and the benchmarks train with ``train_loop``: CoOp's learning-rate schedule per
optimizer step (``recipe.scheduled_learning_rate``), augmented view ``e % views`` in epoch ``e``, and
checkpoints (``fewshot.checkpoints``) from which a resumed run continues mid-epoch and reports the same
history as an uninterrupted one. The head is a ``CLIPAdapterClassifier`` on cached features, or
``EndToEndHead`` through the full model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from peft_clip_adapter.atomic import atomic_path, write_text
from peft_clip_adapter.fewshot.checkpoints import new_training_state, save_checkpoint
from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier
from peft_clip_adapter.fewshot.features import FeatureSet
from peft_clip_adapter.fewshot.inputs.transforms import move_model_inputs, stack_model_inputs
from peft_clip_adapter.fewshot.logs import progress
from peft_clip_adapter.fewshot.recipe import scheduled_learning_rate

logger = logging.getLogger(__name__)

RESULTS_FILE = "all_results.json"
PLOT_FILE = "training_curves.png"
#: After this many epochs (or all, if fewer), a loss that moved by less than STALL_TOLERANCE (relative) is
#: reported: the classes' prototypes are likely (nearly) identical.
STALL_CHECK_EPOCHS = 5
STALL_TOLERANCE = 1e-4
#: Up to this many classes ``log_per_class`` lists each one; above, it summarises.
PER_CLASS_LOG_LIMIT = 20


@dataclass
class LoopSettings:
    """What ``train_loop`` needs besides the model, optimizer and data."""

    num_train_epochs: int
    views: int  # epoch e trains on view e % views
    learning_rate: float  # the schedule's peak
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: Optional[int] = None  # None: one epoch
    warmup_learning_rate: float = 1e-5
    eval_every_epochs: Optional[int] = None  # None: about 20 evaluations a run
    checkpointing_steps: Union[int, str, None] = None  # every N optimizer steps, "epoch", or never
    output_dir: str = "."  # where checkpoints go
    with_tracking: bool = False  # accelerator.log the metrics of every epoch

    def __post_init__(self) -> None:
        counts = {"num_train_epochs": self.num_train_epochs, "views": self.views}
        counts["eval_every_epochs"] = self.eval_every_epochs
        if self.checkpointing_steps != "epoch":
            counts["checkpointing_steps"] = self.checkpointing_steps
        for name, value in counts.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"LoopSettings.{name} must be a whole number >= 1 (or 'epoch' for checkpoints), got {value!r}."
                )
        if not self.learning_rate > 0:
            raise ValueError(f"LoopSettings.learning_rate must be > 0, got {self.learning_rate}.")


class EndToEndHead(nn.Module):
    """Logits from pixels through the full PEFT model: ``exp(logit_scale) * normalize(f') @ text_weights + bias``.

    Every step re-runs the frozen backbone. The PEFT model is kept out of this module's children: the only
    trainable parameters are the adapters, which ``classifier`` already registers, so DDP synchronises exactly
    those and checkpoints hold only the classifier (under ``classifier.``, so a checkpoint resumes in the mode
    that wrote it).
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


def cached_batch_inputs(train_set: FeatureSet) -> Callable[[torch.Tensor, int], dict[str, torch.Tensor]]:
    """The classifier's inputs for training rows in view ``view``: their cached raw embeddings ``[B, D]``."""
    return lambda rows, view: {"image_features": train_set.features[view, rows.cpu()]}


def image_batch_inputs(
    dataset: Any, image_column: str, transform: Callable[..., Any]
) -> Callable[[torch.Tensor, int], dict[str, torch.Tensor]]:
    """``EndToEndHead``'s inputs for training rows in view ``view``: the same views the feature cache holds."""
    import datasets

    images = dataset.select_columns([image_column])
    if isinstance(images.features[image_column], datasets.Image):
        # Undecoded, so that the transform reads each file itself, decoding as the feature cache does.
        images = images.cast_column(image_column, datasets.Image(decode=False))

    def pixels(rows: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        indices = rows.tolist()
        pictures = images[indices][image_column]
        crops = [transform(image, index=row, view=view) for row, image in zip(indices, pictures, strict=True)]
        return stack_model_inputs(crops)  # pixel_values [B, 3, H, W] (NaFlex: [B, patches, 3*p*p], ...)

    return pixels


def load_adapted_model(
    name_or_path: str, *, dtype: str = "auto", seed: int = 0, **config: Any
) -> tuple[nn.Module, Any]:
    """A dual encoder from safetensors with a ``CLIPAdapterConfig(**config)`` adapter, and its processor.

    The adapter's initial weights depend on ``seed`` alone. A pickled checkpoint is refused unread.

    Raises:
        ValueError: for a model without an image and a text tower, or a pickled checkpoint.
    """
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import AutoModel, AutoProcessor

    from peft_clip_adapter import CLIPAdapterConfig
    from peft_clip_adapter.adapter_checks import from_pretrained_safetensors
    from peft_clip_adapter.families import describe_towers, towers_by_branch
    from peft_clip_adapter.fewshot.logs import quiet_peft_wrapping

    model = from_pretrained_safetensors(AutoModel, name_or_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(name_or_path)
    missing = [branch for branch in ("vision", "text") if branch not in towers_by_branch(model)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} from {name_or_path} has no {' / '.join(missing)} tower with a pooled "
            f"embedding (it has {describe_towers(model)}): the trainer classifies images by class-name prompts, so it "
            "needs an image and a text tower. Use a CLIP or SigLIP checkpoint such as openai/clip-vit-base-patch16."
        )
    set_seed(seed)  # right here: building the offline model on a first run reseeds torch, for one
    with quiet_peft_wrapping():
        return get_peft_model(model, CLIPAdapterConfig(**config)), processor


def load_few_shot_data(
    *, shots: int, seed: int, image_column: str = "image", label_column: str = "label", **source: Any
) -> tuple[Any, Any, list[str]]:
    """The ``shots``-per-class training sample, the whole held-out split and the class names, checked.

    ``source`` goes to ``data.load_image_classification_data`` (``dataset_name``, ``train_dir``, ...).

    Raises:
        ValueError: for a missing column, fewer than 2 classes, or fewer images in a class than ``shots``.
    """
    import datasets

    from peft_clip_adapter.fewshot import data

    splits = data.load_image_classification_data(
        image_column=image_column, label_column=label_column, seed=seed, **source
    )
    for split in ("train", "validation"):
        data.check_columns(splits[split], image_column, label_column)
    names = data.class_names(splits["train"], label_column)
    if not isinstance(splits["train"].features[label_column], datasets.ClassLabel):
        # Class ids alone make prompts like "a photo of a 0.": training still works, zero-shot cannot.
        logger.warning(
            f"Label column {label_column!r} holds integer ids without class names, so the prompts name the classes "
            f"{names[:5]}. The zero-shot accuracy means little; give the names with "
            f"dataset.cast_column({label_column!r}, ClassLabel(names=...))."
        )
    if len(names) < 2:
        raise ValueError(
            f"The training data has {len(names)} class ({names}) in column {label_column!r}; classification needs "
            "at least 2 classes."
        )
    train = data.sample_few_shot(splits["train"], shots, label_column=label_column, seed=seed)
    return train, splits["validation"], names


def build_prompt_classifier(model: nn.Module, processor: Any, names: list[str], templates: list[str]) -> nn.Module:
    """The ``CLIPAdapterClassifier`` of ``model``'s adapters and the class prompts; identical classes are refused.

    Nearly identical classes (cosine above ``classifier.NEAR_DUPLICATE_COSINE``) are a warning.
    """
    from peft_clip_adapter.fewshot import classifier

    class_embeddings = classifier.encode_class_prompts(model, processor, names, templates)  # [C, T, D]
    bar = classifier.NEAR_DUPLICATE_COSINE
    near_duplicates = classifier.check_class_prototypes(class_embeddings, names, near_duplicate_cosine=bar)
    if near_duplicates:
        pairs = "; ".join(f"{a!r} / {b!r} ({cosine:.4f})" for a, b, cosine in near_duplicates)
        logger.warning(
            f"Classes with nearly identical prompt embeddings (cosine > {bar:.2f}): {pairs}. The classifier will "
            "hardly tell them apart; check the class names and --templates."
        )
    return classifier.CLIPAdapterClassifier.from_model(model, class_embeddings)


def check_images(dataset: Any, image_column: str) -> None:
    """Decode every image once, so that an unreadable file fails by name before end-to-end training starts."""
    import datasets

    from peft_clip_adapter.fewshot.inputs.images import load_image

    raw = dataset.select_columns([image_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    for value in raw[image_column]:
        load_image(value)


@torch.no_grad()
def evaluate(classifier: nn.Module, eval_set: FeatureSet, loader: Any, accelerator: Any) -> dict[str, Any]:
    """Top-1 and per-class accuracy, and each image's predicted class, over the cached eval features.

    ``loader`` yields row indices (split across processes); ``gather_for_metrics`` drops the rows Accelerate
    repeats to even out the last batch, so every eval image counts once.
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


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU: for the adapter's tiny matrices, more threads only add synchronisation."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # measured 50x faster than 2 threads on a busy 2-core machine
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def search_on_main_process(accelerator: Any, classifier: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``search.search_hyperparameters(classifier, *args, **kwargs)`` on the main process, its result broadcast,
    so that every process trains with the same values."""
    from accelerate.utils import broadcast_object_list

    from peft_clip_adapter.fewshot.search import search_hyperparameters

    found = [None]
    if accelerator.is_main_process:
        with one_thread_on_cpu(accelerator.device):
            found = [search_hyperparameters(classifier, *args, **kwargs)]
    return broadcast_object_list(found)[0]


def train_loop(
    accelerator: Any,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Any,
    settings: LoopSettings,
    *,
    batch_inputs: Callable[[torch.Tensor, int], dict[str, torch.Tensor]],
    train_labels: torch.Tensor,
    evaluate_now: Callable[[], float],
    state: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Train ``head`` (prepared by ``accelerator``) and return the loop's state with its loss and accuracy history.

    Args:
        train_loader: Yields ``(rows,)`` batches of training-row indices; prepared, with a seedable sampler.
        batch_inputs: ``batch_inputs(rows, view)`` gives ``head``'s keyword inputs (``cached_batch_inputs``,
            ``image_batch_inputs``).
        train_labels: ``[N]`` labels of the training rows.
        evaluate_now: Returns the eval accuracy; called every ``eval_every_epochs`` and after the last epoch.
        state: From ``checkpoints.load_checkpoint`` to resume, mid-epoch if it was saved there.
    """
    state = state or new_training_state({})
    accumulation = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accumulation)
    total_steps = steps_per_epoch * settings.num_train_epochs
    warmup_steps = steps_per_epoch if settings.num_warmup_steps is None else settings.num_warmup_steps
    start_epoch, skip_steps = divmod(state["completed_steps"], steps_per_epoch)
    eval_every = settings.eval_every_epochs or max(1, settings.num_train_epochs // 20)
    output_dir = Path(settings.output_dir)
    bar = progress(
        total=total_steps,
        initial=state["completed_steps"],
        desc="Training",
        enabled=accelerator.is_local_main_process,
        unit="steps",
    )
    cached = isinstance(accelerator.unwrap_model(head), CLIPAdapterClassifier)  # not EndToEndHead's backbone
    with one_thread_on_cpu(accelerator.device) if cached else contextlib.nullcontext():
        for epoch in range(start_epoch, settings.num_train_epochs):
            head.train()
            view = epoch % settings.views
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
                    rate = scheduled_learning_rate(
                        state["completed_steps"],
                        peak=settings.learning_rate,
                        warmup_steps=warmup_steps,
                        total_steps=total_steps,
                        schedule=settings.lr_scheduler_type,
                        warmup_learning_rate=settings.warmup_learning_rate,
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = rate
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                loss_sum += loss.detach() / accumulation
                if not accelerator.sync_gradients:
                    continue
                state["completed_steps"] += 1
                state["epoch_steps"] += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", refresh=False)  # redrawn at its own pace
                every = settings.checkpointing_steps
                if isinstance(every, int) and state["completed_steps"] % every == 0:
                    state["epoch_loss_sum"] = accelerator.reduce(loss_sum, "mean").item()
                    save_checkpoint(accelerator, output_dir / f"step_{state['completed_steps']}", state)

            epoch_loss = accelerator.reduce(loss_sum, "mean").item() / max(state["epoch_steps"], 1)
            state["train_loss_per_epoch"].append(epoch_loss)
            checked = len(state["train_loss_per_epoch"]) == min(STALL_CHECK_EPOCHS, settings.num_train_epochs) > 1
            if checked and accelerator.is_main_process:
                warn_if_loss_stalled(state["train_loss_per_epoch"], num_classes=int(train_labels.max()) + 1)
            state["epoch_loss_sum"], state["epoch_steps"] = 0.0, 0
            metrics = {"train_loss": epoch_loss, "learning_rate": optimizer.param_groups[0]["lr"]}
            if (epoch + 1) % eval_every == 0 or epoch + 1 == settings.num_train_epochs:
                metrics["eval_accuracy"] = state["eval_accuracy_per_epoch"][str(epoch + 1)] = evaluate_now()
                if accelerator.is_main_process:
                    logger.info(
                        "epoch %d: loss %.4f, eval accuracy %.4f", epoch + 1, epoch_loss, metrics["eval_accuracy"]
                    )
            if settings.with_tracking:
                accelerator.log(metrics, step=epoch + 1)
            if settings.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, output_dir / f"epoch_{epoch + 1}", state)
    bar.close()
    return state


def warn_if_loss_stalled(losses: list[float], num_classes: int) -> bool:
    """Warn (and return True) when the loss has not moved at all: e.g. classes with one prototype."""
    if max(losses) - min(losses) > STALL_TOLERANCE * max(1.0, abs(losses[0])):
        return False
    logger.warning(
        "The training loss has not moved in the first %d epochs (%.6f; ln(%d classes) = %.4f is a classifier that "
        "cannot tell the classes apart). Check the warnings about near-identical class prompts above, the "
        "learning rate (--learning_rate) and --ratio (0 disables the adapter).",
        len(losses),
        losses[-1],
        num_classes,
        math.log(num_classes),
    )
    return True


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


def _percent(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def save_results(output_dir: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write ``all_results.json`` and the training-curves plot into ``output_dir``, each all or nothing."""
    write_text(Path(output_dir) / RESULTS_FILE, json.dumps(results, indent=2))
    save_plot(Path(output_dir) / PLOT_FILE, results)


def save_plot(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Training loss per epoch and eval accuracy (with the zero-shot baseline), side by side, as a PNG."""
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
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(figure)


def card_results(results: dict[str, Any], base_model: str, **settings: Any) -> dict[str, Any]:
    """What the model card reports from a run's ``results``: the model, data, ``settings``, and accuracies.

    A local path becomes its folder's name: a full path means nothing elsewhere and would publish the
    trainer's file system.
    """
    sources = {"base_model": base_model, "dataset": results["dataset"]}
    card = {
        key: f"{Path(name).resolve().name} (local folder)" if name and os.path.exists(name) else name
        for key, name in sources.items()
    }
    card.update(settings, accuracy=results["eval_accuracy"], zero_shot_accuracy=results["zero_shot_accuracy"])
    card["num_eval_images"] = results["num_eval_images"]
    if results["hyperparameter_search"]:  # the grid, every candidate's held-out accuracy and the choice
        card["hyperparameter_search"] = results["hyperparameter_search"]["summary"]
    return card


def check_hub_access(repo_id: str, *, token: Optional[str] = None, base_model: Optional[str] = None) -> str:
    """Before any data is loaded: reach the Hub, check the login and create ``repo_id``; return its full id.

    With ``base_model`` (a Hub id), its card is fetched too, so that the adapter's card can inherit its licence.

    Raises:
        ValueError: offline, not logged in, a refused token, a bad id or no network, each with what to do.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

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
    api = HfApi(token=token)
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
    if base_model and not os.path.exists(base_model):
        try:
            hf_hub_download(base_model, "README.md", token=token)
        except Exception:  # best effort: the card then has no licence, and says so
            logger.warning(
                "The base model's card is unavailable, so the adapter's card has no licence; pass --license."
            )
    return repo_id
