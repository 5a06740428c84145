"""The rank-0 metric sink and the graceful stop, as Trainer callbacks.

`StoreCallback` writes every `on_log` of the Trainer (trl's own metric names) to runs.db and records each
checkpoint. `GracefulStop` turns SIGTERM into "save a checkpoint, then stop" on every rank at the same
step, so a stop never loses more than the step in flight.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from engine.store import Store

log = logging.getLogger(__name__)


class StoreCallback(TrainerCallback):
    """`lineage`: (stage, the model it trains from), written into every checkpoint as into the export, so
    that a checkpoint used as a model (PPO's policy, the RM's start) is checked as the export is."""

    def __init__(self, store: Store | None, run_id: int, lineage: tuple[str, str] | None = None):
        self.store = store
        self.run_id = run_id
        self.lineage = lineage
        self.last_logs: dict[str, float] = {}
        self.tokens_before: float | None = None  # a resumed run's num_tokens at its checkpoint, until its first log
        self.token_offset = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A resume loads the intervals from the checkpoint's trainer_state.json, over the recipe's: a
        # --set train.save_steps the resume allowed (and recorded) went unused, and no checkpoint came.
        state.compute_steps(args, state.max_steps)
        if self.store is not None and state.is_world_process_zero:
            self.store.update_run(self.run_id, total_steps=state.max_steps)
            if state.global_step > 0:  # resumed: its history after the checkpoint was dropped
                self.tokens_before = self.store.last_value(self.run_id, "num_tokens")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.store is None or not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:
            # The trainer's end-of-stretch summary (runtime, samples/s, the stretch's mean loss): train.log
            # prints it; as metrics it made one-point "curves" in the console's list after every stop or end.
            return
        logs = self._continued(logs)
        self.store.log_metrics(self.run_id, state.global_step, logs)
        self.last_logs.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    def _continued(self, logs: dict) -> dict:
        # trl counts the tokens trained on from 0 in each process, not in the checkpoint: a resumed run's
        # curve fell to 0 and climbed again. Its count carries on from the checkpoint's.
        if "num_tokens" not in logs:
            return logs
        if self.tokens_before is not None:  # the first count after a resume decides: restarted, or restored
            self.token_offset = self.tokens_before if logs["num_tokens"] < self.tokens_before else 0.0
            self.tokens_before = None
        return {**logs, "num_tokens": logs["num_tokens"] + self.token_offset} if self.token_offset else logs

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.store is None or not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.lineage is not None and path.is_dir():
            from engine.lineage import write_lineage

            write_lineage(path, self.lineage[0], self.run_id, self.lineage[1])
        self.store.add_checkpoint(self.run_id, state.global_step, str(path), self.last_logs, full_state=True)
        self.store.prune_checkpoints(self.run_id)
        from engine.disk_estimate import after_save

        limit = f"{self.lineage[0]}.train.save_total_limit" if self.lineage else "train.save_total_limit"
        # A stop's save and the last step's have no next save (should_training_stop is set before both)
        short = after_save(path, state.global_step, args.save_steps, limit, last=control.should_training_stop
                           or state.global_step >= state.max_steps)
        if short:  # a save ahead of the one that would fail
            log.warning(short)


class RecipeRates(TrainerCallback):
    """A resumed run trains at its recipe's learning rate and weight decay, not at its checkpoint's (an
    `--allow-change` resume that lowered them)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:
        if state.global_step > 0 and optimizer is not None and lr_scheduler is not None:
            from engine.resumed_rates import apply_recipe_rates

            # The Trainer's group 0 decays; group 1 (biases and norms) never does
            apply_recipe_rates(optimizer, lr_scheduler, args.learning_rate, args.weight_decay, decay_groups=[0])


class StopFlag:
    """SIGTERM sets it; `agreed()` tells every rank at once whether any rank saw it."""

    def __init__(self) -> None:
        from engine.run import catch_stops, stop_seen

        self.requested = stop_seen()  # a stop during set-up whose StopRequested was swallowed still stops
        catch_stops(self._on_signal, "stopping after this step, with a checkpoint")

    def _on_signal(self) -> None:
        self.requested = True

    def agreed(self) -> bool:
        # Ranks must agree, or one would enter the checkpoint's collectives alone and hang.
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        import torch

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class GracefulStop(TrainerCallback):
    """SIGTERM -> save a checkpoint and end training at the end of the current step."""

    def __init__(self) -> None:
        self.flag = StopFlag()
        self.stopped = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.flag.agreed():
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                # The stop came with the last step: the work is done, and the run ends as done, its export
                # written. Stopped here, its resume would train a step past max_steps (the trainer always
                # takes one before it checks).
                return
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
