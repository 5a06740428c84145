"""Peak memory and parameter bytes of one PPO step: hydra (k = k_v = 2) vs four separate models.

    python benchmarks/ppo_memory.py [--device cuda] [--shape bloom-560m] [--k 2 --k-v 2]

Target: hydra peak memory <= 0.45x the four-model baseline. CPU peak is the process's resident-set
growth (model, optimizer state and activations); CUDA peak is torch's max allocated.
"""

from ppo_bench import gib, main_args, run_all

if __name__ == "__main__":
    args = main_args(__doc__)
    print(f"PPO step memory on {args.device}, k={args.k}, k_v={args.k_v}\n")
    print("| shape | set-up | parameters | trainable params | peak memory | peak vs separate | params vs separate |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in run_all(args.shape, args.device, args.k, args.k_v, args.steps):
        base = row["separate"]
        for result in row.values():
            if "error" in result:
                print(f"| {result['shape']} | {result['setup']} | {result['error']} | | | | |")
                continue
            ratios = "- | -"
            if result is not base and "error" not in base:
                ratios = (f"{result['peak_bytes'] / base['peak_bytes']:.2f}x | "
                          f"{result['param_bytes'] / base['param_bytes']:.2f}x")
            print(f"| {result['shape']} | {result['setup']} | {gib(result['param_bytes'])} | "
                  f"{result['trainable_params']:,} | {gib(result['peak_bytes'])} | {ratios} |")
