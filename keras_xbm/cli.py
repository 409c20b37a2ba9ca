"""The `keras-xbm` command line: `train` and `evaluate`.

The command line owns the console: it sets up logging, prints the result
tables, and turns a `ValueError` or `FileNotFoundError` from the library into a
one-line error message and exit status 2.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

logger = logging.getLogger("keras_xbm.cli")


def parse_int_list(text):
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, received {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,2,4,8, received {text!r}")
    return values


def add_train_parser(subparsers):
    from keras_xbm.training import TrainConfig

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train an embedding network with a cross-batch memory, evaluate it and export it",
        description="Train on the train split, print Recall@K on the test split, write metrics.json "
        "and export a SavedModel for TF Serving.",
    )
    parser.add_argument("--dataset", default=defaults.dataset, choices=["omniglot"], help="dataset (default: %(default)s)")
    parser.add_argument("--data-dir", required=True, help="directory holding the dataset")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where metrics.json, history.json and the weights go (default: %(default)s)")
    parser.add_argument("--export-dir", default=defaults.export_dir, help="SavedModel folder; each run adds the next version (default: %(default)s)")
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip the SavedModel export")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per batch, P x K (default: %(default)s)")
    parser.add_argument("--samples-per-class", type=int, default=defaults.samples_per_class, help="K, images of each class in a batch (default: %(default)s)")
    parser.add_argument("--memory-size", type=int, default=defaults.memory_size, help="memory slots (default: %(default)s)")
    parser.add_argument("--no-memory", action="store_true", help="train on the batch term alone (memory size 0)")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="steps before the memory term switches on (default: %(default)s)")
    parser.add_argument("--memory-weight", type=float, default=defaults.memory_weight, help="weight of the memory term (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--negative-threshold", type=float, default=defaults.negative_threshold, help="cosine similarity above which a negative counts (default: %(default)s)")
    parser.add_argument(
        "--normalization",
        default=defaults.normalization,
        choices=["sum", "batch", "pairs", "anchor"],
        help="how the pair terms are averaged (default: %(default)s; see docs/normalization.md)",
    )
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim, help="embedding width (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="side of the square input images in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--k", "--recall-k", dest="recall_k", type=parse_int_list, default=defaults.recall_ks, help="K values of Recall@K; --recall-k is an alias (default: 1,2,4,8)")
    parser.add_argument("--index", default=defaults.index, choices=["exact", "scann"], help="search used for Recall@K (default: %(default)s)")
    parser.add_argument("--no-jit", dest="jit_compile", action="store_false", help="run the train step without XLA")
    parser.set_defaults(handler=run_train)


def add_evaluate_parser(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="compute Recall@K, MAP@R and R-precision of a SavedModel on a dataset, or of saved embeddings",
        description="Embed the test split with a SavedModel (--model, --data-dir), or read embeddings from .npz files "
        "with arrays 'embeddings' and 'labels' (--embeddings, or --queries with --gallery), and print Recall@K, "
        "MAP@R and R-precision.",
    )
    parser.add_argument("--model", help="SavedModel folder, or a folder of numbered versions (the newest is used)")
    parser.add_argument("--dataset", default="omniglot", choices=["omniglot"], help="dataset (default: %(default)s)")
    parser.add_argument("--data-dir", help="directory holding the dataset, with --model")
    parser.add_argument("--index", default="exact", choices=["exact", "scann"], help="search used for Recall@K (default: %(default)s)")
    parser.add_argument("--k", "--recall-k", dest="recall_k", type=parse_int_list, default=(1, 2, 4, 8), help="K values of Recall@K; --recall-k is an alias (default: 1,2,4,8)")
    parser.add_argument("--output", help="write the results as JSON to this file")
    add_embedding_file_arguments(parser)
    parser.set_defaults(handler=run_evaluate)


def add_embedding_file_arguments(parser):
    """Add the `evaluate` flags that read embeddings from .npz files instead of a SavedModel."""
    parser.add_argument("--embeddings", metavar="FILE", help="evaluate leave-one-out on this .npz file of embeddings and labels")
    parser.add_argument("--queries", metavar="FILE", help="query embeddings and labels (.npz), searched against --gallery")
    parser.add_argument("--gallery", metavar="FILE", help="gallery embeddings and labels (.npz), with --queries")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings first; without it, rows that are not unit length are an error")


def format_recall_table(results, title):
    lines = [title, f"{'K':>6}  {'Recall@K':>8}"]
    for key, value in results.items():
        if key.startswith("recall@"):
            lines.append(f"{key.split('@')[1]:>6}  {value:8.4f}")
    if "map@r" in results:
        lines.append(f"{'MAP@R':>6}  {results['map@r']:8.4f}")
        lines.append(f"{'R-prec':>6}  {results['r_precision']:8.4f}")
    if results.get("queries_without_relevant"):
        lines.append(
            f"{results['queries_without_relevant']} of {results['queries']} queries have no relevant reference "
            "and count as misses."
        )
    return "\n".join(lines)


def run_train(args):
    from keras_xbm.training import TrainConfig, run_training

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {key: value for key, value in vars(args).items() if key in fields}
    values["recall_ks"] = tuple(args.recall_k)
    if args.no_memory:
        values["memory_size"] = 0
    config = TrainConfig(**values)
    results = run_training(config)

    memory = f"memory {config.memory_size}" if config.memory_size else "no memory"
    print()
    print(
        format_recall_table(
            results,
            f"Recall@K on the {config.dataset} test split ({results['test_classes']} unseen classes, "
            f"{results['test_images']} images, leave-one-out, {config.index} search; {memory})",
        )
    )
    print(f"Training: {config.steps} steps in {results['train_seconds']:.0f} s ({results['step_ms']:.1f} ms/step)")
    print(f"Metrics: {os.path.join(config.output_dir, 'metrics.json')}")
    if "export_path" in results:
        print(f"SavedModel: {results['export_path']}")
    return 0


def run_evaluate_embeddings(args):
    from keras_xbm.embedding_evaluation import evaluate_embedding_files

    if args.model:
        raise ValueError("--model is not used with --embeddings or --queries/--gallery: pass one source of embeddings.")
    results = evaluate_embedding_files(
        args.embeddings, args.queries, args.gallery, ks=args.recall_k or (1, 2, 4, 8), index=args.index, normalize=args.normalize
    )
    if args.embeddings:
        source = f"{args.embeddings} ({results['queries']} items, leave-one-out"
    else:
        source = f"{args.queries} against {args.gallery} ({results['queries']} queries, {results['references']} gallery items"
    print(format_recall_table(results, f"Retrieval on {source}, {args.index} search)"))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"Results: {args.output}")
    return 0


def run_evaluate(args):
    from keras_xbm.evaluation import evaluate_saved_model

    if args.embeddings or args.queries or args.gallery:
        return run_evaluate_embeddings(args)
    if not (args.model and args.data_dir):
        raise ValueError(
            "evaluate needs --model with --data-dir, --embeddings FILE, or --queries FILE with --gallery FILE."
        )

    results = evaluate_saved_model(args.model, args.data_dir, ks=args.recall_k, index=args.index)
    print(
        format_recall_table(
            results,
            f"Recall@K of {results['model']} on the {args.dataset} test split "
            f"({results['test_classes']} classes, {results['test_images']} images, {args.index} search)",
        )
    )
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"Results: {args.output}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-xbm", description="Deep metric learning with a cross-batch memory.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: %(default)s)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    return parser


def main(argv=None):
    # TensorFlow's C++ start-up notices say nothing a user can act on here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"keras-xbm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
