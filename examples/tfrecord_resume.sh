#!/bin/sh
# Streams Fashion-MNIST from TFRecord shards, kills the run mid-epoch with SIGKILL, and resumes
# it: the data's position (the shuffle buffer included) is in every checkpoint, so the resumed
# run continues from the example where the checkpoint stood. Run from the repository root:
#
#     sh examples/tfrecord_resume.sh [LOGDIR]
#
# It writes 6,000 training and 1,000 test images (Debian's dataset-fashion-mnist files) as
# LOGDIR/fashion-shards/train-000i-of-0004.tfrecord and test-0000-of-0001.tfrecord.
set -e
logdir=${1:-logdir}
python=${PYTHON:-python}
mkdir -p "$logdir"
"$python" examples/tfrecord_shards.py "$logdir/fashion-shards" 6000
set -- --dataset=tfrecord:"$logdir/fashion-shards" --model=linear --epochs=2 --batch_size=64 \
    --shuffle_buffer=10000 --checkpoint_every=40 --steps_per_loop=20 --deterministic --jit_compile=false \
    --logdir="$logdir" --run_name=fashion-streamed
"$python" -m train_loop "$@" &
run=$!
# SIGKILL once the first checkpoint is written (within 2 minutes): mid-epoch, 40 steps of 84.
waited=0
while [ ! -f "$logdir/fashion-streamed/checkpoints/checkpoint" ] && [ "$waited" -lt 1200 ]; do
    sleep 0.1
    waited=$((waited + 1))
done
kill -9 "$run"
wait "$run" || echo "killed the run mid-epoch (status $?); the same command resumes it:"
"$python" -m train_loop "$@"
