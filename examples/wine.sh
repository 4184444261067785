#!/bin/sh
# Trains examples/wine.py:build on scikit-learn's wine data from the command line: an npz whose
# inputs (13 floats) and classes (3) are not MNIST's. Run from the repository root:
#
#     sh examples/wine.sh [LOGDIR]
set -e
logdir=${1:-logdir}
python=${PYTHON:-python}
mkdir -p "$logdir"
"$python" examples/wine.py "$logdir/wine.npz"
"$python" -m train_loop --model=examples/wine.py:build --dataset="$logdir/wine.npz" \
    --l2=0.001 --epochs=20 --batch_size=16 --logdir="$logdir" --run_name=wine
