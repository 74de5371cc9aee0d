#!/bin/sh
# Which system calls do pasta and passt make once their seccomp filter is in place?
#
# Runs pytest (by default the whole integration suite) with every pasta, passt
# and qrap started under `strace -ff -tt`, then counts, per program, the calls
# each process and its threads made after it installed its filter (the
# seccomp() call marks the end of set-up), like `strace -c` but for the
# sandboxed part only, and compares them with common/syscalls.py.
# Tests that look at our PIDs see strace's instead and may fail: this is a
# measurement, not a test run.
#
# Usage: tools/syscall-census.sh [pytest arguments]   (as root; PASST_PY_PREFIX as for tests)
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PASST_PY_PREFIX:-/opt/passt-py}
WORK=$(mktemp -d /tmp/syscall-census.XXXXXX)
chmod 755 "$WORK"
mkdir -m 1777 "$WORK/trace"
mkdir "$WORK/bin"
for prog in pasta passt qrap; do
    cat > "$WORK/bin/$prog" <<EOF
#!/bin/sh
exec strace -ff -tt -qq -o "$WORK/trace/$prog.\$\$" "$PREFIX/bin/$prog" "\$@"
EOF
    chmod 755 "$WORK/bin/$prog"
done
ln -s "$PREFIX/bin/python" "$WORK/bin/python"
PASST_PY_PREFIX="$WORK" "$PREFIX/bin/python" -m pytest -p no:cacheprovider -q --tb=no \
    "${@:-integration}" || true
"$PREFIX/bin/python" tools/syscall_census.py "$WORK/trace"
echo "traces kept in $WORK/trace"
