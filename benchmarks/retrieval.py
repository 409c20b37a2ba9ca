"""Wall time and peak memory of retrieval evaluation at benchmark scale, on synthetic embeddings.

Every item of N synthetic unit embeddings queries all the others
(leave-one-out, as Stanford Online Products is evaluated) for Recall@K at
K = 1, 10, 100, 1000 and MAP@R. Each method runs in its own child process,
so its peak resident memory (which includes TensorFlow's allocations, unseen
by tracemalloc) is its own:

- exact: `evaluate_retrieval(index="exact")`, blocked exact ranking;
- exact_topk: `exact_search(k=1001)`, the exact top-k search, then the
  metrics from its neighbour lists;
- scann: `evaluate_retrieval(index="scann")` with the default settings,
  index building included, plus its recall of the exact top-10 neighbours
  (not timed);
- scann_r1: the same for Recall@1 and MAP@R alone, which need only the top
  max(1, R) neighbours instead of the top 1001;
- numpy: plain numpy brute force, blocks of `queries @ embeddings.T`, then
  `argpartition` and `argsort` for the top 1001;
- faiss: faiss-cpu `IndexFlatIP.search(k=1001)`, when faiss is installed.

The metrics of every method come from the same per-query results, so R@1
differences between methods are search differences.

numpy, exact and exact_topk run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE
removed from the environment, so numpy's OpenBLAS picks its kernel for the
processor. exact_haswell repeats exact with them kept. faiss always keeps
them: the OpenBLAS 0.3.15 inside the faiss-cpu wheel picks a slow generic
kernel without them on newer processors. Each row records the kernel
(threadpoolctl). Wrap timing runs in the shared lock:

    flock /tmp/keras_xbm_timing.lock python benchmarks/retrieval.py \\
        [--sizes 10000,60502,200000] [--dims 128,512] [--methods exact,scann,...]

Results: benchmarks/results/retrieval.json and benchmarks/results/retrieval.md.
"""

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSON = os.path.join(ROOT, "benchmarks", "results", "retrieval.json")
RESULTS_MARKDOWN = os.path.join(ROOT, "benchmarks", "results", "retrieval.md")
KS = (1, 10, 100, 1000)
DEPTH = 1001
METHODS = ("exact", "exact_haswell", "exact_topk", "scann", "scann_r1", "numpy", "faiss")
BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
KEEPS_BLAS_VARIABLES = {"exact_haswell", "faiss"}

logger = logging.getLogger("benchmarks.retrieval")


def clustered_embeddings(count, dim, seed=0, noise=0.55, rank=32, super_classes=12, isotropic_noise=0.1):
    """Return unit embeddings and labels of classes of 2 to 8 images (5 on average, like SOP's test set).

    Class centres lie in a random `rank`-dimensional subspace, grouped around
    `super_classes` super-category centres (SOP has 12). Images scatter
    around their class centre inside the subspace with standard deviation
    `noise / sqrt(rank)` per dimension, plus `isotropic_noise / sqrt(dim)` in
    every dimension. Trained embeddings are similarly concentrated near a
    low-dimensional subspace; `--data isotropic` drops that structure.
    """
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < count:
        sizes.append(min(int(rng.integers(2, 9)), count - sum(sizes)))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rank = min(rank, dim)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
    super_centres = rng.standard_normal((super_classes, rank))
    centres = super_centres[rng.integers(0, super_classes, len(sizes))] + rng.standard_normal((len(sizes), rank))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    within = centres[labels] + (noise / np.sqrt(rank)) * rng.standard_normal((count, rank))
    embeddings = (within @ basis.T).astype(np.float32)
    embeddings += (isotropic_noise / np.sqrt(dim)) * rng.standard_normal((count, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    order = rng.permutation(count)
    return embeddings[order], labels[order]


def isotropic_embeddings(count, dim, seed=0, noise=1.4):
    """Return unit embeddings of classes of 2 to 8 images around random centres, with noise in every dimension."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < count:
        sizes.append(min(int(rng.integers(2, 9)), count - sum(sizes)))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    embeddings = centres[labels] + (noise / np.sqrt(dim)) * rng.standard_normal((count, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    order = rng.permutation(count)
    return embeddings[order], labels[order]


# Child process: one measurement.


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def blas_kernels():
    try:
        import threadpoolctl
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(
        f"{info.get('internal_api')} {info.get('version') or ''} {info.get('architecture') or ''} x{info.get('num_threads')}".strip()
        for info in threadpoolctl.threadpool_info()
    )


def metrics_from_neighbors(labels, indices):
    from keras_xbm.retrieval import ranks_from_neighbors, relevant_counts, summarize_ranks

    counts = relevant_counts(labels, labels, leave_one_out=True)
    return summarize_ranks(ranks_from_neighbors(labels, labels[indices], counts), KS)


def drop_self(indices, first_query):
    """Remove each query's own index from `DEPTH + 1` neighbours, or the last one when absent."""
    rows = indices.shape[0]
    own = indices == (first_query + np.arange(rows))[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), indices.shape[1] - 1)
    keep = np.ones(indices.shape, bool)
    keep[np.arange(rows), drop] = False
    return indices[keep].reshape(rows, indices.shape[1] - 1)


def run_numpy(embeddings, labels):
    block = max(1, (128 * 2**20) // (4 * embeddings.shape[0]))
    neighbors = np.empty((embeddings.shape[0], DEPTH), np.int64)
    for start in range(0, embeddings.shape[0], block):
        stop = min(start + block, embeddings.shape[0])
        scores = embeddings[start:stop] @ embeddings.T
        scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-scores, DEPTH - 1, axis=1)[:, :DEPTH]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        neighbors[start:stop] = np.take_along_axis(top, order, axis=1)
    return metrics_from_neighbors(labels, neighbors)


def run_faiss(embeddings, labels):
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    neighbors = np.empty((embeddings.shape[0], DEPTH), np.int64)
    block = 16384
    for start in range(0, embeddings.shape[0], block):
        stop = min(start + block, embeddings.shape[0])
        _, found = index.search(embeddings[start:stop], DEPTH + 1)
        neighbors[start:stop] = drop_self(found, start)
    return metrics_from_neighbors(labels, neighbors)


def run_child(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    data = np.load(args.child_data)
    embeddings, labels = data["embeddings"], data["labels"]
    extra = {}
    # Every method computes its metrics with keras_xbm, so every child loads
    # TensorFlow before the clock starts and the baselines are alike.
    import keras_xbm.retrieval  # noqa: F401

    if args.child == "faiss":
        import faiss  # noqa: F401
    baseline = peak_rss_mib()

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if args.child in ("exact", "exact_haswell"):
        from keras_xbm.retrieval import evaluate_retrieval

        results = evaluate_retrieval(embeddings, labels, ks=KS, index="exact")
    elif args.child == "exact_topk":
        from keras_xbm.retrieval import exact_search

        neighbors, _ = exact_search(embeddings, k=DEPTH)
        results = metrics_from_neighbors(labels, neighbors)
    elif args.child == "scann":
        from keras_xbm.retrieval import evaluate_retrieval, scann_settings

        results = evaluate_retrieval(embeddings, labels, ks=KS, index="scann")
        extra["scann_settings"] = scann_settings(embeddings.shape[0], DEPTH + 1)
    elif args.child == "scann_r1":
        from keras_xbm.retrieval import evaluate_retrieval

        results = evaluate_retrieval(embeddings, labels, ks=(1,), index="scann")
    elif args.child == "numpy":
        results = run_numpy(embeddings, labels)
    elif args.child == "faiss":
        results = run_faiss(embeddings, labels)
    else:
        raise ValueError(f"Unknown method {args.child!r}: expected one of {', '.join(METHODS)}.")
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    peak = peak_rss_mib()

    if args.child == "scann" and args.neighbor_recall:
        from keras_xbm.retrieval import scann_neighbor_recall

        extra["neighbor_recall"] = scann_neighbor_recall(embeddings, k=10)
    print(json.dumps({
        "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak, "baseline_rss_mib": baseline,
        "results": results, "blas": blas_kernels(), **extra,
    }))


# Parent process: data, children, tables.


def measure(method, data_path, timeout, neighbor_recall):
    environment = dict(os.environ)
    if method not in KEEPS_BLAS_VARIABLES:
        for name in BLAS_VARIABLES:
            environment.pop(name, None)
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--child-data", data_path]
    if neighbor_recall:
        command.append("--neighbor-recall")
    load_before = os.getloadavg()
    try:
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "load_before": load_before}
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else f"exit {completed.returncode}", "load_before": load_before}
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    row.update(load_before=load_before, load_after=os.getloadavg())
    return row


def faiss_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(rows):
    lines = [
        "| N | D | method | wall s | CPU s | peak RSS MiB | R@1 | R@10 | R@100 | R@1000 | MAP@R | R@1 - exact (points) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['n']} | {row['dim']} | {row['method']} | {row['error']} | | | | | | | | |")
            continue
        metrics = " | ".join(
            f"{row['results'][key]:.4f}" if key in row["results"] else "" for key in ("recall@1", "recall@10", "recall@100", "recall@1000", "map@r")
        )
        delta = row.get("recall1_minus_exact_points")
        lines.append(
            f"| {row['n']} | {row['dim']} | {row['method']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['peak_rss_mib']:.0f} | "
            f"{metrics} | {'' if delta is None else f'{delta:+.2f}'} |"
        )
    return "\n".join(lines)


def check_targets(rows, size):
    """Return the targets at N = `size`, per width: exact peak, exact / faiss time, ScaNN speed-up and R@1 gap."""
    targets = []
    by_key = {(row["dim"], row["method"]): row for row in rows if row["n"] == size and "error" not in row}
    for dim in sorted({row["dim"] for row in rows if row["n"] == size}):
        exact, faiss_row, scann = by_key.get((dim, "exact")), by_key.get((dim, "faiss")), by_key.get((dim, "scann"))
        entry = {"n": size, "dim": dim}
        if exact:
            entry["exact_peak_gib"] = exact["peak_rss_mib"] / 1024
            entry["exact_peak_under_2_gib"] = entry["exact_peak_gib"] < 2.0
        if exact and faiss_row:
            entry["exact_over_faiss_wall"] = exact["wall_s"] / faiss_row["wall_s"]
            entry["exact_over_faiss_cpu"] = exact["cpu_s"] / faiss_row["cpu_s"]
            entry["exact_within_1_25x_faiss"] = entry["exact_over_faiss_wall"] <= 1.25
        if exact and scann:
            entry["exact_over_scann_wall"] = exact["wall_s"] / scann["wall_s"]
            entry["exact_over_scann_cpu"] = exact["cpu_s"] / scann["cpu_s"]
            entry["scann_recall1_gap_points"] = scann["recall1_minus_exact_points"]
            entry["scann_5x_faster"] = entry["exact_over_scann_wall"] >= 5.0
            entry["scann_recall1_within_0_2_points"] = abs(entry["scann_recall1_gap_points"]) <= 0.2
        scann_r1 = by_key.get((dim, "scann_r1"))
        if exact and scann_r1:
            entry["exact_over_scann_r1_wall"] = exact["wall_s"] / scann_r1["wall_s"]
            entry["scann_r1_recall1_gap_points"] = scann_r1["recall1_minus_exact_points"]
        targets.append(entry)
    return targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,60502,200000", help="comma-separated N values (default: %(default)s)")
    parser.add_argument("--dims", default="128,512", help="comma-separated embedding widths (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: %(default)s)")
    parser.add_argument("--data", default="clustered", choices=["clustered", "isotropic"], help="synthetic embedding model (default: %(default)s)")
    parser.add_argument("--neighbor-recall-sizes", default="10000,60502", help="N values where ScaNN's recall of the exact top 10 is measured (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement (default: %(default)s)")
    parser.add_argument("--output", default=RESULTS_JSON, help="results JSON (default: benchmarks/results/retrieval.json)")
    parser.add_argument("--markdown", default=RESULTS_MARKDOWN, help="results table (default: benchmarks/results/retrieval.md)")
    parser.add_argument("--append", action="store_true", help="keep the rows of --output measured at other sizes, widths or methods")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    parser.add_argument("--neighbor-recall", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    methods = [method for method in args.methods.split(",") if method]
    faiss_note = None
    if "faiss" in methods and not faiss_available():
        methods.remove("faiss")
        faiss_note = "faiss-cpu is not installed: no faiss rows"
        logger.warning(faiss_note)
    recall_sizes = {int(size) for size in args.neighbor_recall_sizes.split(",") if size}
    generate = clustered_embeddings if args.data == "clustered" else isotropic_embeddings

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in (int(size) for size in args.sizes.split(",")):
            for dim in (int(dim) for dim in args.dims.split(",")):
                embeddings, labels = generate(size, dim)
                data_path = os.path.join(folder, f"data_{size}_{dim}.npz")
                np.savez(data_path, embeddings=embeddings, labels=labels)
                del embeddings
                exact_recall1 = None
                for method in methods:
                    logger.info("N=%d D=%d %s ...", size, dim, method)
                    row = {"n": size, "dim": dim, "method": method}
                    row.update(measure(method, data_path, args.timeout, method == "scann" and size in recall_sizes))
                    if "error" not in row:
                        if method == "exact":
                            exact_recall1 = row["results"]["recall@1"]
                        if exact_recall1 is not None:
                            row["recall1_minus_exact_points"] = 100.0 * (row["results"]["recall@1"] - exact_recall1)
                        logger.info("  %.1f s wall, %.1f s CPU, %.0f MiB peak, R@1 %.4f", row["wall_s"], row["cpu_s"], row["peak_rss_mib"], row["results"]["recall@1"])
                    else:
                        logger.info("  %s", row["error"])
                    rows.append(row)

    if args.append and os.path.isfile(args.output):
        with open(args.output) as handle:
            previous = json.load(handle)
        if previous.get("data") == args.data:
            measured = {(row["n"], row["dim"], row["method"]) for row in rows}
            kept = [row for row in previous["rows"] if (row["n"], row["dim"], row["method"]) not in measured]
            rows = sorted(kept + rows, key=lambda row: (row["n"], row["dim"], METHODS.index(row["method"])))

    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": args.data,
        "ks": list(KS),
        "note": faiss_note,
        "rows": rows,
        "targets_at_60502": check_targets(rows, 60502),
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    table = format_table(rows)
    with open(args.markdown, "w") as handle:
        handle.write(f"Leave-one-out evaluation of {args.data} synthetic embeddings (benchmarks/retrieval.py).\n\n{table}\n")
    print(table)
    for entry in result["targets_at_60502"]:
        print(json.dumps(entry))
    print(f"Results: {args.output}, {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
