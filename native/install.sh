#!/usr/bin/env bash
# Put fsledger's native launcher (native/fsledger.c) in front of the console script pip wrote:
# VENV/bin/fsledger becomes the launcher, which execs the Python script, moved to
# VENV/libexec/fsledger, for everything it does not serve itself. Run by `make install` and
# `make run` after every pip install (pip writes bin/fsledger again each time).
# Without a C compiler the Python script stays where pip put it (under CI that is an error).
set -euo pipefail
venv=$(cd "$1" && pwd)
src=$(cd "$(dirname "$0")" && pwd)/fsledger.c
cc=${CC:-cc}
if ! command -v "$cc" >/dev/null 2>&1; then
    if [ "${CI:-}" = true ]; then
        echo "native/install.sh: no C compiler ($cc); .ci/system-deps installs gcc" >&2
        exit 1
    fi
    echo "note: no C compiler ($cc): 'fsledger' stays the Python console script" >&2
    exit 0
fi
if head -c 2 "$venv/bin/fsledger" | grep -q '^#!'; then
    mkdir -p "$venv/libexec"
    mv -f "$venv/bin/fsledger" "$venv/libexec/fsledger"
fi
test -x "$venv/libexec/fsledger"
"$cc" -O2 -Wall -Wextra -DFSLEDGER_SCRIPT="\"$venv/libexec/fsledger\"" \
    -o "$venv/bin/fsledger.new" "$src"
mv -f "$venv/bin/fsledger.new" "$venv/bin/fsledger"
