#!/usr/bin/env bash
# Sets up ./.venv with slmops and everything it needs, on a fresh machine. Idempotent and quick
# when nothing changed. llama-cpp-python is built portably by .ci/install-llama-cpp (see there).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.slmops-deps-$(sha256sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install --quiet --upgrade pip wheel setuptools
  python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
bash .ci/install-llama-cpp
