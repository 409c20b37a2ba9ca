"""Checks of the arrays that retrieval search and metrics take.

Every check raises `ValueError` naming the array, the value received and what
was expected, so a bad evaluation stops before it prints a wrong number.
"""

import numpy as np

# Largest deviation of a row's L2 norm from 1 that still counts as unit length.
# float32 normalisation lands within about 1e-6 of 1, and embeddings stored as
# float16 within about 1e-3.
UNIT_NORM_TOLERANCE = 1e-3

ROWS_SHOWN = 10


def format_rows(rows):
    """Return up to `ROWS_SHOWN` row numbers as text, with "..." when more exist."""
    shown = ", ".join(str(row) for row in rows[:ROWS_SHOWN])
    return shown + (" ..." if len(rows) > ROWS_SHOWN else "")


def check_embeddings(embeddings, name):
    """Return `embeddings` as a float32 2-D array, rejecting NaN and Inf rows.

    Args:
        embeddings: array-like `[count, dim]`.
        name: the name used in error messages, such as `"queries"`.

    Returns:
        A float32 C-contiguous array `[count, dim]`.

    Raises:
        ValueError: when `embeddings` is not 2-D, has zero width, or has rows
            holding NaN or Inf (the message gives their count and first rows).
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"Expected {name} of shape [count, dim], received shape {embeddings.shape}.")
    if embeddings.shape[1] == 0:
        raise ValueError(f"Expected {name} with at least one column, received shape {embeddings.shape}.")
    bad_rows = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"{name} has {bad_rows.size} row(s) with NaN or Inf values: rows {format_rows(bad_rows)}.")
    return embeddings


def check_search_inputs(queries, references, k):
    """Check the inputs of a k-nearest-neighbour search.

    Args:
        queries: array-like `[num_queries, dim]`.
        references: array-like `[num_references, dim]`, or `None` for
            leave-one-out search within `queries`.
        k: number of neighbours per query.

    Returns:
        `(queries, references, available)`: float32 arrays (`references` is
        `queries` in leave-one-out search) and the number of references each
        query can be matched with.

    Raises:
        ValueError: for NaN or Inf rows, widths that differ, a `k` that is not
            a positive integer, or a `k` larger than the references available.
    """
    leave_one_out = references is None
    queries = check_embeddings(queries, "queries")
    references = queries if leave_one_out else check_embeddings(references, "references")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"Queries have width {queries.shape[1]} but references have width {references.shape[1]}."
        )
    available = references.shape[0] - (1 if leave_one_out else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"Invalid k={k!r}: expected a positive integer.")
    if k > available:
        raise ValueError(
            f"k={k} is larger than the {available} references available to each query: expected k <= {available}."
        )
    return queries, references, available


def check_labels(labels, count, name):
    """Return `labels` as a 1-D array of `count` entries.

    Raises:
        ValueError: when `labels` is not 1-D or its length differs from `count`,
            the number of embedding rows.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"Expected {name} of shape [count], received shape {labels.shape}.")
    if labels.shape[0] != count:
        raise ValueError(
            f"Expected one label per embedding row: {name} has {labels.shape[0]} entries "
            f"but the embeddings have {count} rows."
        )
    return labels


def label_kind(labels):
    """Return "number", "text" or the dtype name of a label array."""
    if labels.dtype.kind in "biuf":
        return "number"
    if labels.dtype.kind in "US":
        return "text"
    return str(labels.dtype)


def check_label_kinds(query_labels, reference_labels):
    """Raise `ValueError` when query and reference labels are of different kinds, such as numbers and strings.

    Numbers never equal strings, so every query would silently count as a miss.
    """
    query_kind, reference_kind = label_kind(query_labels), label_kind(reference_labels)
    if query_kind != reference_kind:
        raise ValueError(
            f"Query labels of dtype {query_labels.dtype} cannot be compared with reference labels "
            f"of dtype {reference_labels.dtype}: expected labels of one kind, such as integers on both sides."
        )


def check_not_empty(embeddings, name):
    """Raise `ValueError` when `embeddings` has no rows."""
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {embeddings.shape}): expected at least one row.")


def unit_norm_violations(embeddings, tolerance=UNIT_NORM_TOLERANCE):
    """Return the indices of rows whose L2 norm differs from 1 by more than `tolerance`."""
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    return np.flatnonzero(np.abs(norms - 1.0) > tolerance), norms


def check_unit_norm(embeddings, name, tolerance=UNIT_NORM_TOLERANCE):
    """Raise `ValueError` unless every row of `embeddings` has L2 norm 1 within `tolerance`.

    Ranking by inner product equals ranking by cosine similarity only for
    unit-length rows, which the retrieval metrics assume.
    """
    bad_rows, norms = unit_norm_violations(embeddings, tolerance)
    if bad_rows.size:
        raise ValueError(
            f"{name} has {bad_rows.size} row(s) whose L2 norm is not 1 (within {tolerance:g}): rows "
            f"{format_rows(bad_rows)}, norms from {norms[bad_rows].min():.6g} to {norms[bad_rows].max():.6g}. "
            "The metrics rank by inner product, which equals cosine similarity only for unit-length rows: "
            "L2-normalise the embeddings, or pass normalize=True (--normalize on the command line)."
        )


def l2_normalize(embeddings, name):
    """Return `embeddings` with every row divided by its L2 norm.

    Raises:
        ValueError: when a row is all zeros, since it has no direction.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    zero_rows = np.flatnonzero(norms == 0.0)
    if zero_rows.size:
        raise ValueError(
            f"{name} has {zero_rows.size} all-zero row(s), which cannot be L2-normalised: rows {format_rows(zero_rows)}."
        )
    return (embeddings / norms[:, None]).astype(np.float32)


def check_ks(ks):
    """Return `ks` as a tuple of positive Python ints, in the order given, without repeats.

    Raises:
        ValueError: when `ks` is empty or contains a value that is not a positive integer.
    """
    ks = tuple(ks)
    if not ks:
        raise ValueError("Expected at least one K value, received an empty list.")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"Invalid K={k!r}: expected positive integers such as (1, 2, 4, 8).")
    return tuple(dict.fromkeys(int(k) for k in ks))
