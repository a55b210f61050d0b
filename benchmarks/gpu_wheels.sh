#!/usr/bin/env bash
# Prepare the Python 3.12 x86-64 wheels the GPU machine lacks (it has torch, timm, h5py, onnx, no registry).
#   wheels/        av + decord (~46 MiB): carried in every call           -> folder `wheels`
#   wheels-dali-N/ nvidia-dali-cuda130 + its nvidia deps, split in 50 MiB parts, one folder per part,
#                  each carried by one call made back to back while the machine stays warm
#   wheels-nvc/    PyNvVideoCodec (~26 MiB, with --nvc): one more back-to-back call
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
  cp wheels-nvc/*.whl /tmp/whl/ 2>/dev/null || true
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

rm -rf wheels wheels-dali-* wheels-nvc
mkdir -p wheels
python3 -m pip download -q "${PLAT[@]}" -d wheels av==18.1.0 decord==0.6.0
if [ "${1:-}" = "--nvc" ] || [ "${2:-}" = "--nvc" ]; then
  python3 -m pip download -q "${PLAT[@]}" -d wheels-nvc PyNvVideoCodec==2.2.4
fi
if [ "${1:-}" = "--dali" ]; then
  tmp=$(mktemp -d)
  # DALI and what its metadata requires that the GPU image lacks (its nvimgcodec[all] extra included)
  python3 -m pip download -q "${PLAT[@]}" -d "$tmp" nvidia-dali-cuda130==2.4.0 'nvidia-nvimgcodec-cu13>=0.9,<0.10' \
    nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 'nvidia-nvtiff-cu13>=0.8' \
    astunparse==1.6.3 'gast<=0.7.0' optree nvtx makefun 'libcst~=1.8'

  (cd "$tmp" && sha256sum *.whl > SHA256SUMS)
  for w in "$tmp"/*.whl; do
    split -b 50M -d -a 2 "$w" "$tmp/$(basename "$w").part-"
  done
  # first-fit decreasing: pack the parts into as few folders of at most 50 MiB as possible
  python3 - "$tmp" <<'PY'
import os, shutil, sys
tmp = sys.argv[1]
parts = sorted((p for p in os.listdir(tmp) if ".part-" in p), key=lambda p: -os.path.getsize(os.path.join(tmp, p)))
bins: list[list[str]] = []
sizes: list[int] = []
for p in parts:
    n = os.path.getsize(os.path.join(tmp, p))
    k = next((i for i, s in enumerate(sizes) if s + n <= 50 * 2**20), None)
    if k is None:
        bins.append([]); sizes.append(0); k = len(bins) - 1
    bins[k].append(p); sizes[k] += n
wheels = sorted(p for p in os.listdir(tmp) if p.endswith(".whl"))
for i, names in enumerate(bins, 1):
    d = f"wheels-dali-{i}"
    os.makedirs(d)
    for p in names:
        shutil.move(os.path.join(tmp, p), d)
    shutil.copy(os.path.join(tmp, "SHA256SUMS"), d)
    with open(os.path.join(d, "MANIFEST"), "w") as f:
        f.write("\n".join(wheels) + "\n")
PY
  rm -rf "$tmp"
fi
du -sh wheels wheels-dali-* wheels-nvc 2>/dev/null || true
