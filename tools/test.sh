#!/bin/sh
# Install everything the test suite needs on a Debian 12 machine (as root) and run it all.
# Usage: tools/test.sh [pytest arguments]
set -eu
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PKGS="iproute2 busybox-static socat tshark iperf3 isc-dhcp-client passt slirp4netns
      qemu-system-x86 uidmap procps util-linux python3-venv python3-dev libcap-dev gcc
      curl dnsutils cpio xz-utils zstd podman runc iputils-ping"
missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    apt-get update -qq
    # tshark asks whether non-root users may capture: answer no, without a prompt
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
tools/install.sh ${PASST_PY_EDITABLE:+--editable}
PREFIX=${PASST_PY_PREFIX:-/opt/passt-py}
export PASST_PY_PREFIX="$PREFIX"
exec "$PREFIX/bin/python" -m pytest -p no:cacheprovider "$@"
