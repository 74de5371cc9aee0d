#!/bin/sh
# Install passt-py into a world-readable virtual environment (default /opt/passt-py) built on
# Debian's python3, so that pasta and passt also run for unprivileged users.
# Usage (as root): tools/install.sh [--editable]
set -eu
PREFIX=${PASST_PY_PREFIX:-/opt/passt-py}
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if ! dpkg -s python3-venv python3-dev libcap-dev gcc iproute2 >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq python3-venv python3-dev libcap-dev gcc iproute2 >/dev/null
    fi
fi
[ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q --upgrade pip >/dev/null
if [ "${1:-}" = "--editable" ]; then
    # compat: a plain path entry. The default (a finder module that site imports) costs
    # 15-50 ms at every start of pasta/passt, which passt's start-up (listening within
    # 30 ms, see integration/bench/passt_startup.py) cannot afford, even in development
    "$PREFIX/bin/pip" install -q -e ".[test]" --config-settings editable_mode=compat
else
    "$PREFIX/bin/pip" install -q ".[test]"
fi
chmod -R a+rX "$PREFIX"
echo "installed: $PREFIX/bin/pasta, $PREFIX/bin/passt, $PREFIX/bin/qrap"
