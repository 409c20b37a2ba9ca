import numpy as np
import tensorflow as tf

from keras_xbm.plots import plot_retrieval_gallery

GREEN = np.array([44, 160, 44])  # matplotlib's tab:green
RED = np.array([214, 39, 40])  # matplotlib's tab:red


def count_color(pixels, color):
    return int(np.sum(np.abs(pixels[..., :3].astype(int) - color).sum(axis=-1) < 10))


def test_gallery_frames_hits_green_and_misses_red(tmp_path):
    queries = np.zeros((2, 8, 8, 1), np.float32)
    neighbors = np.ones((2, 3, 8, 8, 1), np.float32)
    hits = np.array([[True, True, True], [True, True, True]])
    all_hits = tf.io.decode_png(open(plot_retrieval_gallery(queries, neighbors, hits, str(tmp_path / "a.png")), "rb").read()).numpy()
    assert count_color(all_hits, GREEN) > 0
    assert count_color(all_hits, RED) == 0

    hits[1, 2] = False
    mixed = tf.io.decode_png(open(plot_retrieval_gallery(queries, neighbors, hits, str(tmp_path / "b.png")), "rb").read()).numpy()
    assert count_color(mixed, RED) > 0
    # Two rows and four columns at 1.3 inches and 100 dpi.
    assert mixed.shape[:2] == (260, 520)
