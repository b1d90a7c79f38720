#!/usr/bin/env bash
# Build the documentation with warnings as errors.
#   docs/check.sh           incremental build into docs/_build/html
#   docs/check.sh --clean   from scratch (removes docs/_build and docs/generated first)
# Extra arguments are passed to sphinx-build. Needs no network (see docs/conf.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--clean" ]]; then
    shift
    rm -rf docs/_build docs/generated
fi
exec python -m sphinx -W --keep-going -q -b html "$@" docs docs/_build/html
