"""Step time of XBMModel training against the memory size, on random images.

Prints a table and writes benchmarks/results/train_step.json. All sizes are
measured in one run, so their ratios are comparable even on a noisy machine.

    python benchmarks/train_step.py [--steps 200] [--batch-size 16]
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
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the input images (default: %(default)s)")
    parser.add_argument("--memory-sizes", default="0,1024,2048,8192,55000", help="comma-separated memory sizes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    for jit_compile in (True, False):
        for memory_size in (int(size) for size in args.memory_sizes.split(",")):
            step_ms = time_steps(memory_size, args.steps, args.batch_size, args.image_size, jit_compile)
            rows.append({"memory_size": memory_size, "jit_compile": jit_compile, "step_ms": step_ms})
            logger.info("memory %6d  jit %-5s  %.2f ms/step", memory_size, jit_compile, step_ms)

    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"{'memory':>8} {'XLA':>5} {'ms/step':>8}")
    for row in rows:
        print(f"{row['memory_size']:>8} {str(row['jit_compile']):>5} {row['step_ms']:8.2f}")
    print(f"Results: {RESULTS}")


if __name__ == "__main__":
    main()
