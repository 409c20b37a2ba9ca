import collections

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_xbm import CrossBatchMemory


def deque_model(memory_size, batches):
    """Reference FIFO: the last `memory_size` rows written, oldest first."""
    rows = collections.deque(maxlen=memory_size)
    for embeddings, labels, ids in batches:
        rows.extend(zip(map(tuple, embeddings), labels, ids))
    return list(rows)


def memory_rows_oldest_first(memory):
    """Read the valid slots of a memory in write order, oldest first."""
    fill = int(memory.fill_count.numpy())
    pointer = int(memory.pointer.numpy())
    size = memory.memory_size
    order = range(fill) if fill < size else [(pointer + offset) % size for offset in range(size)]
    embeddings = memory.embeddings.numpy()
    labels = memory.labels.numpy()
    ids = memory.sample_ids.numpy()
    return [(tuple(embeddings[slot]), labels[slot], ids[slot]) for slot in order]


def make_batch(batch_size, dim, start_id):
    ids = np.arange(start_id, start_id + batch_size, dtype=np.int32)
    embeddings = np.stack([np.full(dim, float(i), np.float32) for i in ids])
    labels = (ids % 7).astype(np.int32)
    return embeddings, labels, ids


@settings(max_examples=40, deadline=None)
@given(
    memory_size=st.integers(1, 12),
    batch_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=10),
)
def test_memory_matches_deque_model(memory_size, batch_sizes):
    batch_sizes = [min(size, memory_size) for size in batch_sizes]
    memory = CrossBatchMemory(memory_size, embedding_dim=3)
    batches, next_id = [], 0
    for size in batch_sizes:
        batch = make_batch(size, 3, next_id)
        next_id += size
        batches.append(batch)
        memory.enqueue(*batch)

    expected = deque_model(memory_size, batches)
    assert memory_rows_oldest_first(memory) == expected
    assert int(memory.fill_count.numpy()) == min(sum(batch_sizes), memory_size)
    assert int(memory.pointer.numpy()) == sum(batch_sizes) % memory_size


def test_wraparound_non_divisible_exact_slots():
    memory = CrossBatchMemory(5, embedding_dim=1)
    for start in (0, 3, 6):
        memory.enqueue(*make_batch(3, 1, start))

    # Ids 0..8 written into 5 slots: slot s contains the last id written there.
    np.testing.assert_array_equal(memory.sample_ids.numpy(), [5, 6, 7, 8, 4])
    np.testing.assert_array_equal(memory.embeddings.numpy()[:, 0], [5, 6, 7, 8, 4])
    np.testing.assert_array_equal(memory.labels.numpy(), np.array([5, 6, 7, 8, 4]) % 7)
    assert int(memory.pointer.numpy()) == 4
    assert int(memory.fill_count.numpy()) == 5


def test_memory_equal_to_batch_size_holds_last_batch():
    memory = CrossBatchMemory(4, embedding_dim=2)
    memory.enqueue(*make_batch(4, 2, 0))
    memory.enqueue(*make_batch(4, 2, 4))
    np.testing.assert_array_equal(memory.sample_ids.numpy(), [4, 5, 6, 7])
    assert int(memory.pointer.numpy()) == 0
    assert memory.valid_mask().numpy().all()


def test_valid_mask_follows_fill_count_not_labels():
    memory = CrossBatchMemory(6, embedding_dim=2)
    embeddings = np.ones((2, 2), np.float32)
    # Label 0 and id 0 equal the zero initial values of empty slots.
    memory.enqueue(embeddings, labels=[0, 0], sample_ids=[0, 1])
    np.testing.assert_array_equal(memory.valid_mask().numpy(), [True, True, False, False, False, False])


def test_reset_empties_every_variable():
    memory = CrossBatchMemory(4, embedding_dim=2)
    memory.enqueue(*make_batch(3, 2, 10))
    memory.reset()
    assert int(memory.fill_count.numpy()) == 0
    assert int(memory.pointer.numpy()) == 0
    assert not memory.valid_mask().numpy().any()
    assert not memory.embeddings.numpy().any()
    assert not memory.sample_ids.numpy().any()


def test_enqueue_in_compiled_function():
    memory = CrossBatchMemory(5, embedding_dim=2)

    @tf.function(jit_compile=True)
    def write(embeddings, labels, ids):
        memory.enqueue(embeddings, labels, ids)

    for start in (0, 3):
        write(*make_batch(3, 2, start))
    np.testing.assert_array_equal(memory.sample_ids.numpy(), [5, 1, 2, 3, 4])
    assert int(memory.pointer.numpy()) == 1


def test_enqueue_accepts_label_column():
    memory = CrossBatchMemory(3, embedding_dim=2)
    memory.enqueue(np.ones((2, 2), np.float32), labels=np.array([[4], [5]]), sample_ids=np.array([1, 2], np.int64))
    np.testing.assert_array_equal(memory.labels.numpy()[:2], [4, 5])


@pytest.mark.parametrize(
    "memory_size, message",
    [(0, "memory_size=0"), (-3, "memory_size=-3"), (2.5, "memory_size=2.5"), (True, "memory_size=True")],
)
def test_invalid_memory_size_rejected(memory_size, message):
    with pytest.raises(ValueError, match=message):
        CrossBatchMemory(memory_size)


def test_batch_larger_than_memory_rejected():
    memory = CrossBatchMemory(4, embedding_dim=2)
    with pytest.raises(ValueError, match="batch of 6 rows does not fit a memory of 4 slots"):
        memory.enqueue(*make_batch(6, 2, 0))


def test_float_labels_rejected():
    memory = CrossBatchMemory(4, embedding_dim=2)
    with pytest.raises(ValueError, match="Expected integer labels, received dtype float32"):
        memory.enqueue(np.ones((2, 2), np.float32), labels=np.array([1.0, 2.0], np.float32), sample_ids=[0, 1])


def test_wrong_rank_embeddings_rejected():
    memory = CrossBatchMemory(4, embedding_dim=2)
    with pytest.raises(ValueError, match=r"shape \[batch, embedding_dim\], received shape \(2, 2, 1\)"):
        memory.enqueue(np.ones((2, 2, 1), np.float32), labels=[0, 1], sample_ids=[0, 1])


def test_wrong_width_rejected():
    memory = CrossBatchMemory(4, embedding_dim=2)
    with pytest.raises(ValueError, match="width 2, received width 3"):
        memory.enqueue(np.ones((2, 3), np.float32), labels=[0, 1], sample_ids=[0, 1])


def test_label_count_mismatch_rejected():
    memory = CrossBatchMemory(4, embedding_dim=2)
    with pytest.raises(ValueError, match="Expected labels with 2 entries"):
        memory.enqueue(np.ones((2, 2), np.float32), labels=[0, 1, 2], sample_ids=[0, 1])
