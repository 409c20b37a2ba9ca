"""Plain FIFO memory against the momentum-updated memories on the Omniglot benchmark.

Four parts:

- `recall`: trains each setting with `run_training` (TrainConfig defaults,
  batch 16, the same number of steps) for each seed, with a `MemoryDrift`
  callback on the settings that have a memory. Each run is written to
  benchmarks/results/momentum_memory/<setting>_seed<seed>.json as soon as it
  ends, and a run whose file exists is skipped, so several processes can share
  the settings (`--settings`) and an interrupted sweep resumes.
- `timing`: step time of every setting in one process, on random images of the
  Omniglot shape, so the ratios are comparable on a shared machine. Run it
  under the timing lock:
  `flock /tmp/keras_xbm_timing.lock python benchmarks/momentum_memory.py timing`.
- `drift`: the same training runs with a training-mode `MemoryDrift` over every
  stored entry, written to benchmarks/results/momentum_memory_drift/.
- `report`: reads them all, prints the Markdown table (R@1 and R@4 mean and
  standard deviation over seeds, step time), writes
  benchmarks/results/momentum_memory.json and the drift figure
  docs/figures/memory_drift.png.

    python benchmarks/momentum_memory.py recall [--settings fifo,no-memory] [--seeds 0,1,2]
    python benchmarks/momentum_memory.py drift --settings fifo,encoder-0.99,encoder-0.999,bank-0.5 --seeds 0
    flock /tmp/keras_xbm_timing.lock python benchmarks/momentum_memory.py timing
    python benchmarks/momentum_memory.py report
"""

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from keras_xbm.data import load_omniglot
from keras_xbm.diagnostics import MemoryDrift, plot_memory_drift
from keras_xbm.training import TrainConfig, build_model, run_training

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS_DIR = os.path.join(HERE, "results", "momentum_memory")
DRIFT_DIR = os.path.join(HERE, "results", "momentum_memory_drift")
TIMING_PATH = os.path.join(HERE, "results", "momentum_memory_timing.json")
SUMMARY_PATH = os.path.join(HERE, "results", "momentum_memory.json")
FIGURE_PATH = os.path.join(HERE, "..", "docs", "figures", "memory_drift.png")
DEFAULT_DATA_DIR = os.path.join(HERE, "..", "..", "shared", "data", "omniglot")
OMNIGLOT_TRAIN_IMAGES = 2720

SETTINGS = {
    "fifo": {"memory": "fifo"},
    "encoder-0.99": {"memory": "momentum-encoder", "momentum": 0.99},
    "encoder-0.999": {"memory": "momentum-encoder", "momentum": 0.999},
    "bank-0.5": {"memory": "momentum-bank", "momentum": 0.5},
    "no-memory": {"memory_size": 0},
}
LABELS = {
    "fifo": "plain FIFO memory",
    "encoder-0.99": "momentum encoder, m = 0.99",
    "encoder-0.999": "momentum encoder, m = 0.999",
    "bank-0.5": "per-sample bank, m = 0.5",
    "no-memory": "no memory",
}
DRIFT_MEASUREMENTS = 6
AGE_BIN_STEPS = 8


def run_recall(settings, seeds, data_dir, steps, runs_dir=RUNS_DIR, drift_training=False, drift_sample_size=512):
    os.makedirs(runs_dir, exist_ok=True)
    train, _ = load_omniglot(data_dir, image_size=TrainConfig().image_size)
    for name in settings:
        for seed in seeds:
            path = os.path.join(runs_dir, f"{name}_seed{seed}.json")
            if os.path.exists(path):
                continue
            keras.backend.clear_session()
            overrides = dict(SETTINGS[name])
            config_steps = steps or TrainConfig().steps
            callbacks = []
            drift = None
            if overrides.get("memory_size", 1):
                drift = MemoryDrift(
                    train.images,
                    every_n_steps=max(1, config_steps // DRIFT_MEASUREMENTS),
                    sample_size=drift_sample_size,
                    age_bin_steps=AGE_BIN_STEPS,
                    training=drift_training,
                    seed=seed,
                )
                callbacks.append(drift)
            with tempfile.TemporaryDirectory() as output_dir:
                config = TrainConfig(
                    **overrides, seed=seed, data_dir=data_dir, output_dir=output_dir, export=False, verbose=0,
                    **({"steps": steps} if steps else {}),
                )
                results = run_training(config, callbacks=callbacks)
            run = {"setting": name, "seed": seed, "overrides": overrides, "load_average": os.getloadavg()}
            run.update(results)
            run["drift"] = drift.records if drift else []
            with open(path, "w") as handle:
                json.dump(run, handle, indent=2, default=list)
            print(f"{name:14s} seed {seed}: R@1 {run['recall@1']:.4f}  {run['train_seconds']:.0f} s", file=sys.stderr)


def time_setting(name, steps, batch_size=16, image_size=32):
    """Return the mean milliseconds of one XLA-compiled train step of a setting, on random images."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    config = TrainConfig(**SETTINGS[name], data_dir="unused", batch_size=batch_size, image_size=image_size)
    model = build_model(config, (image_size, image_size, 1), num_train_samples=OMNIGLOT_TRAIN_IMAGES)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
    labels = np.repeat(np.arange(batch_size // 4), 4).astype(np.int32)

    def targets(step):
        ids = (np.arange(batch_size) + step * batch_size) % OMNIGLOT_TRAIN_IMAGES
        return {"labels": labels, "sample_ids": ids.astype(np.int32)}

    # Compile before timing. The step's cost does not depend on how full the
    # memory is: every slot is scored and masked at fixed shapes.
    for step in range(5):
        model.train_on_batch(images, targets(step))
    start = time.perf_counter()
    for step in range(steps):
        model.train_on_batch(images, targets(step))
    return 1000.0 * (time.perf_counter() - start) / steps


def run_timing(settings, steps, repeats):
    rows = {name: [] for name in settings}
    load_before = os.getloadavg()
    # Settings interleaved and repeated, so a load change hits every setting alike.
    for _ in range(repeats):
        for name in settings:
            rows[name].append(time_setting(name, steps))
            print(f"{name:14s} {rows[name][-1]:.2f} ms/step", file=sys.stderr)
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "steps": steps,
        "repeats": repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "step_ms": rows,
    }
    os.makedirs(os.path.dirname(TIMING_PATH), exist_ok=True)
    with open(TIMING_PATH, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"Results: {TIMING_PATH}")


def summarize(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def final_drift_curve(runs):
    """Average, over seeds, the last drift measurement of each run: `(ages, similarity)`."""
    by_age = {}
    for run in runs:
        if not run["drift"]:
            continue
        last = run["drift"][-1]
        for age, similarity in zip(last["ages"], last["similarity"]):
            by_age.setdefault(age, []).append(similarity)
    ages = sorted(by_age)
    return ages, [float(np.mean(by_age[age])) for age in ages]


def run_report():
    runs = []
    for file_name in sorted(os.listdir(RUNS_DIR)):
        with open(os.path.join(RUNS_DIR, file_name)) as handle:
            runs.append(json.load(handle))
    timing = None
    if os.path.exists(TIMING_PATH):
        with open(TIMING_PATH) as handle:
            timing = json.load(handle)

    drift_runs = []
    if os.path.isdir(DRIFT_DIR):
        for file_name in sorted(os.listdir(DRIFT_DIR)):
            with open(os.path.join(DRIFT_DIR, file_name)) as handle:
                drift_runs.append(json.load(handle))

    rows = []
    curves = {}
    for name in SETTINGS:
        selected = [run for run in runs if run["setting"] == name]
        if not selected:
            continue
        row = {"setting": name, "label": LABELS[name], "seeds": [run["seed"] for run in selected]}
        for key in ("recall@1", "recall@4", "train_seconds", "step_ms"):
            row[key], row[key + "_std"] = summarize([run[key] for run in selected])
        if timing and name in timing["step_ms"]:
            row["timed_step_ms"] = float(np.median(timing["step_ms"][name]))
            # The ratio is taken within each repeat, where FIFO ran next to the setting, then the median.
            ratios = np.array(timing["step_ms"][name]) / np.array(timing["step_ms"]["fifo"])
            row["timed_ratio"] = float(np.median(ratios))
            row["timed_ratios"] = [float(ratio) for ratio in ratios]
        rows.append(row)
        drift_selected = [run for run in drift_runs if run["setting"] == name]
        if drift_selected and drift_selected[0]["drift"]:
            curves[LABELS[name]] = final_drift_curve(drift_selected)
            row["drift_final_mean"] = float(np.mean([run["drift"][-1]["mean_similarity"] for run in drift_selected]))

    # Two step times: the timing part (one process, under the timing lock) and
    # the recall runs' wall time per step (parallel runs, not under the lock).
    fifo = next((row for row in rows if row["setting"] == "fifo"), {})
    print("| memory | R@1 mean ± sd | R@4 mean ± sd | ms/step, timing run (x FIFO) | ms/step, recall runs (x FIFO) | seeds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        timed = "n/a"
        if "timed_step_ms" in row and "timed_step_ms" in fifo:
            timed = f"{row['timed_step_ms']:.1f} ({row['timed_ratio']:.2f}x)"
        in_runs = f"{row['step_ms']:.0f} ({row['step_ms'] / fifo['step_ms']:.2f}x)" if fifo else f"{row['step_ms']:.0f}"
        print(
            f"| {row['label']} | {row['recall@1']:.4f} ± {row['recall@1_std']:.4f} | "
            f"{row['recall@4']:.4f} ± {row['recall@4_std']:.4f} | {timed} | {in_runs} | {len(row['seeds'])} |"
        )

    if curves:
        os.makedirs(os.path.dirname(FIGURE_PATH), exist_ok=True)
        measured = next(run for run in drift_runs if run["drift"])
        title = (
            f"Memory drift at step {measured['drift'][-1]['step']} of {measured['config']['steps']} "
            f"(seed {measured['seed']}, re-embedded in training mode)"
        )
        plot_memory_drift(curves, FIGURE_PATH, title=title)
        print(f"Figure: {os.path.normpath(FIGURE_PATH)}")
    defaults = {key: value for key, value in dataclasses.asdict(TrainConfig()).items() if key != "data_dir"}
    with open(SUMMARY_PATH, "w") as handle:
        json.dump({"defaults": defaults, "rows": rows, "drift": curves, "timing": timing}, handle, indent=2, default=list)
    print(f"Results: {SUMMARY_PATH}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["recall", "drift", "timing", "report"], help="what to run")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the recall part (default: %(default)s)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Omniglot folder (default: ../shared/data/omniglot)")
    parser.add_argument("--steps", type=int, help="training steps per recall run (default: TrainConfig's)")
    parser.add_argument("--timing-steps", type=int, default=200, help="timed steps per setting and repeat (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per setting (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = [name for name in args.settings.split(",") if name]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}: expected some of {', '.join(SETTINGS)}")

    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.part == "recall":
        run_recall(settings, seeds, args.data_dir, args.steps)
    elif args.part == "drift":
        # Training-mode drift of every stored entry (the whole ring buffer), one batch per age.
        run_recall(settings, seeds, args.data_dir, args.steps, DRIFT_DIR, drift_training=True, drift_sample_size=4096)
    elif args.part == "timing":
        run_timing(settings, args.timing_steps, args.repeats)
    else:
        run_report()


if __name__ == "__main__":
    main()
