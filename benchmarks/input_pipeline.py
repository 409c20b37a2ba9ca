"""Images per second of the train pipeline against the step rate of ResNet-50 training at batch 64.

Writes synthetic 500x500 JPEGs (64 classes of 4), then measures, one after
the other in one run:

1. the train pipeline of `keras_xbm.data.images.train_dataset` (read, JPEG
   decode of the crop window, random resized crop to 224, flip, P x K
   batches of 16 x 4), alone, in images per second;
2. `XBMModel` training steps of ResNet-50 (random initial weights, 128-d
   head, memory 55,000, L2 weight decay) on one fixed batch of 64 images of
   224x224, so that the data pipeline is not involved, in steps per second.

The pipeline keeps up when its images per second exceed 64 x the step rate.
On a shared machine both use the same cores, so run it under the timing lock:

    flock /tmp/keras_xbm_timing.lock python benchmarks/input_pipeline.py [--steps 5] [--batches 20]

Prints a table and writes benchmarks/results/input_pipeline.json.
"""

import argparse
import json
import logging
import os
import platform
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from keras_xbm.data.images import train_dataset
from keras_xbm.data.listing import make_split
from keras_xbm.training import TrainConfig, build_model

logger = logging.getLogger("benchmarks.input_pipeline")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "input_pipeline.json")


def write_synthetic_jpegs(folder, classes, per_class, side=500, seed=0):
    """Write smooth random 500x500 JPEGs (quality 90, about 45 KiB each); return a FileSplit."""
    rng = np.random.default_rng(seed)
    paths, keys = [], []
    for class_id in range(classes):
        for shot in range(per_class):
            # Upsampled noise: photo-like file sizes, unlike flat colour or white noise.
            coarse = rng.uniform(0, 255, size=(1, 25, 25, 3)).astype(np.float32)
            pixels = tf.cast(tf.image.resize(coarse, (side, side), method="bicubic")[0], tf.uint8)
            path = os.path.join(folder, f"{class_id:03d}_{shot}.jpg")
            with open(path, "wb") as handle:
                handle.write(tf.io.encode_jpeg(pixels, quality=90).numpy())
            paths.append(path)
            keys.append(class_id)
    return make_split(paths, keys)


def time_pipeline(split, batches, warmup_batches=3):
    """Return images per second of the train pipeline (16 classes x 4 images of 224x224)."""
    iterator = iter(train_dataset(split, 16, 4, crop_size=224, seed=0))
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
        images.numpy()
    return batches * 64 / (time.perf_counter() - start)


def time_resnet50_steps(steps, jit_compile, warmup_steps=2):
    """Return `(steps per second, seconds of the first step)` of ResNet-50 XBM training at batch 64."""
    config = TrainConfig(
        dataset="sop", data_dir="unused", backbone="resnet50", image_size=224, batch_size=64, samples_per_class=4,
        memory_size=55000, warmup_steps=0, learning_rate=1e-4, weight_decay=5e-4, jit_compile=jit_compile,
    )
    config.validate()
    model = build_model(config, (224, 224, 3))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(64, 224, 224, 3)).astype(np.float32)
    targets = {"labels": np.repeat(np.arange(16), 4).astype(np.int32), "sample_ids": np.arange(64, dtype=np.int32)}
    start = time.perf_counter()
    model.train_on_batch(images, targets)
    first_step = time.perf_counter() - start
    for _ in range(warmup_steps - 1):
        model.train_on_batch(images, targets)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, targets)
    return steps / (time.perf_counter() - start), first_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="timed pipeline batches of 64 images (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed ResNet-50 training steps per setting (default: %(default)s)")
    parser.add_argument("--no-jit", dest="jit", action="store_false", help="time the training step without XLA only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        split = write_synthetic_jpegs(folder, classes=64, per_class=4)
        mean_kib = np.mean([os.path.getsize(path) for path in split.paths]) / 1024
        pipeline_rate = time_pipeline(split, args.batches)
    logger.info("train pipeline: %.1f images/s (JPEGs of %.0f KiB on average)", pipeline_rate, mean_kib)

    rows = []
    for jit_compile in ([True, False] if args.jit else [False]):
        step_rate, first_step = time_resnet50_steps(args.steps, jit_compile)
        rows.append({
            "jit_compile": jit_compile,
            "steps_per_second": step_rate,
            "images_per_second": 64 * step_rate,
            "first_step_seconds": first_step,
            "pipeline_to_training_ratio": pipeline_rate / (64 * step_rate),
        })
        logger.info("ResNet-50 training, XLA %s: %.3f steps/s (%.1f images/s)", jit_compile, step_rate, 64 * step_rate)

    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "image": {"side": 500, "format": "JPEG quality 90", "mean_kib": mean_kib},
        "pipeline": {"batch": "16 classes x 4 images", "crop_size": 224, "timed_batches": args.batches, "images_per_second": pipeline_rate},
        "training": {"backbone": "resnet50", "batch_size": 64, "image_size": 224, "memory_size": 55000, "timed_steps": args.steps, "rows": rows},
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2)

    print(f"Train pipeline: {pipeline_rate:.1f} images/s on 500x500 JPEGs")
    print(f"{'XLA':>5} {'steps/s':>8} {'images/s':>9} {'pipeline / training':>20}")
    for row in rows:
        print(f"{str(row['jit_compile']):>5} {row['steps_per_second']:8.3f} {row['images_per_second']:9.1f} {row['pipeline_to_training_ratio']:20.1f}")
    print(f"Load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"Results: {RESULTS}")


if __name__ == "__main__":
    main()
