"""The `keras-xbm` command line: `train`, `evaluate` and `study`.

The command line owns the console: it sets up logging, prints the result
tables, and turns a `ValueError` or `FileNotFoundError` from the library into a
one-line error message and exit status 2.
"""

import argparse
import dataclasses
import glob
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


def parse_weights(text):
    return None if text.lower() == "none" else text


def add_train_parser(subparsers):
    from keras_xbm.training import DATASETS, TrainConfig

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train an embedding network with a cross-batch memory, evaluate it and export it",
        description="Train on the train split, print Recall@K on the test split, write metrics.json "
        "and export a SavedModel for TF Serving.",
    )
    parser.add_argument("--dataset", default=defaults.dataset, choices=DATASETS, help="dataset (default: %(default)s)")
    parser.add_argument("--data-dir", required=True, help="directory holding the dataset")
    parser.add_argument("--output-dir", default=None, help="where metrics.json, history.json and the weights go (default: runs/<dataset>)")
    parser.add_argument("--export-dir", default=None, help="SavedModel folder; each run adds the next version (default: saved_models/<dataset>)")
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip the SavedModel export")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per batch, P x K (default: %(default)s)")
    parser.add_argument("--samples-per-class", type=int, default=defaults.samples_per_class, help="K, images of each class in a batch (default: %(default)s)")
    parser.add_argument("--memory-size", type=int, default=defaults.memory_size, help="memory slots (default: %(default)s)")
    parser.add_argument("--no-memory", action="store_true", help="train on the batch term alone (memory size 0)")
    parser.add_argument(
        "--memory",
        default=defaults.memory,
        choices=["fifo", "momentum-encoder", "momentum-bank"],
        help="what the memory stores: the batch's queries (fifo), the batch embedded by a moving-average copy "
        "of the network (momentum-encoder), or one momentum-averaged slot per training image (momentum-bank, "
        "sized to the training set; --memory-size is then unused) (default: %(default)s; see docs/momentum_memory.md)",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=defaults.momentum,
        help="momentum m in [0, 1) of the momentum forms (default: 0.99 for momentum-encoder, 0.5 for momentum-bank)",
    )
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="steps before the memory term switches on (default: %(default)s)")
    parser.add_argument("--memory-weight", type=float, default=defaults.memory_weight, help="weight of the memory term (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--loss",
        default=defaults.loss,
        help="pair loss: contrastive, multi_similarity, binomial_deviance, lifted_structure, circle, "
        "triplet_batch_hard, triplet_semi_hard, or POSITIVE/NEGATIVE weight curves such as "
        "'constant/step(threshold=0.5)' (default: %(default)s; see docs/weighting_study.md)",
    )
    parser.add_argument("--negative-threshold", type=float, default=defaults.negative_threshold, help="cosine similarity above which a negative counts (default: %(default)s)")
    parser.add_argument(
        "--normalization",
        default=defaults.normalization,
        choices=["sum", "batch", "pairs", "anchor"],
        help="how the pair terms are averaged (default: %(default)s; see docs/normalization.md)",
    )
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim, help="embedding width (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="side of the square input images in pixels (default: 32 for omniglot, 224 otherwise)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--k", "--recall-k", dest="recall_k", type=parse_int_list, default=None, help="K values of Recall@K; --recall-k is an alias (default: the dataset's usual list; 1,2,4,8 for omniglot)")
    parser.add_argument("--index", default=defaults.index, choices=["exact", "scann"], help="search used for Recall@K (default: %(default)s)")
    parser.add_argument("--no-jit", dest="jit_compile", action="store_false", help="run the train step without XLA")
    parser.add_argument(
        "--strategy",
        default=defaults.strategy,
        choices=["default", "mirrored", "multi-worker"],
        help="tf.distribute strategy: one device, MirroredStrategy over this machine's devices, or "
        "MultiWorkerMirroredStrategy over the cluster in TF_CONFIG (default: %(default)s; see docs/distributed.md)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=defaults.devices,
        help="devices of --strategy mirrored: N GPUs, or N logical CPU devices on a machine without GPU "
        "(default: every GPU, or the CPU alone)",
    )
    add_image_benchmark_arguments(parser, defaults)
    parser.set_defaults(handler=run_train)
    return parser


def add_image_benchmark_arguments(parser, defaults):
    """Add the recipe file, backbone, schedule and image benchmark flags of `train`."""
    boolean = argparse.BooleanOptionalAction
    parser.add_argument("--config", help="YAML recipe file such as configs/sop.yaml; its keys are the long flag names with underscores, and flags given on the command line override it")
    parser.add_argument("--backbone", default=None, choices=["small_cnn", "resnet50"], help="embedding network (default: small_cnn for omniglot, resnet50 otherwise)")
    parser.add_argument("--pooling", default=defaults.pooling, choices=["max", "avg"], help="global pooling of resnet50 (default: %(default)s)")
    parser.add_argument("--freeze-batch-norm", default=defaults.freeze_batch_norm, action=boolean, help="run resnet50's batch normalisation with fixed statistics (default: %(default)s)")
    parser.add_argument("--weights", default=defaults.weights, type=parse_weights, choices=[None, "imagenet"], metavar="{none,imagenet}", help="resnet50 initial weights: none or imagenet, which downloads them (default: none)")
    parser.add_argument("--resize-size", type=int, default=None, help="shorter side before the central crop of evaluation, in pixels (default: image size x 256/224)")
    parser.add_argument("--test-list", type=int, default=defaults.test_list, choices=[800, 1600, 2400], help="VehicleID test set (default: %(default)s)")
    parser.add_argument("--from-tfds", default=defaults.from_tfds, action=boolean, help="read sop, cub or cars through TensorFlow Datasets (downloads once) and convert the images into --data-dir (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="weight decay (default: %(default)s)")
    parser.add_argument("--weight-decay-mode", default=defaults.weight_decay_mode, choices=["l2", "decoupled"], help="l2: a loss term, as PyTorch's Adam; decoupled: Keras' Adam weight_decay (default: %(default)s)")
    parser.add_argument("--allow-repeats", default=defaults.allow_repeats, action=boolean, help="pad classes smaller than K by repeating images (default: %(default)s)")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction, help="share of the train classes held out to validate; 0 keeps the learning rate constant (default: %(default)s)")
    parser.add_argument("--validation-every", type=int, default=defaults.validation_every, help="steps between validations (default: %(default)s)")
    parser.add_argument("--lr-patience", type=int, default=defaults.lr_patience, help="validations without a better val_recall@1 before the learning rate drops (default: %(default)s)")
    parser.add_argument("--lr-factor", type=float, default=defaults.lr_factor, help="factor applied to the learning rate when it drops (default: %(default)s)")
    parser.add_argument("--verify-images", default=defaults.verify_images, action=boolean, help="decode every image once before training and stop on unreadable files (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size, help="images per batch when embedding for evaluation (default: %(default)s)")


def add_evaluate_parser(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="compute Recall@K, MAP@R and R-precision of a SavedModel on a dataset, or of saved embeddings",
        description="Embed the test split with a SavedModel (--model, --data-dir), or read embeddings from .npz files "
        "with arrays 'embeddings' and 'labels' (--embeddings, or --queries with --gallery), and print Recall@K, "
        "MAP@R and R-precision. Datasets are evaluated leave-one-out, except In-Shop, whose queries search its gallery.",
    )
    parser.add_argument("--model", help="SavedModel folder, or a folder of numbered versions (the newest is used)")
    parser.add_argument("--dataset", default="omniglot", choices=["omniglot", "sop", "inshop", "vehicleid", "cub", "cars", "folder"], help="dataset (default: %(default)s)")
    parser.add_argument("--data-dir", help="directory holding the dataset, with --model")
    parser.add_argument("--index", default="exact", choices=["exact", "scann"], help="search used for Recall@K (default: %(default)s)")
    parser.add_argument("--k", "--recall-k", dest="recall_k", type=parse_int_list, default=None, help="K values of Recall@K; --recall-k is an alias (default: the dataset's usual list; 1,2,4,8 for omniglot and for embedding files)")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--test-list", type=int, default=800, choices=[800, 1600, 2400], help="VehicleID test set (default: %(default)s)")
    parser.add_argument("--from-tfds", action="store_true", help="read sop, cub or cars through TensorFlow Datasets, converted into --data-dir")
    parser.add_argument("--resize-size", type=int, default=None, help="shorter side before the central crop, in pixels (default: the model's input side x 256/224)")
    add_embedding_file_arguments(parser)
    parser.set_defaults(handler=run_evaluate)


def add_embedding_file_arguments(parser):
    """Add the `evaluate` flags that read embeddings from .npz files instead of a SavedModel."""
    parser.add_argument("--embeddings", metavar="FILE", help="evaluate leave-one-out on this .npz file of embeddings and labels")
    parser.add_argument("--queries", metavar="FILE", help="query embeddings and labels (.npz), searched against --gallery")
    parser.add_argument("--gallery", metavar="FILE", help="gallery embeddings and labels (.npz), with --queries")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings first; without it, rows that are not unit length are an error")


def parse_seed_list(text):
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, received {text!r}")
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers such as 0,1,2, received {text!r}")
    return values


def add_study_parser(subparsers):
    from keras_xbm.study import GRIDS

    parser = subparsers.add_parser(
        "study",
        help="compare weight curves and pair losses with the memory, over several seeds",
        description="Train each grid entry once per seed with the train defaults, then write results.csv, "
        "summary.md (mean and std of R@1 and R@4 per entry) and curves_recall.png. An entry is "
        "POSITIVE/NEGATIVE weight curves such as 'constant/step(threshold=0.5)', or a loss name such as "
        "multi_similarity, either followed by @no-memory to train without the memory.",
    )
    parser.add_argument("--dataset", default="omniglot", choices=["omniglot"], help="dataset (default: %(default)s)")
    parser.add_argument("--data-dir", required=True, help="directory holding the dataset")
    parser.add_argument("--grid", default="small", choices=sorted(GRIDS), help="preset list of entries (default: %(default)s)")
    parser.add_argument("--entry", action="append", dest="entries", metavar="ENTRY", help="an entry to run instead of the preset; repeat for several")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the train default)")
    parser.add_argument("--seeds", type=parse_seed_list, default=(0, 1, 2), help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--output-dir", default="runs/study", help="where the results and figures go (default: %(default)s)")
    parser.add_argument("--memory-size", type=int, help="memory slots of the entries with a memory (default: the train default)")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate (default: the train default)")
    parser.add_argument(
        "--normalization",
        choices=["sum", "batch", "pairs", "anchor"],
        help="normalisation of the losses made of per-pair terms (default: the train default)",
    )
    parser.set_defaults(handler=run_study_command)


def run_study_command(args):
    from keras_xbm.study import GRIDS, format_summary_table, run_study
    from keras_xbm.training import TrainConfig

    entries = args.entries or list(GRIDS[args.grid])
    overrides = {
        name: getattr(args, name)
        for name in ("memory_size", "learning_rate", "normalization")
        if getattr(args, name) is not None
    }
    summary = run_study(
        args.data_dir,
        entries,
        seeds=args.seeds,
        output_dir=args.output_dir,
        steps=args.steps,
        base_config=TrainConfig(dataset=args.dataset, **overrides),
    )
    print(format_summary_table(summary))
    written = [os.path.join(args.output_dir, name) for name in ("results.csv", "summary.md")]
    written += sorted(glob.glob(os.path.join(args.output_dir, "*.png")))
    print(f"Results: {', '.join(written)}")
    return 0


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


def given_train_options(command_line, dests):
    """Return the destinations among `dests` of the `train` options present on `command_line`."""
    parser = add_train_parser(argparse.ArgumentParser(add_help=False).add_subparsers())
    # argparse fills in a default only where the namespace has no value yet:
    # a destination still holding the marker after parsing was not given.
    not_given = object()
    namespace = argparse.Namespace(**{dest: not_given for dest in dests})
    parser.parse_args(command_line[command_line.index("train") + 1 :], namespace=namespace)
    return {dest for dest in dests if getattr(namespace, dest) is not not_given}


def train_settings(args):
    """Return the `TrainConfig` fields of a `train` command: defaults, then the `--config` file, then the flags given."""
    from keras_xbm.configs import read_config_file
    from keras_xbm.training import TrainConfig

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {key: value for key, value in vars(args).items() if key in fields}
    values["recall_ks"] = args.recall_k
    if args.config:
        given = given_train_options(args.command_line, vars(args))
        given = {"recall_ks" if dest == "recall_k" else dest for dest in given}
        for key, value in read_config_file(args.config, TrainConfig).items():
            if key not in given:
                values[key] = value
    if args.no_memory:
        values["memory_size"] = 0
    return values


def run_train(args):
    from keras_xbm.training import TrainConfig, run_training

    config = TrainConfig(**train_settings(args))
    results = run_training(config)

    memory = f"memory {config.memory_size}" if config.memory_size else "no memory"
    if config.memory_size and config.memory != "fifo" and "memory_slots" in results:
        memory = f"{config.memory} memory of {results['memory_slots']} slots, momentum {results['momentum']}"
    loss = "" if config.loss == "contrastive" else f"; loss {config.loss}"
    if "evaluation" in results:
        evaluation = results["evaluation"]
    else:
        evaluation = f"{results['test_classes']} unseen classes, {results['test_images']} images, leave-one-out"
    print()
    print(
        format_recall_table(
            results,
            f"Recall@K on the {config.dataset} test split ({evaluation}, {config.index} search; {memory}{loss})",
        )
    )
    if results.get("dropped_ks"):
        print(
            f"Not reported: Recall@K for K = {', '.join(map(str, results['dropped_ks']))}, "
            "larger than the references each query has in this test split."
        )
    replicas = f" on {results['replicas']} replicas" if results["replicas"] > 1 else ""
    print(
        f"Training: {config.steps} steps{replicas} in {results['train_seconds']:.0f} s "
        f"({results['step_ms']:.1f} ms/step)"
    )
    if results.get("chief", True):
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
    from keras_xbm.evaluation import evaluate_saved_model, evaluate_saved_model_on_benchmark

    if args.embeddings or args.queries or args.gallery:
        return run_evaluate_embeddings(args)
    if not (args.model and args.data_dir):
        raise ValueError(
            "evaluate needs --model with --data-dir, --embeddings FILE, or --queries FILE with --gallery FILE."
        )

    if args.dataset == "omniglot":
        results = evaluate_saved_model(args.model, args.data_dir, ks=args.recall_k or (1, 2, 4, 8), index=args.index)
        evaluation = f"{results['test_classes']} classes, {results['test_images']} images"
    else:
        results = evaluate_saved_model_on_benchmark(
            args.model, args.dataset, args.data_dir, ks=args.recall_k, index=args.index,
            test_list=args.test_list, from_tfds=args.from_tfds, resize_size=args.resize_size,
        )
        evaluation = results["evaluation"]
    print(
        format_recall_table(
            results,
            f"Recall@K of {results['model']} on the {args.dataset} test split ({evaluation}, {args.index} search)",
        )
    )
    if results.get("dropped_ks"):
        print(f"Not reported: Recall@K for K = {', '.join(map(str, results['dropped_ks']))}, larger than the references each query has.")
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
    add_study_parser(subparsers)
    return parser


def main(argv=None):
    # TensorFlow's C++ start-up notices say nothing a user can act on here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    # `train --config` needs the raw arguments to tell flags given from defaults.
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # TensorFlow logs every collective operation it builds under tf.distribute at INFO.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"keras-xbm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
