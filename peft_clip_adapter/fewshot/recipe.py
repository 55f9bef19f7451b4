"""The paper's training recipe on cached features, as data: optimizer, batch and learning-rate schedule.

CLIP-Adapter trains with CoOp's RN50 configuration: SGD (momentum 0.9, weight decay 5e-4), a global batch of
32, 200 epochs, a cosine schedule after one warm-up epoch at a constant 1e-5. The trainer and the
hyperparameter search share this one description, so a candidate of the search is the trainer's adapter.
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

    Raises ``ValueError`` for a count below 1, a negative rate, or an unknown schedule.
    """

    num_train_epochs: int = 200
    # Images per optimizer step over all processes; the last incomplete batch is dropped, and a training set
    # smaller than one batch trains in one step per epoch.
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_scheduler_type: str = "cosine"  # after the warm-up: one of LR_SCHEDULES
    num_warmup_steps: Optional[int] = None  # None: one epoch, as in the paper
    warmup_learning_rate: float = 1e-5  # constant during the warm-up
    seed: int = 0  # epoch e shuffles the images with seed + e

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
        """``num_images // batch_size`` optimizer steps per epoch, or 1 for fewer images than one batch."""
        return max(1, num_images // self.batch_size)

    def warmup_steps(self, num_images: int) -> int:
        """Warm-up steps: ``num_warmup_steps``, or one epoch when it is ``None``."""
        return self.steps_per_epoch(num_images) if self.num_warmup_steps is None else self.num_warmup_steps

    def learning_rate_at(self, step: int, peak: float, *, num_images: int) -> float:
        """The rate of 0-based optimizer step ``step`` with peak ``peak``, for ``num_images`` training rows."""
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
    """CoOp's schedule per optimizer step: a constant warm-up rate, then the schedule over the whole run.

    As in CoOp the cosine spans all steps, warm-up included, so the first step after a warm-up epoch gets
    ``0.5 * peak * (1 + cos(pi / epochs))``; ``"linear"`` reaches 0 at ``total_steps``. A pure function of the
    step, so resuming needs no scheduler state.
    """
    if step < warmup_steps:
        return warmup_learning_rate
    progress = step / max(total_steps, 1)
    if schedule == "cosine":
        return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak
