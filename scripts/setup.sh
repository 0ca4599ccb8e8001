#!/usr/bin/env bash
# Install pyengine into ./.venv from nothing: torch first (the CPU build of 2.13.0 on this disk),
# then the package built without build isolation (an isolated build would resolve torch on its
# own and pull a multi-GB CUDA wheel). `--test` adds the test and reference dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=23" "setuptools>=69" wheel ninja
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q "sentencepiece>=0.2" "safetensors>=0.4" "tqdm>=4.60" "tokenizers>=0.20" "numpy" \
    "fastapi>=0.115" "uvicorn>=0.30" "uvloop>=0.19" "httptools>=0.6" "prometheus-client>=0.20" "PyYAML>=6" \
    "sentencex>=1.0.32" "py3langid>=0.4" "langcodes>=3.5" "language-data>=1.3" "python-docx>=1.2" \
    "python-multipart>=0.0.20" "limits>=5.8"
if [ "${1:-}" = "--test" ]; then
  # the web page's browser test drives Debian's Chromium through its ChromeDriver
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
      echo "setup.sh: install chromium and chromium-driver for the browser test (tests/test_web_page.py)" >&2
    fi
  fi
  .venv/bin/python -m pip install -q -r requirements-test.txt
  # OpenNMT-py 3.5.1's metadata pins torch<2.3 (it runs on 2.13 for what the tests use): no deps from it
  .venv/bin/python -m pip install -q --no-deps "OpenNMT-py==3.5.1"
  # fairseq 0.12 (the maintained fork for Python 3.11+): built here against this torch, without its audio deps
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation "fairseq-fixed==0.12.3.1"
  # eole 0.6 (OpenNMT-py's successor): its metadata asks for spaCy, datasets, tensorboard, torchcodec and more that
  # training and predicting a text transformer never import (requirements-test.txt has what they do)
  .venv/bin/python -m pip install -q --no-deps "eole==0.6.4"
fi
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import pyengine, pyengine._C; print('pyengine', pyengine.__version__, 'installed; _C:', pyengine._C.build_info())"
