import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_xbm import XBMModel, backbones, export_saved_model

FRESH_PROCESS = r"""
import json, sys
# The serving side has neither keras_xbm nor Keras: block both imports.
sys.modules["keras_xbm"] = None
sys.modules["keras"] = None
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
images = np.load(sys.argv[2])
embeddings = serve(images=tf.constant(images))["embeddings"].numpy()
np.save(sys.argv[3], embeddings)
print(json.dumps({"variables": [v.shape.as_list() for v in loaded.variables]}))
"""


@pytest.fixture(scope="module")
def trained_model():
    keras.utils.set_random_seed(0)
    network = backbones.small_cnn(input_shape=(16, 16, 1), embedding_dim=8, widths=(4, 8))
    model = XBMModel(network, memory_size=32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(64, 16, 16, 1)).astype(np.float32)
    labels = np.repeat(np.arange(16), 4)
    model.fit(images, labels, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model


def test_export_runs_without_keras_xbm_and_matches(trained_model, tmp_path):
    path = export_saved_model(trained_model.embedding_model, str(tmp_path / "omniglot"))
    assert path == str(tmp_path / "omniglot" / "1")

    images = np.random.default_rng(1).uniform(size=(5, 16, 16, 1)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, path, str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
        capture_output=True, text=True, cwd=str(tmp_path), check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served = np.load(tmp_path / "out.npy")

    expected = trained_model.predict(images, verbose=0)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)

    # The memory ([32, 8] embeddings and its int buffers) stays out of the export.
    shapes = json.loads(result.stdout.strip().splitlines()[-1])["variables"]
    assert [32, 8] not in shapes
    assert [32] not in shapes
    assert len(shapes) == len(trained_model.embedding_model.weights)


def test_saved_model_cli_shows_signature(trained_model, tmp_path):
    path = export_saved_model(trained_model, str(tmp_path / "model"))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, "show", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "inputs['images'] tensor_info:" in result.stdout
    assert "shape: (-1, 16, 16, 1)" in result.stdout
    assert "outputs['embeddings'] tensor_info:" in result.stdout
    assert "shape: (-1, 8)" in result.stdout


def test_versions_never_overwritten(trained_model, tmp_path):
    export_dir = str(tmp_path / "model")
    first = export_saved_model(trained_model, export_dir)
    second = export_saved_model(trained_model, export_dir)
    assert os.path.basename(first) == "1"
    assert os.path.basename(second) == "2"
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    with pytest.raises(FileExistsError, match="already exists"):
        export_saved_model(trained_model, export_dir, version=1)
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp
