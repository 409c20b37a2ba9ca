import os
import pathlib
import zipfile

import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parent.parent
OMNIGLOT_CANDIDATES = [REPO.parent / "shared" / "data" / "omniglot", pathlib.Path("/work/shared/data/omniglot")]


def find_omniglot_dir():
    """Locate the real Omniglot zips: $KERAS_XBM_OMNIGLOT_DIR, then ../shared/data/omniglot."""
    override = os.environ.get("KERAS_XBM_OMNIGLOT_DIR")
    candidates = [pathlib.Path(override)] if override else OMNIGLOT_CANDIDATES
    for candidate in candidates:
        if (candidate / "images_background_small1.zip").is_file():
            return candidate
    raise FileNotFoundError(
        "The Omniglot zips were not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Set KERAS_XBM_OMNIGLOT_DIR to the folder holding images_background_small1.zip and images_background_small2.zip."
    )


@pytest.fixture(scope="session")
def omniglot_dir():
    return str(find_omniglot_dir())


def encode_ink_png(ink):
    """Encode float ink in [0, 1] of shape [height, width] as a black-on-white PNG."""
    pixels = np.round((1.0 - np.asarray(ink)) * 255.0).astype(np.uint8)[..., None]
    return tf.io.encode_png(pixels).numpy()


def write_omniglot_zip(path, archive, images_by_class):
    """Write a zip in the Omniglot layout from {(alphabet, character): [ink, ...]}."""
    with zipfile.ZipFile(path, "w") as handle:
        for (alphabet, character), images in images_by_class.items():
            for drawing, ink in enumerate(images):
                handle.writestr(f"{archive}/{alphabet}/{character}/{drawing:04d}_{drawing:02d}.png", encode_ink_png(ink))
