"""What each curve the trainers and evaluations log means, for the help screen: the names are trlx's and
trl's, terse to anyone who did not write them."""

from __future__ import annotations

MEANINGS: dict[str, str] = {
    # PPO (engine/ppo): per step, over that step's rollout
    "rollout_scores/mean": "PPO: the reward (model or function) of the step's answers, before scaling",
    "rollout_scores/std": "PPO: their spread; the running std divides the scores with scale_reward: running",
    "rollout_scores/scaled_mean": "PPO: the scores as the advantages see them (scaled, clipped)",
    "rollout_scores/reference_mean": "PPO: the score of the reference's own answers (score_baseline: reference)",
    "policy/kl_per_token": "PPO: log p - log p_ref per response token (k1): what the KL penalty charges; "
                           "its mean is >= 0, and grows as the policy leaves the reference",
    "policy/kl_k3_per_token": "PPO: the k3 estimate of the same KL (never negative, less noisy), logged only",
    "policy/sqrt_kl": "PPO: the square root of the KL per answer, summed over its tokens",
    "kl_ctl_value": "PPO: the KL coefficient paid this step (adaptive: moves toward target_kl)",
    "policy/approx_kl": "PPO: how far the updates moved the policy from the rollout's (not from the reference)",
    "policy/clipfrac": "PPO: share of tokens whose ratio the clip (cliprange) cut: high, the steps are too large",
    "ratio": "PPO: new / old probability of the sampled tokens over the epochs (1 at the first minibatch)",
    "policy/entropy_per_token": "PPO: -log p of the sampled tokens; falling fast, the answers collapse",
    "losses/policy_loss": "PPO: the clipped policy-gradient loss",
    "losses/value_loss": "PPO: the value branch's clipped regression loss (x vf_coef in the total)",
    "losses/total_loss": "PPO: policy loss + vf_coef x value loss",
    "values/mean": "PPO: the value branch's estimate over response tokens",
    "values/values_error": "PPO: its squared error against the returns",
    "values/clipfrac": "PPO: share of values the value clip (cliprange_value) cut",
    "returns/mean": "PPO: the GAE returns the value branch is trained toward",
    "values/explained_variance": "PPO: 1 - Var(returns - values) / Var(returns): 1 the value branch predicts the "
                                 "returns, 0 no better than their mean, below 0 worse",
    "response_length/mean": "PPO: response tokens per answer (max_new_tokens: none stopped early)",
    "response_length/cut_share": "PPO: share of answers max_new_tokens cut before their EOS (rising: the policy "
                                 "learns length; missing_eos_penalty punishes it)",
    "padding_percentage": "PPO: share of the response batch that is padding",
    "time/rollout": "PPO: seconds generating the step's answers",
    "time/forward": "PPO: seconds scoring them (policy, reference and values)",
    "time/backward": "PPO: seconds of the update epochs",
    "time/tokens_per_s": "PPO: response tokens per second over the whole step",
    "learning_rate": "the learning rate this step",
    # SFT and RM (trl's Trainer)
    "loss": "SFT: cross-entropy of the answers' tokens; RM: -log sigmoid(chosen - rejected)",
    "eval_loss": "the same loss on the held-out records (eval_ratio)",
    "mean_token_accuracy": "SFT: share of answer tokens the model predicts as its top choice",
    "eval_accuracy": "RM: share of held-out pairs whose chosen answer scores above the rejected",
    "eval_margin": "RM: mean reward of chosen minus rejected on the held-out pairs",
    "entropy": "SFT: the model's mean entropy over answer tokens (its uncertainty; falling as it fits)",
    "accuracy": "RM: share of the step's pairs whose chosen answer scores above the rejected",
    "margin": "RM: mean reward of chosen minus rejected in the step",
    "mean_reward": "RM: mean reward the model gives the step's answers (chosen and rejected)",
    "min_reward": "RM: the lowest of them",
    "max_reward": "RM: the highest of them",
    "eval_runtime": "seconds the held-out evaluation took",
    "eval_samples_per_second": "held-out records evaluated per second",
    "eval_steps_per_second": "held-out batches evaluated per second",
    "eval_<name>": "<name> on the held-out records (eval_ratio), at each evaluation",
    "grad_norm": "the gradient's norm before clipping (max_grad_norm)",
    "epoch": "passes over the training records so far",
    "num_tokens": "training tokens seen so far",
    # Evaluations (rlhf eval belle)
    "eval/answered": "evaluation: questions answered so far",
    "eval/judged": "evaluation: answers the judge has given a verdict on",
    "eval/score_mean": "evaluation: mean 0-1 score over the scored answers (all categories alike)",
    "eval/score_macro": "evaluation: the mean of the categories' means (the table's macro column)",
    "eval/unscored": "evaluation: verdicts with no score in them (asked again by a resume)",
    "eval/failed": "evaluation: judge calls that failed (after their retries)",
    "eval/tokens_per_s": "evaluation: answer tokens generated per second",
}


def meaning(name: str) -> str | None:
    """What a logged metric is: its own entry, or an evaluation's of the held-out records (eval_X)."""
    if name in MEANINGS:
        return MEANINGS[name]
    if name.startswith("eval_") and name[len("eval_"):] in MEANINGS:
        return f"{MEANINGS[name[len('eval_'):]]}, on the held-out records"
    return None
