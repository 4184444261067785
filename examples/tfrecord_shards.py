"""Fashion-MNIST as a folder of TFRecord shards, streamed by `--dataset=tfrecord:FOLDER`.

Writes `FOLDER/train-0000-of-0004.tfrecord` ... and `FOLDER/test-0000-of-0001.tfrecord`, each
record a `tf.train.Example` with an `image` (PNG bytes) and an integer `label`, from Debian's
Fashion-MNIST files (package dataset-fashion-mnist). Run from the repository root:

    python examples/tfrecord_shards.py FOLDER [NUM_TRAIN]

`sh examples/tfrecord_resume.sh` writes them, trains, kills the run mid-epoch and resumes it.
"""

from __future__ import annotations

import gzip
import os
import sys

import numpy as np

from train_loop.data.tfrecords import write_shards  # The layout's writer, next to its reader.

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped), as an array of its shape."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    dimensions = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def main(folder: str, num_train: int = 60_000) -> None:
    for split, prefix, count, shards in (("train", "train", num_train, 4), ("test", "t10k", num_train // 6, 1)):
        images = read_idx(os.path.join(FASHION_MNIST, f"{prefix}-images-idx3-ubyte.gz"))[:count]
        labels = read_idx(os.path.join(FASHION_MNIST, f"{prefix}-labels-idx1-ubyte.gz"))[:count]
        write_shards(folder, split, images, labels, num_shards=shards)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
