"""Step time of one PPO step (scoring + one epoch of minibatch updates): hydra vs four separate models.

    python benchmarks/ppo_speed.py [--device cuda] [--shape bloom-560m] [--k 2 --k-v 2] [--steps 3]

Target: hydra step time <= 0.6x the four-model baseline at k = k_v = 2. Median of --steps timed steps
after one warm-up step.
"""

from ppo_bench import main_args, run_all

if __name__ == "__main__":
    args = main_args(__doc__)
    print(f"PPO step time on {args.device}, k={args.k}, k_v={args.k_v}, median of {args.steps} steps\n")
    print("| shape | set-up | step (s) | vs separate |")
    print("|---|---|---:|---:|")
    for row in run_all(args.shape, args.device, args.k, args.k_v, args.steps):
        base = row["separate"]
        for result in row.values():
            if "error" in result:
                print(f"| {result['shape']} | {result['setup']} | {result['error']} | - |")
                continue
            ratio = "-" if result is base or "error" in base else f"{result['step_s'] / base['step_s']:.2f}x"
            print(f"| {result['shape']} | {result['setup']} | {result['step_s']:.3f} | {ratio} |")
