#!/usr/bin/env bash
# The GPU check, one command in the project root of the GPU machine (docs/gpu.md):
#
#   bash scripts/device_check.sh [OUT] [--stage tests bench nanogpt sample recipe] [--dry]
#
# The machine has PyTorch, no Hydra: the wheels copied into .whl/ (or $WHEELS) are installed into
# a temporary folder, never torch, whose own build is used. Then scripts/device_check.py runs
# the stages; each writes OUT/<stage>.json (OUT: the argument, else $OUT) as soon as it ends.
# --dry runs the CPU-safe part of each stage, here, before a GPU machine is there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # the stages' output in order

wheels=${WHEELS:-.whl}
shopt -s nullglob
files=("$wheels"/*.whl)
for f in "${files[@]}"; do
  case "$(basename "$f")" in
    torch-*) echo "refusing $f: the machine's own torch is used" >&2; exit 2 ;;
  esac
done
if [ ${#files[@]} -eq 0 ]; then
  echo "no wheels in $wheels/: copy ../shared/gpu/wheels/*.whl there (docs/gpu.md)" >&2
  exit 2
fi
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${files[@]}"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .tiktoken ]; then export TIKTOKEN_CACHE_DIR="$PWD/.tiktoken"; fi  # GPT-2's BPE files, offline

if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
python3 scripts/device_check.py "$@"
