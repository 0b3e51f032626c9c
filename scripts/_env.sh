# Shared by scripts/demo and scripts/test: create .venv when missing and install the project into it.
# Re-installs only when pyproject.toml changed. RECONAD_TORCH overrides the torch pin used here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
EXTRAS="${1:-offline}"
TORCH_SPEC="${RECONAD_TORCH:-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=".venv/.reconad-installed-$EXTRAS-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install --quiet $TORCH_SPEC
  .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
  rm -f .venv/.reconad-installed-"$EXTRAS"-*
  touch "$STAMP"
fi
