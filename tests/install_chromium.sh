#!/usr/bin/env bash
# Install Debian's Chromium for the browser test tier (tests/test_observe.py opens the HTML run
# report headless and takes a screenshot). tests/run.sh calls it; it does nothing where Chromium
# is installed, and says why it cannot where it is not root or has no apt-get (the tier is then
# skipped, with the reason).
set -euo pipefail
if command -v chromium >/dev/null; then
    exit 0
fi
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install_chromium.sh: not root, or no apt-get: the browser tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
echo "install_chromium.sh: $(chromium --version) installed" >&2
