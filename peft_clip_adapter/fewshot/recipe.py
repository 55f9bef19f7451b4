"""The paper's training recipe on cached features, as data: optimizer settings, batch and learning-rate schedule.

CLIP-Adapter trains with CoOp's RN50 configuration: SGD (momentum 0.9, weight decay 5e-4), a global batch
of 32, 200 epochs, and a cosine schedule after one warm-up epoch at a constant 1e-5. The few-shot trainer
(``examples/fewshot.py``) and the hyperparameter search (``peft_clip_adapter.fewshot.search``) both follow this
one description, so that a candidate trained by the search is the adapter the trainer would train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

#: Learning-rate schedules after the warm-up (``TrainingRecipe.lr_scheduler_type``).
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainingRecipe:
    """How one adapter trains: everything but the ratio and the peak learning rate, which a search varies.

    Args:
        num_train_epochs: Passes over the training images (the paper: 200).
        batch_size: Images per optimizer step, over all processes (the paper: 32). A training set smaller
            than one batch trains in one step per epoch; otherwise the last incomplete batch is dropped.
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (5e-4).
        lr_scheduler_type: ``"cosine"``, ``"linear"`` or ``"constant"`` after the warm-up.
        num_warmup_steps: Warm-up optimizer steps; ``None`` means one epoch, as in the paper.
        warmup_learning_rate: The constant learning rate of the warm-up (1e-5).
        seed: Seeds the order of the images: epoch ``e`` shuffles with ``seed + e``.

    Raises:
        ValueError: for a count below 1, a negative rate, or an unknown schedule.

    Example:
        >>> recipe = TrainingRecipe(num_train_epochs=4)
        >>> recipe.steps_per_epoch(100), recipe.steps_per_epoch(20)  # 3 full batches of 32; one batch of 20
        (3, 1)
        >>> # 4 steps in all: one warm-up step at 1e-5, then the cosine from step 1 of 4
        >>> [round(recipe.learning_rate_at(step, 2e-3, num_images=20), 6) for step in range(4)]
        [1e-05, 0.001707, 0.001, 0.000293]
    """

    num_train_epochs: int = 200
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: Optional[int] = None
    warmup_learning_rate: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {LR_SCHEDULES}, got {self.lr_scheduler_type!r}.")
        negative = {
            name: getattr(self, name)
            for name in ("momentum", "weight_decay", "warmup_learning_rate", "num_warmup_steps")
            if getattr(self, name) is not None and getattr(self, name) < 0
        }
        if negative:
            raise ValueError(f"TrainingRecipe values must be >= 0, got {negative}.")

    def steps_per_epoch(self, num_images: int) -> int:
        """Optimizer steps per epoch over ``num_images`` training rows.

        Args:
            num_images: Training rows (images, one view each per epoch).

        Returns:
            ``num_images // batch_size`` (the last incomplete batch is dropped), or 1 for fewer images
            than one batch.

        Example:
            >>> TrainingRecipe().steps_per_epoch(64), TrainingRecipe().steps_per_epoch(70)
            (2, 2)
        """
        return max(1, num_images // self.batch_size)

    def warmup_steps(self, num_images: int) -> int:
        """Warm-up optimizer steps: ``num_warmup_steps``, or one epoch when it is ``None``.

        Args:
            num_images: Training rows.

        Returns:
            The number of steps at ``warmup_learning_rate``.

        Example:
            >>> TrainingRecipe().warmup_steps(96), TrainingRecipe(num_warmup_steps=0).warmup_steps(96)
            (3, 0)
        """
        return self.steps_per_epoch(num_images) if self.num_warmup_steps is None else self.num_warmup_steps

    def learning_rate_at(self, step: int, peak: float, *, num_images: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) for a training set of ``num_images`` rows.

        Args:
            step: Optimizer steps already taken.
            peak: The schedule's peak learning rate (the paper: 2e-3).
            num_images: Training rows (sets the steps per epoch, hence the warm-up and the run's length).

        Returns:
            The rate, from ``scheduled_learning_rate``.

        Example:
            >>> TrainingRecipe(num_train_epochs=2).learning_rate_at(1, 0.1, num_images=32)  # halfway
            0.05
        """
        total = self.steps_per_epoch(num_images) * self.num_train_epochs
        return scheduled_learning_rate(
            step,
            peak=peak,
            warmup_steps=self.warmup_steps(num_images),
            total_steps=total,
            schedule=self.lr_scheduler_type,
            warmup_learning_rate=self.warmup_learning_rate,
        )


def scheduled_learning_rate(
    step: int,
    *,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    warmup_learning_rate: float = 1e-5,
) -> float:
    """CoOp's schedule, per optimizer step: a constant warm-up rate, then the schedule over the whole run.

    As in CoOp, the cosine is evaluated over all steps including the warm-up, so the first step after a
    warm-up epoch gets ``0.5 * peak * (1 + cos(pi / epochs))``. The rate is a pure function of the step,
    so resuming needs no scheduler state.

    Args:
        step: Optimizer steps already taken (0-based).
        peak: The peak learning rate.
        warmup_steps: Steps at ``warmup_learning_rate`` before the schedule starts.
        total_steps: Steps of the whole run, warm-up included.
        schedule: ``"cosine"``, ``"linear"`` (to 0 at ``total_steps``) or ``"constant"``.
        warmup_learning_rate: The warm-up's constant rate.

    Returns:
        The learning rate for this step.

    Example:
        >>> [scheduled_learning_rate(s, peak=1.0, warmup_steps=1, total_steps=4) for s in range(4)]
        [1e-05, 0.8535533905932737, 0.5, 0.14644660940672627]
    """
    if step < warmup_steps:
        return warmup_learning_rate
    progress = step / max(total_steps, 1)
    if schedule == "cosine":
        return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak
