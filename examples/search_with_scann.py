"""Search unseen characters with an exported SavedModel and a ScaNN index, and draw the results.

    python examples/search_with_scann.py --model saved_models/omniglot \
        --data-dir ../shared/data/omniglot --output gallery.png

The SavedModel is loaded with plain TensorFlow, as a serving process would.
Every test image is indexed; eight of them query the index, and the PNG shows
each query with its five nearest neighbours (green: same character).
"""

import argparse

import numpy as np

from keras_xbm.data import load_omniglot
from keras_xbm.evaluation import embed_with_signature, load_serving_function, resolve_saved_model
from keras_xbm.plots import plot_retrieval_gallery
from keras_xbm.retrieval import build_scann_searcher


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="saved_models/omniglot", help="SavedModel or folder of versions")
    parser.add_argument("--data-dir", required=True, help="folder with the two Omniglot zips")
    parser.add_argument("--output", default="gallery.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--k", type=int, default=5, help="neighbours shown per query (default: %(default)s)")
    args = parser.parse_args()

    serve, input_spec = load_serving_function(resolve_saved_model(args.model))
    _, test = load_omniglot(args.data_dir, image_size=int(input_spec.shape[1]))
    gallery = embed_with_signature(serve, test.images)

    # k + 1 neighbours, because each query is also in the index.
    searcher = build_scann_searcher(gallery, k=args.k + 1)
    queries = np.random.default_rng(0).choice(len(test), 8, replace=False)
    found, _ = searcher.search_batched(gallery[queries])
    neighbors = np.array([[n for n in row if n != q][: args.k] for q, row in zip(queries, found)])

    hits = test.labels[neighbors] == test.labels[queries][:, None]
    plot_retrieval_gallery(test.images[queries], test.images[neighbors], hits, args.output)
    print(f"Precision@{args.k} of the {len(queries)} queries: {hits.mean():.3f}; picture: {args.output}")


if __name__ == "__main__":
    main()
