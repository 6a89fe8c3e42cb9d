#!/usr/bin/env bash
# Build dist/forgebottle.pyz: one self-contained file (shiv), plain uvicorn so it stays portable.
# Uses $PYTHON (default: .venv/bin/python if present, else python3); needs shiv installed there.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
rm -rf dist build ./*.egg-info
mkdir -p dist
"$py" -m shiv --compile-pyc --reproducible -p '/usr/bin/env python3' -e forgebottle:main \
  -o dist/forgebottle.pyz . --quiet
echo "built dist/forgebottle.pyz ($(du -h dist/forgebottle.pyz | cut -f1))"
