"""Rule rewards for the PPO tests, importable as `tests.ppo_rewards:<name>` by a launched run."""


def share_of_letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """A dense toy signal: the share of the response's characters that are the letter a."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def always_nan(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken scorer: exercises the divergence guard."""
    return [float("nan")] * len(responses)
