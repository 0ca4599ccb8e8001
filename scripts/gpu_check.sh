#!/usr/bin/env bash
# The GPU check: one command for a machine with a CUDA GPU, a CUDA build of torch and Triton already installed,
# and no network. Installs pyengine into that Python without touching its packages (--no-deps
# --no-build-isolation: only the C++ CPU extension is compiled, no CUDA toolkit is needed), runs the GPU tests
# (pytest -m cuda) and the GPU benchmark (benchmarks.compare --device cuda), and writes every log and JSON into
# OUTDIR. About 5 minutes on an H100-class GPU.
#
#   bash scripts/gpu_check.sh OUTDIR                 # PYTHON=... to pick the interpreter (default: python3)
#   PYENGINE_WHEELS=DIR bash scripts/gpu_check.sh OUTDIR   # missing pure-Python dependencies from a wheelhouse
#   bash scripts/gpu_check.sh --wheelhouse DIR 3.12  # on a networked machine: build that wheelhouse for Python 3.12
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# what pyengine imports at run time, and what the GPU tests and the benchmark import (module: pip name)
RUNTIME="sentencepiece:sentencepiece safetensors:safetensors tqdm:tqdm tokenizers:tokenizers fastapi:fastapi
uvicorn:uvicorn httptools:httptools prometheus_client:prometheus-client yaml:PyYAML sentencex:sentencex
py3langid:py3langid langcodes:langcodes language_data:language-data docx:python-docx multipart:python-multipart
limits:limits"
TESTING="pytest:pytest transformers:transformers httpx:httpx aiohttp:aiohttp"

if [ "${1:-}" = "--wheelhouse" ]; then
  dir=${2:?usage: scripts/gpu_check.sh --wheelhouse DIR PYTHON_VERSION}; version=${3:?python version, e.g. 3.12}
  names=$(for pair in $RUNTIME $TESTING; do printf '%s ' "${pair#*:}"; done)
  # shellcheck disable=SC2086
  exec "$PY" -m pip download -d "$dir" --python-version "$version" --only-binary=:all: $names
fi

OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
say() { echo "gpu_check: $*" | tee -a "$OUT/summary.txt"; }

# 1. a CUDA device seen by a CUDA build of torch, and Triton: or stop now, saying which is missing
if ! "$PY" - > "$OUT/environment.json" 2> "$OUT/environment.err" <<'EOF'
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    devices=torch.cuda.device_count())
except ImportError as exc:
    info["torch"] = f"missing ({exc})"
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as exc:
    info["triton"] = f"missing ({exc})"
print(json.dumps(info))
sys.exit(0 if info.get("cuda_available") and not info["triton"].startswith("missing") else 1)
EOF
then
  say "no CUDA device: this check needs a CUDA GPU, a CUDA build of torch and Triton in $PY ($(cat "$OUT/environment.json" 2>/dev/null || echo 'python did not run'))"
  exit 2
fi
say "environment $(cat "$OUT/environment.json")"

# 2. pyengine's dependencies: present, or installed from PYENGINE_WHEELS (never upgrading what is there)
missing=$("$PY" - $RUNTIME $TESTING <<'EOF'
import importlib.util, sys
print(" ".join(pair.split(":")[1] for pair in sys.argv[1:] if importlib.util.find_spec(pair.split(":")[0]) is None))
EOF
)
if [ -n "$missing" ]; then
  if [ -n "${PYENGINE_WHEELS:-}" ]; then
    say "installing missing $missing from $PYENGINE_WHEELS"
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --find-links "$PYENGINE_WHEELS" $missing >> "$OUT/install.log" 2>&1 \
      || { say "could not install $missing from $PYENGINE_WHEELS (install.log)"; exit 3; }
  else
    say "missing Python packages: $missing (no network here: build a wheelhouse elsewhere with" \
        "'bash scripts/gpu_check.sh --wheelhouse DIR <python version>' and set PYENGINE_WHEELS=DIR)"
    exit 3
  fi
fi

# 3. pyengine itself, into this environment as it is
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1; then
  say "pip install --no-deps --no-build-isolation -e . failed (install.log)"; exit 4
fi
say "installed in $(( $(date +%s) - start )) s"

# 4. the GPU tests, compiled kernels (not the interpreter)
status=0
TRITON_INTERPRET=0 timeout 420 "$PY" -m pytest -m cuda -q -rs tests --junitxml="$OUT/pytest-cuda.xml" \
  > "$OUT/pytest-cuda.log" 2>&1 || status=5
say "pytest -m cuda: $(tail -1 "$OUT/pytest-cuda.log") (exit $status) after $(( $(date +%s) - start )) s"

# 5. the GPU benchmark: pyengine fp16/bf16 vs HF generate (and CTranslate2 where its CUDA build imports)
TRITON_INTERPRET=0 timeout 300 "$PY" -m benchmarks.compare --device cuda --rounds 1 --repeats 2 --out "$OUT" \
  > "$OUT/compare-cuda.log" 2>&1 || status=$(( status ? status : 6 ))
say "benchmarks.compare --device cuda: $(grep -c '' "$OUT/compare-cuda.log") log lines; results: $(ls "$OUT"/compare-cuda-*.json 2>/dev/null | tr '\n' ' ')"
say "done in $(( $(date +%s) - start )) s, exit $status"
exit $status
