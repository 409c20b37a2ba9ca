"""Step time of XBMModel training against the memory size, on random images.

Prints a table and writes benchmarks/results/train_step.json. All sizes are
measured in one run, so their ratios are comparable even on a noisy machine.

    python benchmarks/train_step.py [--steps 200] [--rounds 3] [--batch-size 16]
"""

import argparse
import json
import logging
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from keras_xbm import XBMModel, backbones

logger = logging.getLogger("benchmarks.train_step")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step.json")


def time_steps(memory_size, steps, batch_size, image_size, jit_compile):
    keras.utils.set_random_seed(0)
    network = backbones.small_cnn(input_shape=(image_size, image_size, 1), embedding_dim=128)
    model = XBMModel(network, memory_size=memory_size)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
    targets = {
        "labels": np.repeat(np.arange(batch_size // 4), 4).astype(np.int32),
        "sample_ids": np.arange(batch_size, dtype=np.int32),
    }
    # Fill the memory and compile before timing.
    for _ in range(max(3, memory_size // batch_size + 1) if memory_size <= 4096 else 3):
        model.train_on_batch(images, targets)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, targets)
    return 1000.0 * (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per setting (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all settings; the median is reported (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the input images (default: %(default)s)")
    parser.add_argument("--memory-sizes", default="0,1024,2048,8192,55000", help="comma-separated memory sizes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    settings = [
        (memory_size, jit_compile)
        for jit_compile in (True, False)
        for memory_size in (int(size) for size in args.memory_sizes.split(","))
    ]
    load_before = os.getloadavg()
    times = {setting: [] for setting in settings}
    for round_index in range(args.rounds):
        for memory_size, jit_compile in settings:
            step_ms = time_steps(memory_size, args.steps, args.batch_size, args.image_size, jit_compile)
            times[(memory_size, jit_compile)].append(step_ms)
            logger.info("round %d  memory %6d  jit %-5s  %.2f ms/step", round_index + 1, memory_size, jit_compile, step_ms)
    load_after = os.getloadavg()

    rows = []
    for memory_size, jit_compile in settings:
        # The ratio to no memory is taken within each round, where both ran close in time.
        baseline = times[(0, jit_compile)] if (0, jit_compile) in times else None
        row = {
            "memory_size": memory_size,
            "jit_compile": jit_compile,
            "step_ms": float(np.median(times[(memory_size, jit_compile)])),
            "round_step_ms": times[(memory_size, jit_compile)],
        }
        if baseline:
            row["ratio_to_no_memory"] = float(np.median(np.array(times[(memory_size, jit_compile)]) / np.array(baseline)))
        rows.append(row)

    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{'memory':>8} {'XLA':>5} {'ms/step':>8} {'x no memory':>12}")
    for row in rows:
        ratio = f"{row['ratio_to_no_memory']:12.2f}" if "ratio_to_no_memory" in row else f"{'':>12}"
        print(f"{row['memory_size']:>8} {str(row['jit_compile']):>5} {row['step_ms']:8.2f} {ratio}")
    print(f"Load average before and after: {load_before[0]:.1f}, {load_after[0]:.1f}")
    print(f"Results: {RESULTS}")


if __name__ == "__main__":
    main()
