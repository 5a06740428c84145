"""The PPO loop on the hydra, trlx style. One step, top to bottom:

    sample prompts -> generate (policy) -> score -> one no-grad hydra forward (old logprobs, reference
    logprobs, old values) -> per-token KL penalty + score -> GAE, whitened advantages -> PPO epochs over
    minibatches (clipped policy and value losses) -> KL controller -> metrics and samples to runs.db

Full-state checkpoints (`<run>/checkpoint-<step>/`): `policy/` (a plain Hugging Face folder), the
reference and value branches, optimizer, RNG per rank, and `ppo_state.json` (step, KL coefficient,
reward moments, data position, best score). SIGTERM saves one at the end of the step and stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from engine.config import PPOStage, Recipe, RecipeError, import_function
from engine.data import load_prompts
from engine.disk_estimate import after_save
from engine.knobs import trunk_cache_mode
from engine.lineage import model_id, write_lineage
from engine.models import load_causal_lm, load_exact, load_tokenizer, lora_config, precision_flags
from engine.ppo import core
from engine.ppo.hydra import Hydra, Trunk
from engine.ppo.rewards import FunctionScorer, RewardModelScorer, Scorer
from engine.ppo.rollout import Rollout, generate
from engine.resumed_rates import apply_recipe_rates
from engine.run import PPO_BRANCHES_FILE as BRANCHES_FILE
from engine.run import PPO_OPTIMIZER_FILE as OPTIMIZER_FILE
from engine.run import STATE_MARKERS, RunHandle, checkpoints_in, continue_from, resume_from, write_run_card
from engine.template import with_chat_template
from engine.track import StopFlag

log = logging.getLogger(__name__)
STATE_FILE = STATE_MARKERS["ppo"]


def _rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"  # RNG states and reference-score cache of one rank


@dataclass
class PPOState:
    step: int = 0
    data_position: int = 0  # prompts consumed, over all ranks
    kl: dict[str, float] = field(default_factory=dict)
    moments: dict[str, float] = field(default_factory=dict)
    ref_std: float | None = None
    best_score: float | None = None


class Diverged(RuntimeError):
    pass


@lru_cache(maxsize=2)
def _prompt_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return order


def prompt_indices(position: int, rank: int, world: int, size: int, count: int, seed: int) -> list[int]:
    """The prompts rank `rank` takes at global `position`: ranks take consecutive slices of one shuffled
    order per epoch, so together they see every prompt once per epoch."""
    picked = []
    for i in range(position + rank * size, position + (rank + 1) * size):
        epoch, index = divmod(i, count)
        picked.append(_prompt_order(count, seed, epoch)[index])
    return picked


def _scorer(recipe: Recipe, stage: PPOStage, device: torch.device) -> Scorer:
    if stage.reward_model is not None:
        return RewardModelScorer(stage.reward_model, device)
    try:
        return FunctionScorer(import_function(stage.reward_fn), device, stage.reward_fn)
    except ValueError as err:
        raise RecipeError(f"{recipe.where('ppo.reward_fn')}: ppo.{err}") from None


class PPOTrainer:
    def __init__(self, recipe: Recipe, handle: RunHandle):
        from accelerate import Accelerator

        self.trunk_cache = trunk_cache_mode()  # before any model is loaded
        self.recipe = recipe
        self.stage: PPOStage = recipe.stage("ppo")  # type: ignore[assignment]
        self.handle = handle
        flags = precision_flags(self.stage.precision, recipe.stage_model("ppo"))
        self.accelerator = Accelerator(mixed_precision="bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no")
        kind = self.accelerator.distributed_type.value
        if kind in ("DEEPSPEED", "FSDP"):
            raise RecipeError(f"PPO runs under plain data parallelism only, not {kind} (the hydra copies whole "
                              "layers; rank 0 saves the optimizer): use gpu.yaml or ddp.yaml")
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index

        spec = recipe.stage_model("ppo")
        # The one its exports carry, as the model has it: this one's left padding and truncation (and the
        # prompt length the fast tokenizer's backend keeps once it has truncated) would go with them.
        self.export_tokenizer = with_chat_template(load_tokenizer(spec))
        self.tokenizer = load_tokenizer(spec)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"  # keep the end of a long prompt: it is where the answer starts
        self.prompts = load_prompts(self.stage.prompts, recipe.seed, recipe.strict_data).train
        if self.accelerator.is_main_process:
            self._report_long_prompts(recipe)
            rollout = self.stage.rollout_batch_size * self.world
            if len(self.prompts) < rollout:
                # Not an error (sampled apart, a prompt's answers differ), but the rollout's "batch" is then
                # a few prompts' answers, and a tuner who meant a larger prompt set should hear it.
                log.warning("%s: %d prompts for a rollout of %d (ppo.rollout_batch_size %d x %d processes): "
                            "each rollout answers some prompts more than once", recipe.where("ppo.prompts"),
                            len(self.prompts), rollout, self.stage.rollout_batch_size, self.world)
            if self.stage.minibatch_size > self.stage.rollout_batch_size:
                log.warning("ppo.minibatch_size %d is more than ppo.rollout_batch_size %d: each minibatch is the "
                            "whole rollout", self.stage.minibatch_size, self.stage.rollout_batch_size)
        self.scorer = _scorer(recipe, self.stage, self.device)
        self.state = PPOState()
        if self.accelerator.is_main_process and handle.output_dir.is_dir():
            for left in clean_interrupted_saves(handle.output_dir):
                log.warning("removed %s: a save that never completed", left)
        self.accelerator.wait_for_everyone()
        self.resume_dir = self._resume_dir()

        # Resuming starts from the saved policy; in LoRA mode from the base model plus the saved adapters.
        from_saved = self.resume_dir is not None and self.stage.lora is None
        saved = spec.model_copy(update={"path": str(self.resume_dir / "policy")}) if from_saved else spec
        model = load_causal_lm(saved)
        self.hydra = Hydra(model, self.stage.num_layers_unfrozen, self.stage.value_layers, self.stage.trains_head,
                           lora_config(self.stage.lora) if self.stage.lora is not None else None)
        if self.resume_dir is not None:
            self.hydra.load_branch_state(torch.load(self.resume_dir / BRANCHES_FILE, map_location="cpu"))
            if from_saved:  # the folder loaded in the recipe's dtype: its float32 trainable parts come back exactly
                load_exact(self.hydra.policy, self.resume_dir / "policy",
                           [n for n, p in self.hydra.policy.named_parameters() if p.requires_grad])
        elif self.stage.init_value_from_rm:
            self.hydra.init_value_from(self.scorer.model)  # type: ignore[attr-defined]
            if self.accelerator.is_main_process:
                self._say_if_value_is_not_the_rm(self.scorer.model)  # type: ignore[attr-defined]
        if self.accelerator.mixed_precision == "no" and any(p.dtype != torch.float32 for p in model.parameters()):
            raise RecipeError(f"{recipe.where('ppo.precision')}: ppo.precision: a {model.dtype} model needs bf16 "
                              "or fp16 precision (its trainable branches train in float32 under autocast)")
        from transformers import get_scheduler

        value_params = {id(p) for p in self.hydra.value_branch_parameters()}
        trainable = [p for p in self.hydra.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in value_params]},  # group 0: the policy
                  {"params": [p for p in trainable if id(p) in value_params]}]
        # Fused on CUDA: one kernel for all parameters (the foreach update took 49 ms a step for the 1.8 B
        # trainable parameters of a 7b1 hydra on an H200).
        optimizer = torch.optim.AdamW(groups, lr=self.stage.lr, weight_decay=self.stage.weight_decay,
                                      fused=self.device.type == "cuda")
        self.model, self.optimizer = self.accelerator.prepare(self.hydra, optimizer)
        self.scheduler = get_scheduler(self.stage.lr_scheduler, self.optimizer, self.stage.warmup_steps,
                                       self.stage.steps)
        self.kl = core.KLController(self.stage.init_kl_coef, self.stage.target_kl, self.stage.kl_horizon)
        self.moments = core.RunningMoments()
        self.reference_scores: dict[str, float] = {}  # rendered prompt -> its baseline score, per rank
        if self.resume_dir is not None:
            self._load_state(self.resume_dir)
        else:  # ranks sample independently (the weights are broadcast from rank 0 anyway)
            torch.manual_seed(recipe.seed * 7919 + self.rank)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _resume_dir(self) -> Path | None:
        return resume_from(self.stage.resume_from_checkpoint, self.handle.output_dir, STATE_FILE)

    def _load_state(self, folder: Path) -> None:
        self.state = PPOState(**json.loads((folder / STATE_FILE).read_text()))
        self.kl.load_state_dict(self.state.kl)
        self.moments.load_state_dict(self.state.moments)
        saved = torch.load(folder / OPTIMIZER_FILE, map_location="cpu")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        apply_recipe_rates(self.optimizer, self.scheduler, self.stage.lr, self.stage.weight_decay)
        if saved["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        # Tensors and plain values only: a checkpoint is data, and unpickling arbitrary objects runs code.
        mine = torch.load(folder / _rank_file(self.rank), map_location="cpu", weights_only=True)
        random.setstate(mine["python"])
        torch.set_rng_state(mine["torch"])
        if torch.cuda.is_available() and mine.get("cuda") is not None:
            torch.cuda.set_rng_state_all(mine["cuda"])
        self.reference_scores = mine["reference_scores"]
        continue_from(self.handle, folder, self.state.step)

    def save(self, folder: Path, last: bool = False) -> None:
        """A full-state checkpoint, made whole before it is visible: every rank writes into
        `checkpoint-N.partial`, every file is fsync'ed, all ranks meet, rank 0 writes the marker (itself
        through a rename) and renames the folder into place. A crash at any point leaves the previous
        checkpoints as they were and at most a `.partial` folder, removed at the next start."""
        self.state.kl = self.kl.state_dict()
        self.state.moments = self.moments.state_dict()
        staging = folder.with_name(folder.name + ".partial")
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.export_policy(staging / "policy", merge=False)
            torch.save(self.hydra.branch_state(), staging / BRANCHES_FILE)
            scaler = self.accelerator.scaler
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None}, staging / OPTIMIZER_FILE)
        mine = {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "reference_scores": self.reference_scores}
        torch.save(mine, staging / _rank_file(self.rank))
        _fsync_tree(staging, only=_rank_file(self.rank))
        self.accelerator.wait_for_everyone()  # every rank's share is on disk before the marker
        if self.accelerator.is_main_process:
            _fsync_tree(staging)
            marker = staging / (STATE_FILE + ".tmp")
            marker.write_text(json.dumps(asdict(self.state)))
            _fsync_file(marker)
            os.replace(marker, staging / STATE_FILE)  # written last: a folder without it is never resumed from
            if folder.exists():  # a save of the same step (a stop right after a periodic save): replace it
                old = folder.with_name(folder.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
                os.replace(staging, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, folder)
            _fsync_file(folder.parent)
            self._rotate(keep=folder)
            short = after_save(folder, self.state.step, self.stage.save_steps, "ppo.save_total_limit", last=last)
            if short:  # a save ahead of the one that would fail
                log.warning(short)
            if self.handle.store is not None:
                self.handle.store.add_checkpoint(self.handle.run_id, self.state.step, str(folder),
                                                 {"best_score": self.state.best_score}, full_state=True)
                self.handle.store.prune_checkpoints(self.handle.run_id)
        self.accelerator.wait_for_everyone()

    def _rotate(self, keep: Path) -> None:
        limit = self.stage.save_total_limit
        if limit is None:
            return
        done = checkpoints_in(self.handle.output_dir, STATE_FILE)
        for old in [p for p in done if p != keep][: max(len(done) - limit, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def export_policy(self, folder: Path, merge: bool = True) -> None:
        """The policy as a model folder (a checkpoint's too: usable as a model, with its lineage)."""
        self.hydra.export(folder, merge)
        self.export_tokenizer.save_pretrained(folder)
        reward = ({"reward_model": model_id(self.stage.reward_model)} if self.stage.reward_model
                  else {"reward_fn": self.stage.reward_fn})
        write_lineage(folder, "ppo", self.handle.run_id, self.recipe.stage_model("ppo").path, **reward)

    def _say_if_value_is_not_the_rm(self, reward_model: Any) -> None:
        """The copied value branch gives the reward model's scores only on the trunk it was trained on: an RM
        that trained more layers than value_layers (or from another model) starts it on other features."""
        differ = self.hydra.trunk_differs_from(reward_model)
        if not differ and differ is not None:
            return
        where = self.recipe.where("ppo.init_value_from_rm")
        if differ is None:
            log.warning("%s: ppo.init_value_from_rm: the reward model's input embeddings differ from the policy's "
                        "(it trained them, or from another model): the copied value branch sits on other features "
                        "than it learned on, so its first values are not the reward model's scores", where)
            return
        needed = self.hydra.num_layers - differ[0]
        log.warning("%s: ppo.init_value_from_rm: the reward model's layers %d-%d differ from the policy's (it "
                    "trained them): the value branch copies its top %d layers onto the policy's, so its first values "
                    "are not the reward model's scores (ppo.value_layers: %d would copy every layer it trained)",
                    where, differ[0], differ[-1], self.hydra.k_v, needed)

    def _report_long_prompts(self, recipe: Recipe) -> None:
        """How many prompts `max_prompt_length` cuts (to their end), said once as SFT and RM say what their
        max_length truncates: a prompt cut at its start may have lost the question itself."""
        from engine.template import render_prompt

        limit = self.stage.max_prompt_length
        lengths = [len(ids) for ids in self.tokenizer([render_prompt(p) for p in self.prompts])["input_ids"]]
        cut = sum(n > limit for n in lengths)
        if cut:
            log.warning("%s: ppo.max_prompt_length=%d: %d of %d prompts are longer (the longest %d tokens) and "
                        "keep their last %d tokens", recipe.where("ppo.max_prompt_length"), limit, cut, len(lengths),
                        max(lengths), limit)

    # -- one step ---------------------------------------------------------------------------------------
    def _next_prompts(self) -> tuple[list, list[int]]:
        """This rank's prompts and their places in the global prompt stream (which fix their sampling noise)."""
        size = self.stage.rollout_batch_size
        first = self.state.data_position + self.rank * size
        indices = prompt_indices(self.state.data_position, self.rank, self.world, size, len(self.prompts),
                                 self.recipe.seed)
        self.state.data_position += size * self.world
        return [self.prompts[i] for i in indices], list(range(first, first + size))

    def _reference_scores(self, prompts: list) -> torch.Tensor:
        """The score of the reference branch's own answer to each prompt, sampled once per prompt."""
        from engine.template import render_prompt

        cache = self.reference_scores
        keys = [render_prompt(p) for p in prompts]
        missing = list({k: p for k, p in zip(keys, prompts) if k not in cache}.items())
        if missing:
            unwrapped = self.accelerator.unwrap_model(self.model)
            noise_keys = [zlib.crc32(k.encode("utf-8")) for k, _ in missing]  # the prompt's text fixes its noise
            with unwrapped.as_reference() as reference, self.accelerator.autocast():
                rollout = generate(reference, self.tokenizer, [p for _, p in missing], self.stage, noise_keys,
                                   self.recipe.seed + 1)
            for (key, _), score in zip(missing, self.scorer(rollout.prompts, rollout.responses).tolist()):
                cache[key] = score
        return torch.tensor([cache[k] for k in keys], device=self.device)

    def _scale(self, scores: torch.Tensor) -> torch.Tensor:
        mean, std = self.moments.update(scores, distributed=self.world > 1)
        if self.stage.scale_reward == "running":
            scores = scores / max(self.moments.std, 1e-8)
        elif self.stage.scale_reward == "ref":
            if self.state.ref_std is None:
                self.state.ref_std = std
            scores = scores / max(self.state.ref_std, 1e-8)
        return scores.clamp(-self.stage.cliprange_reward, self.stage.cliprange_reward)

    def _forward(self, model: Any, batch: Rollout, with_ref: bool, trunk: Trunk | None = None,
                 keep_trunk: bool = False) -> tuple[Any, ...]:
        """Log-probs, reference log-probs and values at the positions that emit each response token, and
        the trunk's output with `keep_trunk` (for `trunk=` in the update forwards, which skip the trunk).

        Only the last R + 1 positions get logits: a prompt's logits would cost [B, P, vocab] for nothing.
        """
        response = batch.response_ids.shape[1]
        with self.accelerator.autocast():
            out = model(batch.input_ids, batch.attention_mask, with_values=True, with_ref=with_ref,
                        logits_to_keep=response + 1, keep_trunk=keep_trunk, trunk=trunk)
        tokens = batch.response_ids
        # At the rollouts' temperature: the policy whose samples these are (the ratio's, the KL's, the entropy's)
        t = self.stage.temperature
        logprobs = core.logprobs_of(out.logits, tokens, drop_last=True, temperature=t)
        ref = core.logprobs_of(out.ref_logits, tokens, drop_last=True, temperature=t) \
            if out.ref_logits is not None else None
        values = out.values[:, batch.prompt_length - 1 : -1].float()
        return logprobs, ref, values, out.trunk

    def _minibatches(self, rollout: Rollout, order: torch.Tensor) -> list[tuple[torch.Tensor, Rollout]]:
        size = self.stage.minibatch_size
        return [
            (idx, Rollout([], rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_length,
                          rollout.response_mask[idx], []))
            for idx in order.split(size)
        ]

    def step(self) -> dict[str, float]:
        stage = self.stage
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.eval()  # no dropout anywhere: the first PPO epoch's ratio must start at exactly 1

        # The trunk once per rollout (see engine/ppo/hydra.py and trunk_cache_mode): the BLOOM decoder computes
        # it anyway as it samples.
        cache = self.trunk_cache if unwrapped.trunk_cacheable else "off"
        capture = unwrapped.trunk_layers if cache == "on" else ()

        t0 = time.perf_counter()
        prompts, keys = self._next_prompts()
        with self.accelerator.autocast():
            rollout = generate(unwrapped.policy, self.tokenizer, prompts, stage, keys, self.recipe.seed, capture)
        raw_scores = self.scorer(rollout.prompts, rollout.responses).float()
        cut = rollout.cut_short(self.tokenizer.eos_token_id)
        rewarded = raw_scores - stage.missing_eos_penalty * cut if stage.missing_eos_penalty else raw_scores
        baseline = self._reference_scores(prompts) if stage.score_baseline == "reference" else None
        scores = self._scale(rewarded - baseline if baseline is not None else rewarded)
        t_rollout = time.perf_counter() - t0

        t0 = time.perf_counter()
        # On the GPU only now: until here its memory served the reward model and the baseline's decode.
        decoded = unwrapped.trunk_from(rollout.trunk.join(self.device)) if rollout.trunk is not None else None
        rollout.trunk = None  # `decoded` holds it (the rollout lives on into the samples)
        keep = cache != "off" and decoded is None
        with torch.no_grad():  # in minibatches: the whole rollout's logits at once would not fit for real models
            parts = [self._forward(unwrapped, mb, with_ref=True, keep_trunk=keep,
                                   trunk=decoded.rows(idx) if decoded is not None else None)
                     for idx, mb in self._minibatches(rollout, torch.arange(len(prompts), device=self.device))]
            old_logprobs, ref_logprobs, old_values = (torch.cat(p) for p in list(zip(*parts))[:3])
            trunk = Trunk.cat([p[3] for p in parts]) if keep else decoded
            del parts  # the per-minibatch trunk parts: joined above, a second copy of the cache otherwise
        mask = rollout.response_mask
        log_ratio = (old_logprobs - ref_logprobs) * mask
        kl_k3 = ((torch.exp(-log_ratio) - 1) + log_ratio) * mask
        kl_coef = self.kl.value  # what this step's rewards pay; the controller moves it for the next step
        rewards = core.shaped_rewards(log_ratio, mask, scores, kl_coef)
        advantages, returns = core.gae(old_values, rewards, mask, stage.gamma, stage.lam)
        advantages = core.whiten(advantages, mask, distributed=self.world > 1)
        t_forward = time.perf_counter() - t0

        t0 = time.perf_counter()
        # Value warm-up trains the value branch alone: the policy gets no gradient (its loss term is kept
        # at weight 0 only under DDP, whose reducer waits for every parameter), no share of the gradient
        # clip and no optimizer step, so neither its weights nor its AdamW state move.
        warmup = self.state.step < stage.value_warmup_steps
        self.optimizer.param_groups[0]["lr"] = self.scheduler.get_last_lr()[0]
        policy_params = self.optimizer.param_groups[0]["params"]
        sums: dict[str, torch.Tensor] = {}
        updates = 0
        for _ in range(stage.ppo_epochs):
            for idx, mb in self._minibatches(rollout, torch.randperm(len(prompts), device=mask.device)):
                logprobs, _, values, _ = self._forward(self.model, mb, with_ref=False,
                                                       trunk=trunk.rows(idx) if trunk is not None else None)
                pg_loss, pg_stats = core.policy_loss(logprobs, old_logprobs[idx], advantages[idx], mb.response_mask,
                                                     stage.cliprange)
                vf_loss, vf_stats = core.value_loss(values, old_values[idx], returns[idx], mb.response_mask,
                                                    stage.cliprange_value)
                loss = pg_loss + stage.vf_coef * vf_loss
                if warmup:
                    loss = stage.vf_coef * vf_loss + (0.0 * pg_loss if self.world > 1 else 0.0)
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                if warmup:
                    for param in policy_params:
                        param.grad = None  # AdamW skips a parameter without a gradient entirely
                norm = None
                if stage.max_grad_norm is not None:  # the norm before clipping (None under DeepSpeed's own)
                    norm = self.accelerator.clip_grad_norm_(self.model.parameters(), stage.max_grad_norm)
                self.optimizer.step()
                # Summed on the device: a float() here would wait for the GPU at every minibatch and leave it
                # idle while Python prepares the next one.
                for name, value in {"losses/total_loss": loss, "losses/policy_loss": pg_loss,
                                    "losses/value_loss": vf_loss, **pg_stats, **vf_stats,
                                    **({"grad_norm": norm} if norm is not None else {})}.items():
                    value = torch.as_tensor(value, device=mask.device).detach().double()
                    sums[name] = sums[name] + value if name in sums else value
                updates += 1
        lr_used = 0.0 if warmup else self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if mask.is_cuda:
            torch.cuda.synchronize(mask.device)  # the updates are queued, not done, until the GPU says so
        t_backward = time.perf_counter() - t0

        mean_kl = self._global_mean((log_ratio.sum(1)))
        self.kl.update(mean_kl, n_steps=len(prompts) * self.world)
        tokens = float(self._global_sum(mask.sum()))
        totals = torch.stack(list(sums.values())).tolist()  # the one wait for the update's numbers
        # How much of the returns the value branch predicted: 1 all, 0 no better than their mean, < 0 worse
        residual_var = float(core.masked_mean_var(returns - old_values, mask, self.world > 1)[1])
        returns_var = float(core.masked_mean_var(returns, mask, self.world > 1)[1])
        metrics = {name: total / updates for name, total in zip(sums, totals)}
        metrics.update({
            "rollout_scores/mean": self._global_mean(raw_scores),
            "rollout_scores/std": math.sqrt(float(core.masked_mean_var(raw_scores, torch.ones_like(raw_scores),
                                                                        self.world > 1)[1])),
            "rollout_scores/scaled_mean": self._global_mean(scores),
            "policy/kl_per_token": self._global_masked_mean(log_ratio, mask),
            "policy/kl_k3_per_token": self._global_masked_mean(kl_k3, mask),
            # −log p of the tokens sampled: the policy's entropy per token (at its sampling temperature),
            # estimated from its own samples (exactly so without top-k/p; with them, a cross-entropy). It falls as
            # the policy collapses onto a few answers, before the reward or the KL shows it.
            "policy/entropy_per_token": -self._global_masked_mean(old_logprobs, mask),
            "policy/sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
            "kl_ctl_value": kl_coef,
            "values/mean": self._global_masked_mean(old_values, mask),
            "values/explained_variance": 1.0 - residual_var / max(returns_var, 1e-12),
            "returns/mean": self._global_masked_mean(returns, mask),
            "padding_percentage": 1.0 - self._global_mean(mask),
            "response_length/mean": self._global_mean(mask.sum(1)),
            "response_length/cut_share": self._global_mean(cut),
            "time/rollout": t_rollout,
            "time/forward": t_forward,
            "time/backward": t_backward,
            "time/tokens_per_s": tokens / max(t_rollout + t_forward + t_backward, 1e-9),
            "learning_rate": lr_used,
        })
        if baseline is not None:
            metrics["rollout_scores/reference_mean"] = self._global_mean(baseline)
        self._samples = list(zip(rollout.prompts, rollout.responses, raw_scores.tolist()))
        return metrics

    def _global_mean(self, x: torch.Tensor) -> float:
        stats = torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)])
        stats = core._all_reduce_sum(stats) if self.world > 1 else stats
        return float(stats[0] / stats[1].clamp(min=1))

    def _global_masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        return float(core.masked_mean_var(x.float(), mask, distributed=self.world > 1)[0])

    def _global_sum(self, x: torch.Tensor) -> float:
        return float(core._all_reduce_sum(x.float().reshape(1)) if self.world > 1 else x)

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self) -> Path:
        from engine.template import render_prompt

        stage, handle, store = self.stage, self.handle, self.handle.store
        stop = StopFlag()
        if store is not None:
            store.update_run(handle.run_id, total_steps=stage.steps)
        if self.accelerator.is_main_process:
            final = (handle.output_dir / "final").resolve()
            write_run_card(handle, "ppo", self.recipe.stage_model("ppo").path,
                           f"the policy, once the run has finished (the value branch is not in it); its "
                           f"`rlhf_lineage.json` names every run it comes from and its reward. Load it with "
                           f"`transformers.AutoModelForCausalLM.from_pretrained(\"{final}\")`.",
                           "the full-state saves a resume continues from: `policy/` (a model folder), "
                           "`branches.pt` (reference and value branches), the optimizer, each rank's RNG and the "
                           "PPO state")
        while self.state.step < stage.steps:
            metrics = self.step()
            self.state.step += 1
            bad = [name for name, value in metrics.items() if not math.isfinite(value)]
            any_bad = self._global_sum(torch.tensor(float(bool(bad)), device=self.device)) > 0
            score = metrics["rollout_scores/mean"]
            if self.state.best_score is None or score > self.state.best_score:
                self.state.best_score = score
            if self.accelerator.is_main_process:  # what the terminal (and train.log) shows of each step
                log.info("step %d/%d: score %.4f, kl/token %.4f, response length %.1f, %.1f s",
                         self.state.step, stage.steps, score, metrics["policy/kl_per_token"],
                         metrics["response_length/mean"],
                         metrics["time/rollout"] + metrics["time/forward"] + metrics["time/backward"])
            if store is not None:
                store.log_metrics(handle.run_id, self.state.step, metrics)
                kept = self._samples[: stage.samples_per_step]
                store.add_samples(handle.run_id, self.state.step, [(render_prompt(p), r, s) for p, r, s in kept])
            if any_bad:  # every rank stops together, or the others would wait for it forever
                what = f"{', '.join(bad)} became {metrics[bad[0]]}" if bad else "another rank's metrics became NaN/inf"
                if "rollout_scores/mean" in bad:  # the scores came so: the reward is the cause, not the update
                    source = f"reward_fn {stage.reward_fn}" if stage.reward_fn else f"reward model {stage.reward_model}"
                    what = (f"the rollouts' scores became {score}: the {source} gave a score that is not a "
                            f"finite number; then {what}")
                raise Diverged(f"{what} at step {self.state.step}")
            # A stop that comes with the last step lets the run finish: its export, done (stopped there, a
            # resume would have nothing left to train).
            stopping = stop.agreed() and self.state.step < stage.steps
            if stopping or self.state.step % stage.save_steps == 0 or self.state.step == stage.steps:
                self.save(handle.output_dir / f"checkpoint-{self.state.step}",
                          last=stopping or self.state.step == stage.steps)
            if stopping:
                handle.status = "stopped"
                return handle.output_dir / f"checkpoint-{self.state.step}"
        final = handle.output_dir / "final"
        if self.accelerator.is_main_process:
            self.export_policy(final)
            if store is not None:
                store.add_checkpoint(handle.run_id, self.state.step, str(final), {"best_score": self.state.best_score})
        self.accelerator.wait_for_everyone()
        log.info("rank %d trainable weights digest %s", self.rank, weights_digest(self.hydra))
        return final


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path, only: str | None = None) -> None:
    """fsync every file under `root` (or just the one named `only`) and the folders holding them."""
    for folder, _, files in os.walk(root):
        for name in files:
            if only is None or name == only:
                _fsync_file(Path(folder) / name)
        _fsync_file(Path(folder))


def clean_interrupted_saves(output_dir: Path) -> list[Path]:
    """Remove what saves that never completed left behind (`.partial`, `.old` folders)."""
    left = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.endswith((".partial", ".old"))]
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return left


def weights_digest(hydra: Hydra) -> str:
    """A hash of every trainable parameter: ranks of a data-parallel run must print the same one."""
    digest = hashlib.sha256()
    for name, param in hydra.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_ppo(recipe: Recipe, handle: RunHandle) -> Path:
    trainer = PPOTrainer(recipe, handle)
    try:
        return trainer.train()
    except Diverged as err:
        handle.status = "diverged"
        if handle.store is not None:
            handle.store.update_run(handle.run_id, error=str(err))
        log.error("run diverged: %s", err)
        return handle.output_dir
