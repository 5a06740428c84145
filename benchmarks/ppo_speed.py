"""Step time of one PPO step (scoring + one epoch of minibatch updates): hydra vs four separate models.

    python benchmarks/ppo_speed.py [--device cuda] [--shape bloom-560m] [--k 2 --k-v 2] [--steps 3]

Target: hydra step time <= 0.6x the four-model baseline at k = k_v = 2. Median of --steps timed steps
after one warm-up step. `python benchmarks/ppo_bench.py` prints this table and ppo_memory's from one
measurement.
"""

from ppo_bench import main_args, print_speed, run_all

if __name__ == "__main__":
    args = main_args(__doc__)
    print(f"PPO step time on {args.device}, k={args.k}, k_v={args.k_v}, median of {args.steps} steps\n")
    print_speed(run_all(args.shape, args.device, args.k, args.k_v, args.steps))
