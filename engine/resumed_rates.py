"""The recipe's learning rate and weight decay over a checkpoint's, on a resume.

An optimizer's and a scheduler's saved state carry the rates they were built with: restored as they are, a
resume that lowered `lr` (`--allow-change --set ...lr=`, the usual answer to a run that spikes) trained on at
the old rate while its record said the new one. The schedule's shape (its kind, warm-up, length) comes from
the scheduler built for the recipe; only its peak rate and the groups' weight decay are saved ones.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)


def apply_recipe_rates(optimizer: Any, scheduler: Any, lr: float, weight_decay: float,
                       decay_groups: Sequence[int] | None = None) -> None:
    """Set the restored `optimizer`'s groups and `scheduler` to peak rate `lr`, at the step the scheduler was
    restored to, and `weight_decay` on `decay_groups` (None: every group; the HF Trainer's second group is
    biases and norms, which never decay). The same numbers as the saved state where nothing changed."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # not a LambdaLR (a DeepSpeed config's own scheduler): its rates are its own
        if any(group.get("initial_lr", lr) != lr for group in optimizer.param_groups):
            log.warning("the learning rate scheduler (%s) is not one a resume can set: it goes on at the "
                        "checkpoint's rate, not lr %g", type(scheduler).__name__, lr)
        return
    groups = optimizer.param_groups
    rates = [lr * fn(scheduler.last_epoch) for fn in lambdas]  # LambdaLR's own product, in its order
    scheduler.base_lrs = [lr] * len(groups)
    for index, (group, rate) in enumerate(zip(groups, rates)):
        group["initial_lr"] = lr
        group["lr"] = rate
        if decay_groups is None or index in decay_groups:
            group["weight_decay"] = weight_decay
    scheduler._last_lr = rates  # what get_last_lr() reports until its next step (the logged learning_rate)
