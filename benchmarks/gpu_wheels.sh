#!/usr/bin/env bash
# The Python 3.12 x86-64 wheels the GPU machine lacks (it has torch, timm, h5py, onnx and no registry), fetched
# here, carried by the device calls of docs/gpu.md, installed there. Every version is pinned.
#
#   bash benchmarks/gpu_wheels.sh              wheels/          av + decord + pytest, COMMIT (~49 MiB)      call 1
#   bash benchmarks/gpu_wheels.sh --nvc        wheels-nvc/      PyNvVideoCodec (~26 MiB)                    call 2
#   bash benchmarks/gpu_wheels.sh --dali       wheels-dali-N/   DALI and the pure-Python packages it imports,
#                                                               in 50 MiB parts, 4 folders (~195 MiB)       a later session
#   bash benchmarks/gpu_wheels.sh --dali-images                 the same plus nvImageCodec, nvJPEG(2000), nvTIFF and
#                                                               nvCOMP: only DALI's image decoding opens them
# (flags combine). On the device, in the repository root:
#   bash benchmarks/gpu_wheels.sh --install    what arrived (wheels/, wheels-nvc/, the parts of wheels-dali-*/
#                                              reassembled and sha256-checked) into /tmp/site; exit 3 when a part is
#                                              missing or damaged, 4 when no wheel arrived
#   bash benchmarks/gpu_wheels.sh --assemble DIR   only reassemble and check the DALI parts into DIR
# GPU_WHEELS_ROOT overrides the folder the wheel folders are in (default: the repository root).
set -euo pipefail
ROOT="${GPU_WHEELS_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$ROOT"
PART_MIB=50
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64)
AV_DECORD=(av==18.1.0 decord==0.6.0)
# pytest for the GPU tests that run first (`pytest -m gpu`): the image has none (pure Python, ~2 MiB)
PYTEST=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3 pygments==2.21.0)
NVC=(PyNvVideoCodec==2.2.4)
# what `import nvidia.dali` and its video reader need (measured with DALI 2.4.0: optree, gast and astunparse are
# imported at once; nvtx, makefun and libcst by other parts of DALI's Python API); not nvImageCodec/nvCOMP/nvJPEG,
# which its metadata requires but only image decoding loads
DALI=(nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0
      libcst==1.9.0)
DALI_IMAGES=(nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51
             nvidia-nvtiff-cu13==0.8.0.82 nvidia-libnvcomp-cu13==5.3.0.16)

# wheels-dali-*/ -> DIR: each wheel's parts concatenated in part-number order (whichever folder each part came in),
# then every wheel checked against SHA256SUMS
assemble() {
  local dest=$1 sums name parts
  mkdir -p "$dest"
  compgen -G "wheels-dali-*/MANIFEST" >/dev/null || return 0
  sums="$ROOT/$(ls -1 wheels-dali-*/SHA256SUMS | head -1)"
  for name in $(cat wheels-dali-*/MANIFEST | sort -u); do
    parts=$(for p in wheels-dali-*/"$name".part-*; do [ -e "$p" ] && echo "${p##*.part-} $p"; done | sort -n -k1,1 \
            | cut -d' ' -f2)
    if [ -z "$parts" ]; then
      echo "gpu_wheels: no part of $name arrived (carry every wheels-dali-N folder)" >&2
      return 3
    fi
    # shellcheck disable=SC2086
    cat $parts > "$dest/$name"
  done
  if ! (cd "$dest" && sha256sum --quiet -c "$sums"); then
    echo "gpu_wheels: a reassembled wheel differs from SHA256SUMS (a part is missing or damaged)" >&2
    return 3
  fi
  echo "gpu_wheels: reassembled $(cat wheels-dali-*/MANIFEST | sort -u | wc -l) wheels into $dest"
}

case "${1:-}" in
  --install)
    rm -rf /tmp/whl && mkdir -p /tmp/whl
    cp wheels/*.whl wheels-nvc/*.whl /tmp/whl/ 2>/dev/null || true
    assemble /tmp/whl || exit 3
    compgen -G "/tmp/whl/*.whl" >/dev/null || { echo "gpu_wheels: no wheel arrived (carry wheels/)" >&2; exit 4; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      /tmp/whl/*.whl
    echo "gpu_wheels: installed into /tmp/site: $(cd /tmp/whl && ls ./*.whl | tr '\n' ' ')"
    exit 0;;
  --assemble)
    assemble "${2:?--assemble DIR}"
    exit $?;;
esac

want_main=1 want_nvc=0 want_dali=0 want_images=0
for arg in "$@"; do
  case "$arg" in
    --nvc) want_nvc=1;;
    --dali) want_dali=1;;
    --dali-images) want_dali=1 want_images=1;;
    *) echo "gpu_wheels: unknown option $arg" >&2; exit 2;;
  esac
done
download() { python3 -m pip download -q "${PLAT[@]}" -d "$@"; }

rm -rf wheels wheels-nvc wheels-dali-*
if [ "$want_main" = 1 ]; then
  download wheels "${AV_DECORD[@]}" "${PYTEST[@]}"
  # the commit the wheels were fetched for: the device gets the working tree without .git, and the suite's env line
  # reads this file there (gpu_suite._commit)
  git -C "$ROOT" rev-parse HEAD > wheels/COMMIT 2>/dev/null || echo unknown > wheels/COMMIT
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo "+uncommitted changes" >> wheels/COMMIT
fi
[ "$want_nvc" = 1 ] && download wheels-nvc "${NVC[@]}"
if [ "$want_dali" = 1 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pkgs=("${DALI[@]}")
  [ "$want_images" = 1 ] && pkgs+=("${DALI_IMAGES[@]}")
  download "$tmp" "${pkgs[@]}"
  (cd "$tmp" && sha256sum ./*.whl | sed 's# \./# #' > SHA256SUMS)
  for w in "$tmp"/*.whl; do
    split -b "${PART_MIB}M" -d -a 2 "$w" "$tmp/$(basename "$w").part-"
  done
  # first-fit decreasing (ties by name, so the packing is the same every time): parts into as few folders of at
  # most PART_MIB as possible; each folder is one device call's carry, beside the repository
  python3 - "$tmp" "$PART_MIB" <<'PY'
import os, shutil, sys
tmp, limit = sys.argv[1], int(sys.argv[2]) * 2**20
size = lambda p: os.path.getsize(os.path.join(tmp, p))
parts = sorted((p for p in os.listdir(tmp) if ".part-" in p), key=lambda p: (-size(p), p))
bins: list[list[str]] = []
used: list[int] = []
for p in parts:
    k = next((i for i, u in enumerate(used) if u + size(p) <= limit), None)
    if k is None:
        bins.append([])
        used.append(0)
        k = len(bins) - 1
    bins[k].append(p)
    used[k] += size(p)
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
fi
du -sh wheels wheels-nvc wheels-dali-* 2>/dev/null || true
