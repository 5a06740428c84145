"""Rule rewards for the PPO tests, importable as `tests.ppo_rewards:<name>` by a launched run."""


def share_of_letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """A dense toy signal: the share of the response's characters that are the letter a."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def nan_after_a_while(prompts: list[str], responses: list[str]) -> list[float]:
    """Scores that turn into NaN once the responses contain a zero: exercises the divergence guard."""
    return [float("nan")] * len(responses)
