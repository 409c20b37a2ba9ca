"""Embedding networks: backbones followed by an embedding head (dense, then L2 normalisation)."""

import keras


def embedding_head(features, embedding_dim, name="embedding"):
    """Project pooled features to `embedding_dim` and L2-normalise each row."""
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"Invalid embedding_dim={embedding_dim!r}: expected a positive integer.")
    embeddings = keras.layers.Dense(embedding_dim, name=f"{name}_dense")(features)
    # float32 output under a mixed precision policy, so unit rows stay unit length.
    return keras.layers.UnitNormalization(axis=-1, dtype="float32", name=f"{name}_l2")(embeddings)


def small_cnn(input_shape=(32, 32, 1), embedding_dim=128, widths=(32, 64, 128, 128), name="small_cnn"):
    """A small convolutional network for grayscale characters, fast enough to train on a CPU.

    Each stage is a 3x3 convolution, batch normalisation and ReLU, followed by
    2x2 max pooling on every stage but the last; global average pooling and the
    embedding head close the network. On 32x32 inputs with the default widths
    it has about 0.3 M parameters.

    Args:
        input_shape: `(height, width, channels)` of the input images, float in
            [0, 1]. Defaults to `(32, 32, 1)`.
        embedding_dim: width of the L2-normalised output. Defaults to 128.
        widths: number of filters of each stage. Defaults to `(32, 64, 128, 128)`.
        name: model name. Defaults to `"small_cnn"`.

    Returns:
        A functional `keras.Model` from images to unit-length embeddings.
    """
    if len(input_shape) != 3:
        raise ValueError(f"Invalid input_shape={input_shape!r}: expected (height, width, channels).")
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = inputs
    for stage, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{stage}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{stage}")(x)
        x = keras.layers.ReLU(name=f"relu{stage}")(x)
        if stage < len(widths) - 1:
            x = keras.layers.MaxPooling2D(2, name=f"pool{stage}")(x)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, embedding_head(features, embedding_dim), name=name)
