#!/usr/bin/env bash
# Prepare the Python 3.12 x86-64 wheels the GPU machine lacks (it has torch, timm, h5py, onnx, no registry).
#   wheels/        av + decord (~46 MiB): carried in every call           -> folder `wheels`
#   wheels-dali-N/ nvidia-dali-cuda130 + its nvidia deps, split in 50 MiB parts, one folder per part,
#                  each carried by one call made back to back while the machine stays warm
# On the device: `bash benchmarks/gpu_wheels.sh --install` reassembles what has arrived and installs it
# into /tmp/site (then export PYTHONPATH=/tmp/site:$PWD).
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64)

if [ "${1:-}" = "--install" ]; then
  mkdir -p /tmp/whl
  cp wheels/*.whl /tmp/whl/ 2>/dev/null || true
  if ls wheels-dali-*/ >/dev/null 2>&1; then
    for name in $(cat wheels-dali-*/MANIFEST | sort -u); do
      parts=$(ls -1 wheels-dali-*/"$name".part-* 2>/dev/null | sort -t- -k2 -V)
      cat $parts > "/tmp/whl/$name"
    done
    (cd /tmp/whl && sha256sum -c "$(ls -1 "$OLDPWD"/wheels-dali-*/SHA256SUMS | head -1)") || exit 3
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/whl/*.whl
  echo "installed into /tmp/site: $(ls /tmp/whl)"
  exit 0
fi

rm -rf wheels wheels-dali-*
mkdir -p wheels
python3 -m pip download -q "${PLAT[@]}" -d wheels av==18.1.0 decord==0.6.0
if [ "${1:-}" = "--dali" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q "${PLAT[@]}" -d "$tmp" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13
  (cd "$tmp" && sha256sum *.whl > SHA256SUMS)
  i=0
  for w in "$tmp"/*.whl; do
    split -b 50M -d -a 2 "$w" "$tmp/$(basename "$w").part-"
  done
  # pack the parts into folders of at most 50 MiB each
  for p in "$tmp"/*.part-*; do
    i=$((i + 1)); d="wheels-dali-$i"; mkdir -p "$d"
    mv "$p" "$d/"; (cd "$tmp" && ls *.whl | xargs -n1 basename) > "$d/MANIFEST"; cp "$tmp/SHA256SUMS" "$d/"
  done
  rm -rf "$tmp"
fi
du -sh wheels wheels-dali-* 2>/dev/null || true
