#!/bin/sh
# A regression from the command line: the built-in linear model on scikit-learn's diabetes data
# (float targets), minimizing Keras' Huber loss (--loss=huber), with the mean absolute error
# logged beside it. Run from the repository root:
#
#     sh examples/diabetes.sh [LOGDIR]
set -e
logdir=${1:-logdir}
python=${PYTHON:-python}
mkdir -p "$logdir"
"$python" examples/diabetes.py "$logdir/diabetes.npz"
"$python" -m train_loop --model=linear --loss=huber --metrics=mean_absolute_error \
    --dataset="$logdir/diabetes.npz" --learning_rate=0.01 --epochs=30 --batch_size=16 \
    --best_metric=validation/huber --logdir="$logdir" --run_name=diabetes
