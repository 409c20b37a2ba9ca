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
    2x2 max pooling on every stage but the last. Global average pooling and the
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


BACKBONES = ("small_cnn", "resnet50")
POOLINGS = ("max", "avg")


@keras.saving.register_keras_serializable(package="keras_xbm")
class ImageNetNormalization(keras.layers.Layer):
    """The input normalisation of `keras.applications` for `mode`, as a layer of the network.

    `mode="caffe"` (ResNet-50's) turns RGB in [0, 255] into BGR minus the
    ImageNet channel means. `"tf"` scales to [-1, 1]. `"torch"` scales to
    [0, 1] and standardises by the ImageNet means and deviations. Because the
    normalisation is a layer of the network, the exported SavedModel takes
    the same RGB pixels as the training pipeline.

    Args:
        mode: `"caffe"`, `"tf"` or `"torch"`. Defaults to `"caffe"`.
    """

    def __init__(self, mode="caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch"):
            raise ValueError(f"Unknown mode={mode!r}: expected caffe, tf or torch.")
        self.mode = mode

    def call(self, inputs):
        return keras.applications.imagenet_utils.preprocess_input(inputs, data_format="channels_last", mode=self.mode)

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode)
        return config


def freeze_batch_normalization(model):
    """Set every `BatchNormalization` layer of `model` to inference mode with fixed weights; return their count."""
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Keras 3 runs a non-trainable BatchNormalization with its moving statistics.
            layer.trainable = False
            count += 1
        elif isinstance(layer, keras.Model):
            count += freeze_batch_normalization(layer)
    return count


def resnet50(input_shape=(224, 224, 3), embedding_dim=128, pooling="max", freeze_batch_norm=False, weights=None, name="resnet50"):
    """ResNet-50 (He et al., CVPR 2016) from `keras.applications` with global pooling and the embedding head.

    The network takes RGB images as float in [0, 255] and applies
    ResNet-50's own normalisation (`ImageNetNormalization("caffe")`) as its
    first layer, then the convolutional body, global max or average pooling
    of the 2048 final channels and `embedding_head`.

    Args:
        input_shape: `(height, width, 3)`; both sides at least 32. Defaults
            to `(224, 224, 3)`.
        embedding_dim: width of the L2-normalised output. Defaults to 128.
        pooling: `"max"` or `"avg"` global pooling. Defaults to `"max"`.
        freeze_batch_norm: run every batch normalisation layer of the body
            with its moving statistics and fixed scale and offset (useful
            with ImageNet weights and small batches). Defaults to False.
        weights: `None` (random initialisation) or `"imagenet"` (downloads
            Keras' ImageNet weights once, so it needs a network). Defaults to
            `None`.
        name: model name. Defaults to `"resnet50"`.

    Returns:
        A functional `keras.Model` from images to unit-length embeddings.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling={pooling!r}: expected max or avg.")
    if weights not in (None, "imagenet"):
        raise ValueError(f"Invalid weights={weights!r}: expected None or 'imagenet'.")
    if len(input_shape) != 3 or input_shape[-1] != 3 or min(input_shape[:2]) < 32:
        raise ValueError(f"Invalid input_shape={input_shape!r}: expected (height, width, 3) with both sides at least 32.")
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    normalized = ImageNetNormalization("caffe", name="normalization")(inputs)
    body = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=tuple(input_shape))
    if freeze_batch_norm:
        freeze_batch_normalization(body)
    features = body(normalized)
    if pooling == "max":
        pooled = keras.layers.GlobalMaxPooling2D(name="pool")(features)
    else:
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, embedding_head(pooled, embedding_dim), name=name)


def image_network(backbone, image_size, embedding_dim=128, pooling="max", freeze_batch_norm=False, weights=None):
    """Build the embedding network of an RGB image benchmark, taking `[batch, image_size, image_size, 3]` pixels in [0, 255].

    Args:
        backbone: `"resnet50"` (see `resnet50`) or `"small_cnn"`, which
            rescales the pixels to [0, 1] and runs `small_cnn` on three
            channels (for quick runs on a CPU; it ignores the other options).
        image_size: side of the square input images.
        embedding_dim, pooling, freeze_batch_norm, weights: see `resnet50`.
    """
    if backbone == "resnet50":
        return resnet50((image_size, image_size, 3), embedding_dim, pooling, freeze_batch_norm, weights)
    if backbone == "small_cnn":
        inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
        scaled = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
        outputs = small_cnn(input_shape=(image_size, image_size, 3), embedding_dim=embedding_dim)(scaled)
        return keras.Model(inputs, outputs, name="small_cnn_rgb")
    raise ValueError(f"Unknown backbone={backbone!r}: expected one of {', '.join(BACKBONES)}.")
