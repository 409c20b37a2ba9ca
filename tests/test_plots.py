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


def decode(path):
    return tf.io.decode_png(open(path, "rb").read()).numpy()


def test_weight_curve_lines_hold_curve_values():
    import matplotlib.pyplot as plt

    from keras_xbm.plots import draw_weight_curves
    from keras_xbm.weighting import Constant, Exponential, Softmax, Step

    figure, axis = plt.subplots()
    curves = {"w_pos": Constant(1.0), "w_neg": Step(0.5) * Exponential(4.0, 0.5), "softmax": Softmax(3.0, normalize="sum")}
    lines = draw_weight_curves(axis, curves, num_points=5)
    plt.close(figure)
    grid = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert [line.get_label() for line in lines] == ["w_pos", "w_neg", "softmax"]
    np.testing.assert_allclose(lines[0].get_xdata(), grid)
    np.testing.assert_allclose(lines[0].get_ydata(), np.ones(5))
    np.testing.assert_allclose(lines[1].get_ydata(), [0.0, 0.0, 0.0, 0.0, np.exp(2.0)], rtol=1e-6)
    # A softmax curve is drawn with the points of S as the anchor's pairs.
    np.testing.assert_allclose(lines[2].get_ydata(), np.exp(3.0 * grid) / np.exp(3.0 * grid).sum(), rtol=1e-5)


def test_weight_curves_png_with_histograms(tmp_path):
    from keras_xbm.plots import plot_weight_curves
    from keras_xbm.weighting import Constant, Step

    curves = [("w_pos", Constant(1.0)), ("w_neg", Step(0.5))]
    plain = decode(plot_weight_curves(curves, str(tmp_path / "plain.png")))
    rng = np.random.default_rng(0)
    with_data = decode(
        plot_weight_curves(
            curves,
            str(tmp_path / "hist.png"),
            positive_similarities=rng.uniform(0.3, 1.0, 500),
            negative_similarities=rng.uniform(-1.0, 0.6, 5000),
            title="batch against memory",
        )
    )
    # 6 x 3.6 inches at 100 dpi.
    assert plain.shape[:2] == (360, 600)
    assert with_data.shape[:2] == (360, 600)
    # The histograms are drawn at alpha 0.3: pale green and pale red appear only with data.
    pale_green = np.array([192, 226, 192])
    pale_red = np.array([243, 189, 190])
    assert count_color(plain, pale_green) == 0
    assert count_color(with_data, pale_green) > 100
    assert count_color(with_data, pale_red) > 100


def test_curves_with_recall_png(tmp_path):
    from keras_xbm.plots import plot_curves_with_recall
    from keras_xbm.weighting import Constant, Step

    rows = [
        {"label": "constant/step", "positive_curve": Constant(1.0), "negative_curve": Step(0.5), "recall_mean": 0.7, "recall_std": 0.01},
        {"label": "circle", "positive_curve": None, "negative_curve": None, "recall_mean": 0.6, "recall_std": 0.02},
    ]
    image = decode(plot_curves_with_recall(rows, str(tmp_path / "study.png")))
    # 8 x (1.25 * 2 + 0.6) inches at 80 dpi.
    assert image.shape[:2] == (248, 640)
    # Antialiasing blends thin lines with the white background, so count pixels by their dominant channel.
    pixels = image[..., :3].astype(int)
    greenish = (pixels[..., 1] > pixels[..., 0] + 50) & (pixels[..., 1] > pixels[..., 2] + 50)
    reddish = (pixels[..., 0] > pixels[..., 1] + 50) & (pixels[..., 0] > pixels[..., 2] + 50)
    assert greenish.sum() > 50
    assert reddish.sum() > 50
