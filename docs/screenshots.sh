#!/bin/sh
# Takes the docs' TensorBoard screenshots (docs/tensorboard.md, one in the README): a real TensorBoard over a study folder, shot by
# headless Chromium (Debian's `chromium`). Usage: docs/screenshots.sh <study folder> [out folder]
set -eu
study=$1
out=${2:-$(dirname "$0")}
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tensorboard --logdir "$study" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
board=$!
trap 'kill $board' EXIT
for _ in $(seq 120); do
  curl -sf --noproxy '*' "http://127.0.0.1:$port/data/runs" | grep -q train && break
  sleep 1
done

shot() {  # shot <file> <URL fragment> [WIDTH,HEIGHT]: the dashboard in the state the fragment names.
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --no-proxy-server \
    --hide-scrollbars --window-size="${3:-1280,860}" --virtual-time-budget=20000 \
    --screenshot="$out/$1" "http://127.0.0.1:$port/#$2" 2>/dev/null
}

shot tensorboard-losses.png 'scalars&tagFilter=loss%2F&regexInput=train&_smoothingWeight=0'
shot tensorboard-norms.png 'scalars&tagFilter=weight_norm%2Fconv1%7Cgradient_norm%2Fconv1&regexInput=train&_smoothingWeight=0'
shot tensorboard-histograms.png 'histograms&tagFilter=kernel%2Fconv1&regexInput=train'
shot tensorboard-confusion.png 'images&regexInput=test'
shot tensorboard-hparams.png 'hparams' 1900,420  # Wide: the metrics come after the settings.
