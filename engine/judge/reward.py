"""The project's reward model as an offline judge.

Score of an answer: σ(r(answer) − r(reference)) where the item has a reference answer — 0.5 means as good
as the reference, toward 1 better — and σ((r(answer) − μ) / s) where it has none, μ and s being the mean
and standard deviation of the reward model's rewards of the eval set's reference answers (so a typical
reference scores 0.5 there too). No call leaves the machine. Within a run each reference is scored once
(calibration's figure serves its item's verdict); nothing is kept between runs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from engine.belle import Item
from engine.judge import SCORED, Verdict
from engine.template import Turn

CALIBRATION_CHUNK = 64  # references scored between two looks for a stop


def rm_judge_label(path: str) -> str:
    """The reward model judge's name in verdicts: its folder, and when the model in it was exported (its
    lineage's `written`). A folder exported again (a resumed RM run) holds another judge: its scores are not
    to be ranked or paired with the earlier model's as if one judge gave both."""
    import datetime

    from engine.lineage import read_lineage

    written = (read_lineage(path) or {}).get("written")
    if not isinstance(written, (int, float)):
        return f"rm:{path}"
    stamp = datetime.datetime.fromtimestamp(written, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"rm:{path} (exported {stamp})"


class RewardJudge:
    name = "rm"

    def __init__(self, path: str, device: str | None = None, batch_size: int = 16, label: str | None = None):
        """`label`: the name a resumed run's verdicts carry already (one run, one judge's name)."""
        import torch

        from engine.ppo.rewards import RewardModelScorer

        self.path = path
        self.label = label or rm_judge_label(path)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.scorer = RewardModelScorer(path, target, batch_size=batch_size)
        self.mu, self.sigma = 0.0, 1.0
        self.reference_rewards: dict[int, float] = {}  # item id -> its reference's reward, from calibrate

    def _rewards(self, items: Sequence[Item], answers: Sequence[str]) -> list[float]:
        prompts = [(Turn("user", item.question),) for item in items]
        return self.scorer(prompts, list(answers)).tolist() if items else []

    def calibrate(self, items: Sequence[Item], stopped: Callable[[], bool] = lambda: False) -> bool:
        """μ and s from the rewards of the references of `items` (those that have one); False if `stopped`
        said so first (checked between chunks: the whole eval set's references take minutes on a CPU)."""
        with_ref = [i for i in items if i.reference.strip()]
        rewards: list[float] = []
        for start in range(0, len(with_ref), CALIBRATION_CHUNK):
            if stopped():
                return False
            chunk = with_ref[start : start + CALIBRATION_CHUNK]
            scored = self._rewards(chunk, [i.reference for i in chunk])
            self.reference_rewards.update(zip((i.id for i in chunk), scored))
            rewards += scored
        if len(rewards) >= 2:
            self.mu = sum(rewards) / len(rewards)
            var = sum((r - self.mu) ** 2 for r in rewards) / (len(rewards) - 1)
            self.sigma = max(math.sqrt(var), 1e-6)
        return True

    def judge(self, items: Sequence[Item], answers: Sequence[str]) -> list[Verdict]:
        rewards = self._rewards(items, answers)
        with_ref = [k for k, item in enumerate(items) if item.reference.strip()]
        # Calibration scored these references already: the same figure, not a second forward of each.
        unknown = [items[k] for k in with_ref if items[k].id not in self.reference_rewards]
        scored = self._rewards(unknown, [i.reference for i in unknown])
        self.reference_rewards.update(zip((i.id for i in unknown), scored))
        refs = {k: self.reference_rewards[items[k].id] for k in with_ref}
        verdicts = []
        for k, reward in enumerate(rewards):
            if k in refs:
                score = _sigmoid(reward - refs[k])
                reply = f"reward {reward:.4f} against the reference's {refs[k]:.4f}: sigmoid of the difference"
            else:
                score = _sigmoid((reward - self.mu) / self.sigma)
                reply = (f"reward {reward:.4f}, no reference: sigmoid((r - {self.mu:.4f}) / {self.sigma:.4f}), "
                         "the references' mean and std")
            verdicts.append(Verdict(score, SCORED, reply))
        return verdicts


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
