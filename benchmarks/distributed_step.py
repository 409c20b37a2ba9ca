"""Step time of XBMModel training on 1 and 2 replicas, and the memory's bytes per replica.

Each setting runs in its own process, because TensorFlow fixes its logical
devices when it first runs an operation. All settings are measured in one run
of this script, so their ratios are comparable even on a noisy machine. On a
shared machine, wrap the run in `flock /tmp/keras_xbm_timing.lock`. Prints a
table and writes benchmarks/results/distributed_step.json.

    python benchmarks/distributed_step.py [--steps 40] [--rounds 3] [--memory-sizes 1024,55000]

Every round runs each setting once, in the same order, so a change in the
machine's load during the run spreads over all settings. The table gives the
median over the rounds of each run's median step time, and its range.

On a machine without GPU the 2 replicas are 2 logical devices carved from the
same CPU cores, so this measures the cost of the distribution machinery
(gathering, all-reduce, the replicated memory), not a speed-up.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

logger = logging.getLogger("benchmarks.distributed_step")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "distributed_step.json")

# (label, strategy, devices, jit_compile)
SETTINGS = [
    ("1 device", "default", 0, False),
    ("1 device, XLA", "default", 0, True),
    ("MirroredStrategy, 1 device", "mirrored", 1, False),
    ("MirroredStrategy, 2 logical CPU devices", "mirrored", 2, False),
]


def memory_bytes(memory_size, embedding_dim):
    """Return the bytes of one replica's CrossBatchMemory, summed over its variables."""
    from keras_xbm import CrossBatchMemory

    memory = CrossBatchMemory(memory_size, embedding_dim=embedding_dim)
    return sum(int(variable.numpy().nbytes) for variable in memory.weights)


def time_setting(strategy_name, devices, jit_compile, memory_size, steps, batch_size, image_size):
    """Run in a worker process: return the median and mean step time in ms, after warm-up."""
    from keras_xbm.distributed import make_strategy, synchronize_batch_norm

    strategy = make_strategy(strategy_name, devices)

    import keras
    import numpy as np
    import tensorflow as tf

    from keras_xbm import XBMModel, backbones

    keras.utils.set_random_seed(0)
    with strategy.scope():
        network = backbones.small_cnn(input_shape=(image_size, image_size, 1), embedding_dim=128)
        if strategy.num_replicas_in_sync > 1:
            synchronize_batch_norm(network)
        model = XBMModel(network, memory_size=memory_size)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
    targets = {
        "labels": np.repeat(np.arange(batch_size // 4), 4).astype(np.int32),
        "sample_ids": np.arange(batch_size, dtype=np.int32),
    }
    dataset = tf.data.Dataset.from_tensors((images, targets)).repeat()

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    # The first steps trace and compile the step, so they are left out.
    warmup = 5
    recorder = StepTimes()
    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[recorder])
    durations = np.diff(recorder.times[warmup - 1 :]) * 1000.0
    return {
        "replicas": strategy.num_replicas_in_sync,
        "median_ms": float(np.median(durations)),
        "mean_ms": float(np.mean(durations)),
    }


def run_worker(args):
    result = time_setting(
        args.strategy, args.devices, args.jit, args.memory_size, args.steps, args.batch_size, args.image_size
    )
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the input images (default: %(default)s)")
    parser.add_argument("--memory-sizes", default="1024,55000", help="comma-separated memory sizes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_before = os.getloadavg()
    runs = {}
    for round_index in range(args.rounds):
        for memory_size in (int(size) for size in args.memory_sizes.split(",")):
            for label, strategy, devices, jit_compile in SETTINGS:
                command = [
                    sys.executable, os.path.abspath(__file__), "--worker",
                    "--strategy", strategy, "--devices", str(devices), "--memory-size", str(memory_size),
                    "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                ]
                if jit_compile:
                    command.append("--jit")
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                run = json.loads(output.strip().splitlines()[-1])
                runs.setdefault((memory_size, label, jit_compile), []).append(run)
                logger.info(
                    "round %d  memory %6d  %-42s %8.2f ms/step", round_index + 1, memory_size, label, run["median_ms"]
                )

    rows = []
    for (memory_size, label, jit_compile), setting_runs in runs.items():
        medians = [run["median_ms"] for run in setting_runs]
        rows.append(
            {
                "setting": label,
                "memory_size": memory_size,
                "jit_compile": jit_compile,
                "replicas": setting_runs[0]["replicas"],
                "median_ms": float(statistics.median(medians)),
                "min_ms": min(medians),
                "max_ms": max(medians),
                "run_medians_ms": medians,
            }
        )

    sizes = {
        "omniglot_1024x128": memory_bytes(1024, 128),
        "sop_55000x128": memory_bytes(55000, 128),
    }
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "rows": rows,
        "memory_bytes_per_replica": sizes,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2)

    print(f"{'memory':>8}  {'setting':<42} {'replicas':>8} {'ms/step':>8} {'range':>16}")
    for row in rows:
        spread = f"{row['min_ms']:.1f}-{row['max_ms']:.1f}"
        print(
            f"{row['memory_size']:>8}  {row['setting']:<42} {row['replicas']:>8} {row['median_ms']:8.2f} {spread:>16}"
        )
    for name, size in sizes.items():
        print(f"memory per replica, {name}: {size:,} bytes ({size / 2**20:.1f} MiB)")
    print(f"load average before/after: {load_before} / {result['load_average_after']}")
    print(f"Results: {RESULTS}")


if __name__ == "__main__":
    main()
