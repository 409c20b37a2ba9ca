"""The weighting study behind `keras-xbm study`: weight curves and pair losses compared on Omniglot.

Each entry of the grid is trained with `keras_xbm.training.run_training` once
per seed, with the run settings of `TrainConfig` except the loss, the seed,
the number of steps and, for entries marked `@no-memory`, the memory. An
entry is written as text:

- `POSITIVE/NEGATIVE`: a `DirectWeightLoss` with two weight curves in the
  form of `keras_xbm.weighting.parse_curve`, such as
  `constant/step(threshold=0.5)`;
- a pair loss name of `LOSSES`, such as `multi_similarity`;
- either one followed by `@no-memory` to train on the batch term alone.

Outputs, in the output folder: `results.csv` (one row per run),
`summary.md` (mean and sample standard deviation of Recall@1 and Recall@4 per
entry, then where the memory term's gradient goes, see `gradient_mass`),
`curves_recall.png` (each entry's curves next to its Recall@1) and
`weights_<entry>.png` (the curves over the similarities of the last batch
against the memory, after the first seed's run). Each run keeps its own
folder under `runs/`; a run whose `metrics.json` exists is read back instead
of trained again, so an interrupted study resumes where it stopped.
"""

import csv
import dataclasses
import json
import logging
import math
import os
import re
import time
import warnings

import keras
import numpy as np

from keras_xbm import losses, plots, weighting
from keras_xbm.pairs import cosine_similarity, pair_masks
from keras_xbm.training import TrainConfig, build_model, run_training

logger = logging.getLogger(__name__)

MEMORY_SUFFIX = "@no-memory"

LOSSES = tuple(losses.NAMED_LOSSES)

NEGATIVE_CURVES = (
    "step(threshold=0.3)",
    "step(threshold=0.5)",
    "step(threshold=0.7)",
    "linear",
    "exponential(scale=10, threshold=0.5)",
    "sigmoid(scale=10, threshold=0.5)",
    "softmax(scale=10)",
    "constant",
)
POSITIVE_CURVES = (
    "linear(increasing=false)",
    "exponential(scale=5, threshold=0.5, increasing=false)",
)
CLASSIC_LOSSES = tuple(name for name in LOSSES if name != "contrastive")

GRIDS = {
    # 12 runs of 3,000 steps: about 10 minutes at the 42 s per run measured on 2 CPU cores (docs/weighting_study.md).
    "small": (
        "constant/step(threshold=0.5)",
        "constant/constant",
        "multi_similarity",
        "multi_similarity@no-memory",
    ),
    # Negative curves with a constant positive curve, positive curves with the
    # step, and each pair loss with and without the memory. Contrastive with
    # the memory is constant/step(threshold=0.5), so it runs only without.
    "full": tuple(f"constant/{negative}" for negative in NEGATIVE_CURVES)
    + tuple(f"{positive}/step(threshold=0.5)" for positive in POSITIVE_CURVES)
    + ("contrastive@no-memory",)
    + tuple(f"{name}{suffix}" for name in CLASSIC_LOSSES for suffix in ("", MEMORY_SUFFIX)),
}


@dataclasses.dataclass(frozen=True)
class StudyEntry:
    """One grid entry: a pair of weight curves or a named pair loss, with or without the memory."""

    text: str
    positive_curve: object = None
    negative_curve: object = None
    loss_name: str = None
    memory: bool = True

    @property
    def slug(self):
        """A folder name for the entry's runs."""
        return re.sub(r"[^A-Za-z0-9.=-]+", "_", self.text).strip("_")

    @property
    def loss_spec(self):
        """The entry without `@no-memory`: the `TrainConfig.loss` of its runs."""
        text = self.text
        return text[: -len(MEMORY_SUFFIX)].strip() if text.endswith(MEMORY_SUFFIX) else text

    def build_loss(self, config):
        """Return the entry's `PairLoss` for a run with `config`."""
        return losses.build_loss(self.loss_spec, config.negative_threshold, config.normalization)


def parse_entry(text):
    """Build a `StudyEntry` from `POSITIVE/NEGATIVE`, a loss name, either with `@no-memory`.

    Raises:
        ValueError: for an unknown loss or curve name, or a curve that does
            not parse.
    """
    body = text.strip()
    memory = not body.endswith(MEMORY_SUFFIX)
    if not memory:
        body = body[: -len(MEMORY_SUFFIX)].strip()
    if "/" in body:
        positive_text, negative_text = body.split("/", 1)
        return StudyEntry(
            text=text.strip(),
            positive_curve=weighting.parse_curve(positive_text),
            negative_curve=weighting.parse_curve(negative_text),
            memory=memory,
        )
    if body not in LOSSES:
        raise ValueError(
            f"Invalid study entry {text!r}: expected POSITIVE_CURVE/NEGATIVE_CURVE or a loss name "
            f"({', '.join(LOSSES)}), optionally followed by {MEMORY_SUFFIX}."
        )
    return StudyEntry(text=text.strip(), loss_name=body, memory=memory)


def newest_batch_pairs(model, batch_size):
    """Return `(similarity, pos_mask, neg_mask)` of the newest batch in the memory against the memory.

    The newest `batch_size` rows written are the queries. Pairs of a row with
    itself are dropped by sample id, as in training.
    """
    memory = model.memory
    fill = int(memory.fill_count.numpy())
    pointer = int(memory.pointer.numpy())
    newest = [(pointer - 1 - offset) % memory.memory_size for offset in range(min(batch_size, fill))]
    embeddings = memory.embeddings.numpy()
    labels = memory.labels.numpy()
    sample_ids = memory.sample_ids.numpy()
    valid = memory.valid_mask().numpy()
    similarity = cosine_similarity(embeddings[newest], embeddings).numpy()
    pos_mask, neg_mask = pair_masks(labels[newest], labels, sample_ids[newest], sample_ids, ref_valid=valid)
    return similarity, pos_mask.numpy(), neg_mask.numpy()


def gradient_mass(loss, similarity, pos_mask, neg_mask, hard_threshold=0.5):
    """Summarise where the gradient of a loss goes on one set of pairs.

    Returns:
        A dict with `positive_mass` and `negative_mass`, the sums of the pair
        weights (`induced_weights`), and `hard_share`, the part of the
        negative mass on negatives more similar than `hard_threshold`. Its
        `weighted_negatives` is the fraction of negatives with a non-zero
        weight, and `hard_negatives_fraction` the fraction above the threshold.
    """
    w_pos, w_neg = (tensor.numpy() for tensor in weighting.induced_weights(loss, similarity, pos_mask, neg_mask))
    negative_mass = float(w_neg.sum())
    hard = neg_mask & (similarity > hard_threshold)
    return {
        "positive_mass": float(w_pos.sum()),
        "negative_mass": negative_mass,
        "hard_share": float(w_neg[hard].sum()) / negative_mass if negative_mass > 0 else math.nan,
        "weighted_negatives": float(np.count_nonzero(w_neg[neg_mask])) / max(int(neg_mask.sum()), 1),
        "hard_negatives_fraction": float(hard.sum()) / max(int(neg_mask.sum()), 1),
    }


def analyze_memory(entry, config, output_dir):
    """Measure the memory term's gradient on the last batch of a trained run, and draw the entry's curves over it.

    Returns:
        The `gradient_mass` dict of the entry's loss on the newest batch
        against the memory.
    """
    loss = entry.build_loss(config)
    model = build_model(config, (config.image_size, config.image_size, 1), loss=loss)
    with warnings.catch_warnings():
        # The weights file also contains the optimizer state, which this fresh model does not need.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(os.path.join(config.output_dir, "xbm.weights.h5"))
    similarity, pos_mask, neg_mask = newest_batch_pairs(model, config.batch_size)
    if entry.positive_curve is not None:
        plots.plot_weight_curves(
            {"w_pos": entry.positive_curve, "w_neg": entry.negative_curve},
            os.path.join(output_dir, f"weights_{entry.slug}.png"),
            positive_similarities=similarity[pos_mask],
            negative_similarities=similarity[neg_mask],
            title=f"{entry.text}\nlast batch against the memory after {config.steps} steps, seed {config.seed}",
        )
    return gradient_mass(loss, similarity, pos_mask, neg_mask)


def format_gradient_table(masses):
    """Return the markdown table of `{entry text: gradient_mass dict}`."""
    lines = [
        "| entry | negative / positive mass | share of negative mass on S > 0.5 | negatives weighted | negatives with S > 0.5 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for text, mass in masses.items():
        ratio = mass["negative_mass"] / mass["positive_mass"] if mass["positive_mass"] > 0 else math.nan
        lines.append(
            f"| `{text}` | {ratio:.3g} | {100 * mass['hard_share']:.1f}% "
            f"| {100 * mass['weighted_negatives']:.1f}% | {100 * mass['hard_negatives_fraction']:.2f}% |"
        )
    return "\n".join(lines)


def config_record(config):
    """Return the config as `run_training` stores it in metrics.json."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}


def train_entry(entry, config):
    """Train one entry with one config, or read back its earlier result; return a CSV row."""
    metrics_path = os.path.join(config.output_dir, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as handle:
            results = json.load(handle)
        if results.get("study_entry") == entry.text and results.get("config") == config_record(config):
            logger.info("Read back %s, seed %d, from %s", entry.text, config.seed, metrics_path)
            return results_row(entry, config, results)

    keras.backend.clear_session()
    loss = entry.build_loss(config)
    results = run_training(config, loss=loss)
    with open(os.path.join(config.output_dir, "history.json")) as handle:
        history = json.load(handle)
    results["study_entry"] = entry.text
    results["loss_config"] = keras.saving.serialize_keras_object(loss)
    results["hard_negatives"] = history["hard_negatives"][-1]
    results["final_loss"] = history["loss"][-1]
    with open(metrics_path, "w") as handle:
        json.dump(results, handle, indent=2)
    return results_row(entry, config, results)


def results_row(entry, config, results):
    row = {
        "entry": entry.text,
        "memory": entry.memory,
        "seed": config.seed,
        "steps": config.steps,
    }
    for key in sorted(key for key in results if key.startswith("recall@")):
        row[key] = results[key]
    row.update(
        hard_negatives=results.get("hard_negatives"),
        final_loss=results.get("final_loss"),
        train_seconds=results["train_seconds"],
    )
    return row


def summarize(rows, entries):
    """Return one summary dict per entry: mean and sample standard deviation of R@1 and R@4."""
    summary = []
    for entry in entries:
        runs = [row for row in rows if row["entry"] == entry.text]
        if not runs:
            continue
        item = {"entry": entry, "label": entry.text, "seeds": len(runs)}
        for k in (1, 4):
            values = np.array([row[f"recall@{k}"] for row in runs], np.float64)
            item[f"r{k}_mean"] = float(np.mean(values))
            item[f"r{k}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            item[f"r{k}_values"] = values.tolist()
        hard = [row["hard_negatives"] for row in runs if row.get("hard_negatives") is not None]
        item["hard_negatives"] = float(np.mean(hard)) if hard else math.nan
        summary.append(item)
    return summary


def format_summary_table(summary):
    """Return the markdown table of a study summary, recalls in percent."""
    lines = [
        "| entry | memory | R@1 mean | R@1 std | R@4 mean | R@4 std | hard negatives / query | seeds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for item in summary:
        body = item["entry"].text.replace(MEMORY_SUFFIX, "")
        # One seed has no sample standard deviation.
        r1_std, r4_std = ("-" if math.isnan(item[key]) else f"{100 * item[key]:.1f}" for key in ("r1_std", "r4_std"))
        lines.append(
            f"| `{body}` | {'yes' if item['entry'].memory else 'no'} "
            f"| {100 * item['r1_mean']:.1f} | {r1_std} "
            f"| {100 * item['r4_mean']:.1f} | {r4_std} "
            f"| {item['hard_negatives']:.1f} | {item['seeds']} |"
        )
    return "\n".join(lines)


def write_outputs(rows, entries, output_dir, base_config, seeds, masses):
    """Write results.csv, summary.md and curves_recall.png from the runs done so far."""
    fields = list(rows[0])
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    summary = summarize(rows, entries)
    settings = ", ".join(
        f"{name}={getattr(base_config, name)}"
        for name in ("steps", "batch_size", "samples_per_class", "memory_size", "warmup_steps", "learning_rate", "normalization", "embedding_dim")
    )
    with open(os.path.join(output_dir, "summary.md"), "w") as handle:
        handle.write(f"Recall@K in percent on the {base_config.dataset} test split, over seeds {list(seeds)}.\n")
        handle.write(f"Settings: {settings}. Std is the sample standard deviation over seeds.\n\n")
        handle.write(format_summary_table(summary) + "\n")
        if masses:
            handle.write(
                f"\nGradient of the memory term on the newest batch against the memory after seed {seeds[0]}'s "
                "run: sums of the pair weights (induced_weights), where they go, and how many negatives get one.\n\n"
            )
            handle.write(format_gradient_table(masses) + "\n")

    figure_rows = [
        {
            "label": item["label"],
            "positive_curve": item["entry"].positive_curve,
            "negative_curve": item["entry"].negative_curve,
            "recall_mean": item["r1_mean"],
            "recall_std": None if math.isnan(item["r1_std"]) else item["r1_std"],
        }
        for item in summary
    ]
    plots.plot_curves_with_recall(figure_rows, os.path.join(output_dir, "curves_recall.png"))
    return summary


def run_study(data_dir, entries, seeds=(0, 1, 2), output_dir="runs/study", steps=None, base_config=None):
    """Train every entry once per seed and write the study's CSV, table and figures.

    Runs go seed by seed over all entries, so that a study stopped early has
    every entry at the same number of seeds.

    Args:
        data_dir: the folder that contains the Omniglot zips.
        entries: `StudyEntry` objects or their text.
        seeds: the seeds, one run of each entry per seed. Defaults to
            `(0, 1, 2)`.
        output_dir: where the outputs go. Defaults to `"runs/study"`.
        steps: training steps per run, or `None` for `TrainConfig`'s default.
        base_config: the `TrainConfig` the runs start from; `None` for the
            defaults.

    Returns:
        The summary, one dict per entry (see `summarize`).

    Raises:
        ValueError: for an invalid entry, no entry or no seed, or an invalid
            run setting.
    """
    entries = [parse_entry(entry) if isinstance(entry, str) else entry for entry in entries]
    seeds = list(seeds)
    if not entries:
        raise ValueError("Expected at least one study entry, received none.")
    if not seeds:
        raise ValueError("Expected at least one seed, received none.")
    base_config = base_config or TrainConfig()
    base_config = dataclasses.replace(
        base_config, data_dir=data_dir, steps=base_config.steps if steps is None else steps, export=False, verbose=0
    )
    base_config.validate()
    os.makedirs(output_dir, exist_ok=True)

    rows = []
    masses = {}
    total = len(entries) * len(seeds)
    start = time.perf_counter()
    for seed in seeds:
        for entry in entries:
            config = dataclasses.replace(
                base_config,
                seed=seed,
                memory_size=base_config.memory_size if entry.memory else 0,
                loss=entry.loss_spec,
                output_dir=os.path.join(output_dir, "runs", entry.slug, f"seed{seed}"),
            )
            logger.info("Run %d/%d: %s, seed %d", len(rows) + 1, total, entry.text, seed)
            row = train_entry(entry, config)
            rows.append(row)
            elapsed = time.perf_counter() - start
            logger.info(
                "Done %d/%d: %s, seed %d: R@1 %.4f, R@4 %.4f (%.0f s elapsed)",
                len(rows), total, entry.text, seed, row["recall@1"], row["recall@4"], elapsed,
            )
            if seed == seeds[0] and entry.memory:
                masses[entry.text] = analyze_memory(entry, config, output_dir)
        write_outputs(rows, entries, output_dir, base_config, seeds, masses)
    return summarize(rows, entries)
