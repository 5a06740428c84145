"""Hydra PPO: the model (`hydra`), PPO's pure functions (`core`), rollouts (`rollout`) and the loop (`trainer`)."""
