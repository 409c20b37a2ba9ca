"""Retrieval evaluation of saved embeddings, as `keras-xbm evaluate --embeddings` runs it.

An embeddings file is a NumPy `.npz` archive with two arrays: `embeddings`,
float `[count, dim]`, and `labels`, `[count]` integers or strings. Write one
with `numpy.savez("test.npz", embeddings=embeddings, labels=labels)`.
"""

import logging
import os
import zipfile

import numpy as np

from keras_xbm.retrieval.protocols import evaluate_retrieval

logger = logging.getLogger(__name__)

REQUIRED_ARRAYS = ("embeddings", "labels")


def load_embedding_file(path):
    """Read an embeddings `.npz` file and return `(embeddings, labels)`.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: when the file is not an `.npz` archive or lacks the
            arrays `embeddings` and `labels`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No embeddings file at {path!r}: expected an .npz file with arrays 'embeddings' and 'labels'.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not an .npz file (a zip archive as numpy.savez writes): "
            "expected arrays 'embeddings' [count, dim] and 'labels' [count]."
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"Could not read {path!r} as an .npz file: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} contains a single array: expected an .npz file with arrays 'embeddings' and 'labels'.")
    with archive:
        missing = [name for name in REQUIRED_ARRAYS if name not in archive.files]
        if missing:
            raise ValueError(
                f"{path!r} has no array {', '.join(repr(name) for name in missing)}: found {sorted(archive.files)}, "
                "expected 'embeddings' [count, dim] and 'labels' [count]."
            )
        embeddings, labels = archive["embeddings"], archive["labels"]
    if np.ndim(embeddings) >= 1 and np.ndim(labels) == 1 and len(labels) != len(embeddings):
        raise ValueError(
            f"{path!r} has {len(embeddings)} rows of 'embeddings' but {len(labels)} 'labels': expected one label per row."
        )
    return embeddings, labels


def evaluate_embedding_files(embeddings_path=None, queries_path=None, gallery_path=None, ks=(1, 2, 4, 8), index="exact", normalize=False):
    """Evaluate retrieval on embeddings files and return the results dictionary.

    Pass `embeddings_path` for leave-one-out evaluation (every item queries
    all the others), or `queries_path` and `gallery_path` for query against
    gallery evaluation.

    Returns:
        The `evaluate_retrieval` results (`recall@K`, `map@r`,
        `r_precision`, `queries`, `queries_without_relevant`) with the
        `protocol`, `index`, input paths, `references` (per query) and `dim`.
    """
    if embeddings_path is not None and (queries_path is not None or gallery_path is not None):
        raise ValueError("Pass either an embeddings file (leave-one-out) or a queries file with a gallery file, not both.")
    if embeddings_path is None and (queries_path is None or gallery_path is None):
        raise ValueError("Query against gallery evaluation needs both a queries file and a gallery file.")

    if embeddings_path is not None:
        embeddings, labels = load_embedding_file(embeddings_path)
        logger.info("Evaluating %s: %d embeddings, leave-one-out", embeddings_path, len(embeddings))
        results = {"protocol": "leave_one_out", "index": index, "embeddings": embeddings_path}
        results.update(evaluate_retrieval(embeddings, labels, ks=ks, index=index, normalize=normalize))
        results.update(references=int(len(labels)) - 1, dim=int(np.shape(embeddings)[-1]))
        return results

    queries, query_labels = load_embedding_file(queries_path)
    gallery, gallery_labels = load_embedding_file(gallery_path)
    logger.info("Evaluating %s against %s: %d queries, %d gallery items", queries_path, gallery_path, len(query_labels), len(gallery_labels))
    results = {"protocol": "query_gallery", "index": index, "queries_file": queries_path, "gallery_file": gallery_path}
    results.update(evaluate_retrieval(queries, query_labels, gallery, gallery_labels, ks=ks, index=index, normalize=normalize))
    results.update(references=int(len(gallery_labels)), dim=int(np.shape(queries)[-1]))
    return results
