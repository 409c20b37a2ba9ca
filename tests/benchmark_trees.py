"""Tiny dataset trees in the official on-disk formats, with real JPEG files, for the reader and training tests."""

import os

import numpy as np
import tensorflow as tf


def write_jpeg(path, seed, height=40, width=48, gray=False):
    """Write a small JPEG whose mean colour depends on `seed`; return its path."""
    rng = np.random.default_rng(seed)
    channels = 1 if gray else 3
    base = rng.integers(30, 226, size=(1, 1, channels))
    noise = rng.integers(-25, 26, size=(height, width, channels))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(tf.io.encode_jpeg(pixels, quality=90).numpy())
    return path


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def class_sizes(count, sizes=(2, 3, 4)):
    """Images per class, cycling through `sizes` so that some classes are smaller than K = 4."""
    return [sizes[index % len(sizes)] for index in range(count)]


def write_sop_tree(root, train_classes=20, test_classes=3, test_images=2):
    """Write Ebay_train.txt, Ebay_test.txt and the JPEGs; return `{split: [(relative path, class id)]}`."""
    super_names = ["bicycle", "cabinet", "chair"]
    listed = {"train": [], "test": []}
    class_id = 0
    for split, count in (("train", train_classes), ("test", test_classes)):
        sizes = class_sizes(count) if split == "train" else [test_images] * count
        lines = ["image_id class_id super_class_id path"]
        for size in sizes:
            class_id += 1
            super_id = class_id % len(super_names) + 1
            for shot in range(size):
                relative = f"{super_names[super_id - 1]}_final/{class_id:05d}_{shot}.JPG"
                write_jpeg(os.path.join(root, relative), seed=class_id * 10 + shot)
                lines.append(f"{len(lines)} {class_id} {super_id} {relative}")
                listed[split].append((relative, class_id))
        write_lines(os.path.join(root, f"Ebay_{split}.txt"), lines)
    return listed


def write_inshop_tree(root, train_items=20, test_items=3, image_folder="img"):
    """Write Eval/list_eval_partition.txt and the JPEGs; each test item has 2 queries and 2 gallery images."""
    entries = []
    for index in range(train_items + test_items):
        item = f"id_{index + 1:08d}"
        train = index < train_items
        size = class_sizes(train_items)[index] if train else 4
        for shot in range(size):
            name = f"img/WOMEN/Dresses/{item}/{shot:02d}_1_front.jpg"
            write_jpeg(os.path.join(root, image_folder, name[len("img/") :]), seed=index * 10 + shot)
            if train:
                status = "train"
            elif shot < 2:
                status = "query"
            else:
                status = "gallery"
            entries.append(f"{name} {item} {status}")
    write_lines(
        os.path.join(root, "Eval", "list_eval_partition.txt"),
        [str(len(entries)), "image_name item_id evaluation_status", *entries],
    )
    return entries


def write_vehicleid_tree(root, train_vehicles=20, test_sizes=None):
    """Write train_test_split/*.txt and image/*.jpg; test list N contains `test_sizes[N]` vehicles of 2 images."""
    test_sizes = test_sizes or {800: 3, 1600: 4, 2400: 5}
    split_dir = os.path.join(root, "train_test_split")
    train_lines = []
    for vehicle, size in enumerate(class_sizes(train_vehicles)):
        for shot in range(size):
            stem = f"{vehicle:07d}{shot}"
            write_jpeg(os.path.join(root, "image", stem + ".jpg"), seed=vehicle * 10 + shot)
            train_lines.append(f"{stem} {vehicle}")
    write_lines(os.path.join(split_dir, "train_list.txt"), train_lines)
    for test_list, count in test_sizes.items():
        lines = []
        for offset in range(count):
            vehicle = 1000 + offset
            for shot in range(2):
                stem = f"{vehicle:07d}{shot}"
                write_jpeg(os.path.join(root, "image", stem + ".jpg"), seed=vehicle * 10 + shot)
                lines.append(f"{stem} {vehicle}")
        write_lines(os.path.join(split_dir, f"test_list_{test_list}.txt"), lines)
    return train_lines


def write_cub_tree(root, classes=(1, 2, 3, 100, 101, 150, 200), images_per_class=2):
    """Write CUB_200_2011/images.txt, image_class_labels.txt and images/; return the folder."""
    folder = os.path.join(root, "CUB_200_2011")
    image_lines, label_lines = [], []
    image_id = 0
    for class_id in classes:
        for shot in range(images_per_class):
            image_id += 1
            relative = f"{class_id:03d}.Bird_{class_id}/Bird_{class_id}_{shot:04d}.jpg"
            # Every third image is grayscale, as a few CUB images are.
            write_jpeg(os.path.join(folder, "images", relative), seed=image_id, gray=image_id % 3 == 0)
            image_lines.append(f"{image_id} {relative}")
            label_lines.append(f"{image_id} {class_id}")
    write_lines(os.path.join(folder, "images.txt"), image_lines)
    write_lines(os.path.join(folder, "image_class_labels.txt"), label_lines)
    return folder


def write_cars_tree(root, classes=(1, 50, 98, 99, 150, 196), images_per_class=2):
    """Write cars_annos.mat (as the Stanford Cars release lays it out) and car_ims/; return the annotations."""
    from scipy.io import savemat

    dtype = [
        ("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object),
        ("bbox_x2", object), ("bbox_y2", object), ("class", object), ("test", object),
    ]
    records = []
    for class_id in classes:
        for shot in range(images_per_class):
            relative = f"car_ims/{len(records) + 1:06d}.jpg"
            write_jpeg(os.path.join(root, relative), seed=len(records))
            records.append((relative, 1, 1, 40, 30, class_id, shot % 2))
    annotations = np.array([records], dtype=dtype)
    class_names = np.array([[f"Car {index}" for index in range(1, 197)]], dtype=object)
    savemat(os.path.join(root, "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    return records
