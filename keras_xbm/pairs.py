"""Similarities and positive / negative masks between queries and a reference set.

Every pair loss of keras_xbm is a function of a similarity matrix `S[i, j]`
between query `i` (a row of the current batch) and reference `j` (a row of the
batch itself, of the memory, or of both) plus two boolean masks:

- `pos_mask[i, j]`: same label, a different sample, a valid reference;
- `neg_mask[i, j]`: a different label, a different sample, a valid reference.

A pair in neither mask is ignored. Which reference is "the query itself" is
decided by sample id, so a query never pairs with its own slot in the memory,
nor with an older copy of the same image stored there, whatever their
similarity is.
"""

import tensorflow as tf

from keras_xbm.memory import as_int32_vector


def cosine_similarity(queries, references):
    """Return `queries @ references.T` in float32, the cosine similarity of unit rows.

    Args:
        queries: float `[num_queries, dim]`, L2-normalised rows.
        references: float `[num_references, dim]`, L2-normalised rows.

    Returns:
        float32 `[num_queries, num_references]`.

    Raises:
        ValueError: when either input is not 2-D or the widths differ.
    """
    queries = tf.cast(tf.convert_to_tensor(queries), tf.float32)
    references = tf.cast(tf.convert_to_tensor(references), tf.float32)
    for name, tensor in (("queries", queries), ("references", references)):
        if tensor.shape.rank != 2:
            raise ValueError(f"Expected {name} of shape [count, dim], received shape {tensor.shape}.")
    query_dim, reference_dim = queries.shape[-1], references.shape[-1]
    if query_dim is not None and reference_dim is not None and query_dim != reference_dim:
        raise ValueError(
            f"Queries have width {query_dim} but references have width {reference_dim}: "
            "both must come from the same embedding head."
        )
    return tf.matmul(queries, references, transpose_b=True)


def pair_masks(query_labels, ref_labels, query_ids=None, ref_ids=None, ref_valid=None):
    """Build the positive and negative masks of queries against references.

    Args:
        query_labels: integer `[num_queries]`.
        ref_labels: integer `[num_references]`.
        query_ids: integer `[num_queries]` sample ids, or `None`.
        ref_ids: integer `[num_references]` sample ids, or `None`. Pairs whose
            ids are equal are dropped from both masks (the query itself, or a
            stale copy of it). With ids missing, no pair is dropped by id.
        ref_valid: bool `[num_references]`, false for empty memory slots, or
            `None` when every reference is valid.

    Returns:
        `(pos_mask, neg_mask)`, bool `[num_queries, num_references]`.
    """
    query_labels = as_int32_vector(query_labels, "query_labels")
    ref_labels = as_int32_vector(ref_labels, "ref_labels")
    same_label = tf.equal(query_labels[:, None], ref_labels[None, :])
    keep = tf.ones_like(same_label)

    if (query_ids is None) != (ref_ids is None):
        raise ValueError("Pass both query_ids and ref_ids, or neither.")
    if query_ids is not None:
        query_ids = as_int32_vector(query_ids, "query_ids")
        ref_ids = as_int32_vector(ref_ids, "ref_ids")
        keep = tf.logical_not(tf.equal(query_ids[:, None], ref_ids[None, :]))
    if ref_valid is not None:
        keep = tf.logical_and(keep, tf.convert_to_tensor(ref_valid, tf.bool)[None, :])

    pos_mask = tf.logical_and(same_label, keep)
    neg_mask = tf.logical_and(tf.logical_not(same_label), keep)
    return pos_mask, neg_mask


def in_batch_pairs(embeddings, labels, sample_ids=None):
    """Return `(similarity, pos_mask, neg_mask)` of a batch against itself.

    With `sample_ids=None` each row is taken as its own sample, so only the
    diagonal is dropped; with ids, every pair of rows sharing an id is dropped
    (a batch that repeats an image has no positive pair of it with itself).
    """
    similarity = cosine_similarity(embeddings, embeddings)
    if sample_ids is None:
        sample_ids = tf.range(tf.shape(similarity)[0])
    pos_mask, neg_mask = pair_masks(labels, labels, sample_ids, sample_ids)
    return similarity, pos_mask, neg_mask
