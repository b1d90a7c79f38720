#!/usr/bin/env bash
# End-to-end `stimg demo` on the real HER2ST data (C2–C6, offline EfficientNet-Lite0), from a fresh
# feature cache, with the wall time. Needs STIMG_DATA_DIR (the folder holding her2st/).
set -euo pipefail
OUT="${1:-$(mktemp -d /tmp/stimg_demo.XXXX)}"
rm -rf "$OUT/feature_cache"
start=$(date +%s)
stimg demo --out "$OUT"
echo "stimg demo wall time: $(( $(date +%s) - start ))s (output in $OUT)"
# the reduced end-to-end test of the CLI
STIMG_RUN_DEMO=1 python -m pytest tests/test_cli.py -q -p no:cacheprovider
