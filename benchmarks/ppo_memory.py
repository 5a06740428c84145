"""Peak memory and parameter bytes of one PPO step: hydra (k = k_v = 2) vs four separate models.

    python benchmarks/ppo_memory.py [--device cuda] [--shape bloom-560m] [--k 2 --k-v 2]

Target: hydra peak memory <= 0.45x the four-model baseline. CPU peak is the process's resident-set
growth (model, optimizer state and activations); CUDA peak is torch's max allocated.
`python benchmarks/ppo_bench.py` prints this table and ppo_speed's from one measurement.
"""

from ppo_bench import main_args, print_memory, run_all

if __name__ == "__main__":
    args = main_args(__doc__)
    print(f"PPO step memory on {args.device}, k={args.k}, k_v={args.k_v}\n")
    print_memory(run_all(args.shape, args.device, args.k, args.k_v, args.steps))
