"""Rule rewards for the PPO tests, importable as `tests.ppo_rewards:<name>` by a launched run."""


def share_of_letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """A dense toy signal: the share of the response's characters that are the letter a."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def always_nan(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken scorer: exercises the divergence guard."""
    return [float("nan")] * len(responses)


def slow_share_of_letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """The toy signal, after a pause: a step (and so a stop's save) that takes seconds to finish."""
    import time

    time.sleep(3.0)
    return share_of_letter_a(prompts, responses)
