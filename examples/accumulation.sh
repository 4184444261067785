#!/bin/sh
# Gradient accumulation on the study's convnet: the same global batch of 128, once whole and once
# as 4 micro-batches of 32 run one after another (--accumulation_steps=4), with L2, dropout and a
# cosine schedule on. The two runs train the same model, to float rounding: the regularization
# counts once per update, and dropout keeps each example's mask. train-loop-compare prints them side
# by side. Run from the repository root (the digits ship with train_loop):
#
#     sh examples/accumulation.sh [LOGDIR [FLAG...]]
#
# FLAGs go to both trainings, after the ones here: `--epochs=1` for a shorter look.
set -e
logdir=${1:-logdir}
[ $# -gt 0 ] && shift
python=${PYTHON:-python}
for steps in 1 4; do
    "$python" -m train_loop --dataset=digits --batch_size=128 --accumulation_steps=$steps \
        --l2=0.001 --dropout=0.25 --lr_schedule=cosine --lr_decay_steps=40 --epochs=4 \
        --deterministic --jit_compile=false --logdir="$logdir" --run_name=accumulation_steps=$steps "$@"
done
"$python" -m train_loop.compare "$logdir"
