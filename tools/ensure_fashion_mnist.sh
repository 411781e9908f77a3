#!/usr/bin/env bash
# Makes Fashion-MNIST available for the demo and the tests: Debian ships it as `dataset-fashion-mnist`.
# Installs it when it is missing and we are root; otherwise says what to do. Never downloads by itself.
set -euo pipefail
IFS=: read -ra folders <<< "${DLCOURSE_DATA:-}"
for d in "${folders[@]}"; do
  [ -n "$d" ] && [ -f "$d/fashion-mnist/train-images-idx3-ubyte.gz" ] && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Fashion-MNIST not found in DLCOURSE_DATA=$DLCOURSE_DATA: installing Debian's dataset-fashion-mnist"
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  exit 0
fi
echo "Fashion-MNIST not found in DLCOURSE_DATA=${DLCOURSE_DATA:-}." >&2
echo "Install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), or put the four" >&2
echo "IDX .gz files in a folder <dir>/fashion-mnist/ and add <dir> to DLCOURSE_DATA." >&2
exit 1
