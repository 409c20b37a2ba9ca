"""Recall@K on the Omniglot benchmark for several training settings, over several seeds.

Each setting is a set of TrainConfig overrides; every run trains from scratch
with `run_training` (no export) and records R@1..R@8, wall time and step time.
Prints a table of means and standard deviations and writes
benchmarks/results/omniglot_<grid>.json.

    python benchmarks/omniglot_recall.py --grid memory --seeds 0,1,2
    python benchmarks/omniglot_recall.py --grid normalization --seeds 0,1,2

Grids:
- memory: the defaults against the same run with --no-memory.
- normalization: each normalisation of the pair terms at several learning
  rates with a memory of 2048, and no memory at the same learning rates.
"""

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_xbm.training import TrainConfig, run_training

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "omniglot")

GRIDS = {
    "memory": {
        "defaults (memory)": {},
        "no memory": {"memory_size": 0},
    },
    "normalization": {
        f"{name}, memory 2048, lr {lr:g}": {"normalization": name, "memory_size": 2048, "learning_rate": lr}
        for name, rates in (("batch", (1e-3, 3e-4, 1e-4)), ("pairs", (1e-3, 3e-4, 1e-4)), ("anchor", (1e-3, 3e-4)))
        for lr in rates
    }
    | {f"no memory, lr {lr:g}": {"memory_size": 0, "learning_rate": lr} for lr in (1e-3, 3e-4, 1e-4)},
}


def summarize(values):
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="memory", help="settings to compare (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Omniglot folder (default: ../shared/data/omniglot)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: TrainConfig's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(seed) for seed in args.seeds.split(",")]

    runs = []
    for name, overrides in GRIDS[args.grid].items():
        for seed in seeds:
            with tempfile.TemporaryDirectory() as output_dir:
                settings = dict(overrides, seed=seed, data_dir=args.data_dir, output_dir=output_dir, export=False, verbose=0)
                if args.steps:
                    settings["steps"] = args.steps
                config = TrainConfig(**settings)
                results = run_training(config)
            run = {"setting": name, "seed": seed, "overrides": overrides}
            run.update({key: value for key, value in results.items() if key != "config"})
            run["config"] = results["config"]
            runs.append(run)
            print(f"{name:34s} seed {seed}: R@1 {run['recall@1']:.4f}  {run['train_seconds']:.0f} s", file=sys.stderr)

    rows = []
    for name in GRIDS[args.grid]:
        selected = [run for run in runs if run["setting"] == name]
        row = {"setting": name, "runs": len(selected)}
        for key in ("recall@1", "recall@4", "step_ms", "train_seconds"):
            row[key], row[key + "_std"] = summarize([run[key] for run in selected])
        rows.append(row)

    defaults = {key: value for key, value in dataclasses.asdict(TrainConfig()).items() if key not in ("data_dir",)}
    path = os.path.join(RESULTS_DIR, f"omniglot_{args.grid}.json")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"grid": args.grid, "seeds": seeds, "defaults": defaults, "load_average": os.getloadavg(), "rows": rows, "runs": runs}, handle, indent=2, default=list)

    print("| setting | R@1 mean ± sd | R@4 mean ± sd | ms/step | runs |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['recall@1']:.3f} ± {row['recall@1_std']:.3f} | "
            f"{row['recall@4']:.3f} ± {row['recall@4_std']:.3f} | {row['step_ms']:.1f} | {row['runs']} |"
        )
    print(f"Results: {path}")


if __name__ == "__main__":
    main()
