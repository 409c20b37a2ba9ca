"""Class-balanced P x K batches: P distinct classes per batch, K images of each."""

import collections

import numpy as np
import tensorflow as tf


class PKSampler:
    """Draw batches of dataset indices with `classes_per_batch` classes of `samples_per_class` images each.

    Every batch picks P distinct classes uniformly at random, then K distinct
    images of each class. Batches come in class-contiguous order
    (`[c0, c0, .., c1, c1, ..]`), always of size `P * K`, so the train step gets
    a fixed shape.

    Args:
        labels: integer class label of each dataset item.
        classes_per_batch: P, at least 1 and at most the number of classes.
        samples_per_class: K, at least 1.
        seed: seed of the sampler's own random generator. Defaults to `None`
            (a fresh seed).
        allow_repeats: when False (the default), every class must hold at least
            K images. When True, a class smaller than K is padded by drawing
            some of its images twice; the repeats share a sample id, so the
            losses never pair an image with its copy.

    Raises:
        ValueError: for P or K out of range, or a class smaller than K without
            `allow_repeats`.
    """

    def __init__(self, labels, classes_per_batch, samples_per_class, seed=None, allow_repeats=False):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"Expected integer labels of shape [count], received dtype {labels.dtype} and shape {labels.shape}."
            )
        members = collections.defaultdict(list)
        for index, label in enumerate(labels.tolist()):
            members[label].append(index)
        self.class_members = [np.array(members[label], np.int64) for label in sorted(members)]

        for name, value in (("classes_per_batch", classes_per_batch), ("samples_per_class", samples_per_class)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: expected a positive integer.")
        if classes_per_batch > len(self.class_members):
            raise ValueError(
                f"classes_per_batch={classes_per_batch} is larger than the {len(self.class_members)} classes "
                "in the data: lower the batch size or raise samples_per_class."
            )
        smallest = min(len(indices) for indices in self.class_members)
        if samples_per_class > smallest and not allow_repeats:
            small_label = sorted(members)[int(np.argmin([len(m) for m in self.class_members]))]
            raise ValueError(
                f"samples_per_class={samples_per_class} is larger than class {small_label}, which has "
                f"{smallest} images: expected samples_per_class <= {smallest}, or allow_repeats=True."
            )

        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.allow_repeats = allow_repeats
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.rng = np.random.default_rng(seed)

    def sample_batch(self):
        """Return one batch of dataset indices, int64 `[P * K]`."""
        chosen = self.rng.choice(len(self.class_members), self.classes_per_batch, replace=False)
        parts = []
        for class_position in chosen:
            indices = self.class_members[class_position]
            if len(indices) >= self.samples_per_class:
                parts.append(self.rng.choice(indices, self.samples_per_class, replace=False))
            else:
                # Each image once, then the shortfall drawn again: repeats only where they must be.
                extra = self.rng.choice(indices, self.samples_per_class - len(indices), replace=True)
                parts.append(np.concatenate([self.rng.permutation(indices), extra]))
        return np.concatenate(parts)

    def __iter__(self):
        while True:
            yield self.sample_batch()

    def index_dataset(self):
        """Return an endless `tf.data.Dataset` of index batches, int64 `[P * K]`."""
        return tf.data.Dataset.from_generator(
            self.__iter__, output_signature=tf.TensorSpec([self.batch_size], tf.int64)
        )


def pk_dataset(images, labels, classes_per_batch, samples_per_class, seed=None, allow_repeats=False, transform=None):
    """Return an endless dataset of `(images, {"labels", "sample_ids"})` P x K batches from in-memory arrays.

    The sample id of an image is its row index in `images`.

    Args:
        images: array `[count, ...]`.
        labels: integer array `[count]`.
        classes_per_batch, samples_per_class, seed, allow_repeats: see `PKSampler`.
        transform: optional function applied to each batch of images inside the
            pipeline (augmentation); it receives and returns a float tensor.
    """
    sampler = PKSampler(labels, classes_per_batch, samples_per_class, seed=seed, allow_repeats=allow_repeats)
    images = tf.constant(images)
    labels = tf.constant(np.asarray(labels), tf.int32)

    def gather(indices):
        batch = tf.gather(images, indices)
        if transform is not None:
            batch = transform(batch)
        targets = {"labels": tf.gather(labels, indices), "sample_ids": tf.cast(indices, tf.int32)}
        return batch, targets

    return sampler.index_dataset().map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
