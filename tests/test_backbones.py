"""ResNet-50 with the embedding head, its normalisation layer, and the L2 form of weight decay."""

import keras
import numpy as np
import pytest

from keras_xbm import backbones
from keras_xbm.training import TrainConfig, add_l2_weight_decay, build_model, build_optimizer


@pytest.fixture(scope="module")
def resnet_max():
    keras.utils.set_random_seed(0)
    return backbones.resnet50((32, 32, 3), embedding_dim=16, pooling="max")


def test_resnet50_outputs_unit_embeddings(resnet_max):
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    embeddings = np.asarray(resnet_max(images))
    assert embeddings.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert resnet_max.input_shape == (None, 32, 32, 3)
    assert isinstance(resnet_max.get_layer("pool"), keras.layers.GlobalMaxPooling2D)


def test_resnet50_average_pooling_and_frozen_batch_norm():
    network = backbones.resnet50((32, 32, 3), embedding_dim=8, pooling="avg", freeze_batch_norm=True)
    assert isinstance(network.get_layer("pool"), keras.layers.GlobalAveragePooling2D)
    body = network.get_layer("resnet50")
    batch_norms = [layer for layer in body.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batch_norms) == 53
    assert not any(layer.trainable for layer in batch_norms)
    # Frozen: only convolution kernels and biases (106) and the head's dense layer (2) still train.
    assert len(network.trainable_weights) == 108


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pooling": "sum"}, "Unknown pooling='sum'"),
        ({"weights": "random"}, "Invalid weights='random'"),
        ({"input_shape": (16, 16, 3)}, r"Invalid input_shape=\(16, 16, 3\)"),
        ({"input_shape": (32, 32, 1)}, r"Invalid input_shape=\(32, 32, 1\)"),
    ],
)
def test_resnet50_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbones.resnet50(**kwargs)


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_normalization_layer_matches_keras_applications(mode):
    images = np.random.default_rng(1).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = keras.applications.imagenet_utils.preprocess_input(images.copy(), mode=mode)
    layer = backbones.ImageNetNormalization(mode)
    np.testing.assert_allclose(np.asarray(layer(images)), expected, rtol=1e-5, atol=1e-4)
    assert backbones.ImageNetNormalization.from_config(layer.get_config()).mode == mode


def test_caffe_normalization_reverses_channels_and_subtracts_means():
    pixel = np.array([[[[10.0, 20.0, 30.0]]]], np.float32)
    result = np.asarray(backbones.ImageNetNormalization("caffe")(pixel))[0, 0, 0]
    np.testing.assert_allclose(result, [30.0 - 103.939, 20.0 - 116.779, 10.0 - 123.68], rtol=1e-5)


def test_small_cnn_image_network_rescales_rgb():
    network = backbones.image_network("small_cnn", 16, embedding_dim=8)
    assert network.input_shape == (None, 16, 16, 3)
    assert float(np.asarray(network.get_layer("rescale")(np.full((1, 2, 2, 3), 255.0, np.float32))).max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Unknown backbone='vgg'"):
        backbones.image_network("vgg", 16)


def test_l2_weight_decay_term():
    network = backbones.image_network("small_cnn", 16, embedding_dim=8)
    add_l2_weight_decay(network, 5e-4)
    expected = 5e-4 / 2 * sum(float(np.sum(np.square(np.asarray(w)))) for w in network.trainable_weights)
    assert float(sum(np.asarray(loss) for loss in network.losses)) == pytest.approx(expected, rel=1e-5)


def test_weight_decay_modes_build_the_expected_optimizer():
    decoupled = build_optimizer(TrainConfig(dataset="cub", data_dir="d", weight_decay=5e-4, weight_decay_mode="decoupled"))
    assert decoupled.weight_decay == pytest.approx(5e-4)
    l2 = build_optimizer(TrainConfig(dataset="cub", data_dir="d", weight_decay=5e-4, weight_decay_mode="l2"))
    assert l2.weight_decay is None
    config = TrainConfig(dataset="cub", data_dir="d", backbone="small_cnn", image_size=16, weight_decay=5e-4)
    model = build_model(config, (16, 16, 3))
    assert len(model.losses) == len(model.trainable_weights)


def test_build_model_uses_configured_loss():
    config = TrainConfig(data_dir="d", loss="multi_similarity", image_size=16, memory_size=64)
    assert type(build_model(config, (16, 16, 1)).pair_loss).__name__ == "MultiSimilarityLoss"
    config = TrainConfig(data_dir="d", negative_threshold=0.3, normalization="anchor", image_size=16, memory_size=64)
    contrastive = build_model(config, (16, 16, 1)).pair_loss
    assert type(contrastive).__name__ == "ContrastiveLoss"
    assert contrastive.negative_threshold == 0.3
    assert contrastive.normalization == "anchor"
