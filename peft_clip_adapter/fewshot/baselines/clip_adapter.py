"""CLIP-Adapter trained in process exactly as ``examples/fewshot.py`` trains it, on features already cached.

A benchmark runs hundreds of cells; a process per cell would spend seconds per cell on imports. This runs
the script's steps with its toolkit functions (``training.load_adapted_model``, ``search_on_main_process``,
``train_loop``, ``evaluate``) and the same seeds, so a cell's accuracy equals the script's with the same flags
(``tests/test_baselines.py`` checks it against a run of the script).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch.utils.data import DataLoader, TensorDataset

from peft_clip_adapter.fewshot import training
from peft_clip_adapter.fewshot.features import FeatureSet
from peft_clip_adapter.fewshot.recipe import TrainingRecipe
from peft_clip_adapter.fewshot.search import DEFAULT_NUM_FOLDS, DEFAULT_RATIO_GRID, set_ratio

#: The trainer's recipe on cached features (its defaults): the paper's ratio, peak rate, global batch, epochs.
PAPER_RATIO, LEARNING_RATE, GLOBAL_BATCH, EPOCHS = 0.2, 2e-3, 32, 200


@dataclass
class TrainedAdapter:
    """A trained CLIP-Adapter: its model (the adapters are its modules), processor, accelerator and choice."""

    peft_model: Any
    processor: Any
    accelerator: Any
    hyperparameters: dict[str, Any]

    def classifier(self, class_embeddings: torch.Tensor) -> torch.nn.Module:
        """The adapted head over any classes' prompt embeddings ``[C, T, D]`` (unseen ones too)."""
        from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier

        return CLIPAdapterClassifier.from_model(self.peft_model, class_embeddings.to(self.accelerator.device))

    def accuracy(self, class_embeddings: torch.Tensor, test_set: FeatureSet, batch_size: int = 256) -> float:
        """Top-1 accuracy on cached test features, computed as the trainer's ``training.evaluate``."""
        loader = self.accelerator.prepare(DataLoader(TensorDataset(torch.arange(test_set.num_images)), batch_size))
        return training.evaluate(self.classifier(class_embeddings), test_set, loader, self.accelerator)["accuracy"]


def train_clip_adapter(
    model_name_or_path: str,
    class_names: list[str],
    templates: list[str],
    train_set: FeatureSet,
    train_eval: FeatureSet,
    *,
    seed: int,
    ratio: Union[float, str] = PAPER_RATIO,
    ratio_grid: tuple[float, ...] = DEFAULT_RATIO_GRID,
    num_train_epochs: int = EPOCHS,
    learning_rate: float = LEARNING_RATE,
) -> TrainedAdapter:
    """``examples/fewshot.py --ratio RATIO --seed SEED`` (one process, CPU) on the cached ``train_set``.

    ``ratio="auto"`` is the trainer's ``--ratio auto`` over ``ratio_grid`` (k-fold on the shots, scored on
    ``train_eval``, the shots' eval-transform features). Raises ``ValueError`` as the trainer does for a bad
    model or ratio.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    )
    set_seed(seed)
    start_ratio = PAPER_RATIO if ratio == "auto" else ratio
    peft_model, processor = training.load_adapted_model(model_name_or_path, seed=seed, ratio=start_ratio)
    peft_model.to(accelerator.device).eval()
    classifier = training.build_prompt_classifier(peft_model, processor, class_names, templates)
    num_train = train_set.num_images
    drop_last = num_train >= GLOBAL_BATCH  # the trainer drops the last incomplete batch, as CoOp
    loader = DataLoader(TensorDataset(torch.arange(num_train)), GLOBAL_BATCH, shuffle=True, drop_last=drop_last)
    hyperparameters: dict[str, Any] = {"ratio": ratio, "learning_rate": learning_rate, "epochs": num_train_epochs}
    if ratio == "auto":
        recipe = TrainingRecipe(batch_size=GLOBAL_BATCH, num_train_epochs=num_train_epochs, seed=seed)
        search = training.search_on_main_process(
            accelerator, classifier, train_set, train_eval.features[0], ratios=list(ratio_grid),
            learning_rates=[learning_rate], recipe=recipe, num_folds=DEFAULT_NUM_FOLDS,
            fallback=(PAPER_RATIO, learning_rate),
        )  # fmt: skip
        set_ratio(peft_model, search.ratio)
        hyperparameters.update(ratio=search.ratio, strategy=search.strategy)
        hyperparameters["held_out_accuracy"] = {str(c["ratio"]): c["validation_accuracy"] for c in search.candidates}
    trainable = [parameter for parameter in classifier.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=learning_rate, momentum=0.9, weight_decay=5e-4)
    head, optimizer, loader = accelerator.prepare(classifier, optimizer, loader)
    # Evaluated once, at the end: the test set is the caller's, and the history is not reported.
    loop = training.LoopSettings(
        num_train_epochs=num_train_epochs, views=train_set.num_views, learning_rate=learning_rate,
        eval_every_epochs=num_train_epochs,
    )  # fmt: skip
    with training.one_thread_on_cpu(accelerator.device):
        training.train_loop(
            accelerator, head, optimizer, loader, loop, batch_inputs=training.cached_batch_inputs(train_set),
            train_labels=train_set.labels, evaluate_now=lambda: math.nan,
        )  # fmt: skip
    return TrainedAdapter(peft_model, processor, accelerator, hyperparameters)
