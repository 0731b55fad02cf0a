#!/usr/bin/env bash
# Install wandb (the pyproject's `wandb` extra, same pin) into <venv>/wandb-site, apart from the
# venv: Megatron-Core imports wandb at import time whenever it is importable (0.5 s in every
# rank process of the suite), and only tests/test_observe.py's W&B test needs it, which adds
# this folder to its rank's sys.path. tests/run.sh calls it; it does nothing where the folder
# is complete, and says why it cannot where pip cannot reach the index (that test is then
# skipped, with the reason).
set -euo pipefail
SITE="$(python -c 'import sys; print(sys.prefix)')/wandb-site"
PIN="$(python - <<'PY'
import re
text = open("pyproject.toml").read()
print(re.search(r'wandb = \["(wandb==[^"]+)"\]', text).group(1))
PY
)"
if [[ -f "$SITE/.installed-$PIN" ]]; then
    exit 0
fi
rm -rf "$SITE"
if ! python -m pip install -q --target "$SITE" "$PIN" >/dev/null 2>&1; then
    rm -rf "$SITE"
    echo "install_wandb.sh: pip could not install $PIN: the W&B test will be skipped" >&2
    exit 0
fi
touch "$SITE/.installed-$PIN"
echo "install_wandb.sh: $PIN in $SITE" >&2
