#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The module builds against a headers-only tree of our kernel (what a
# distribution's headers package plus its Rust files hold: no sources, no
# .cmd files, no .clippy.toml), from a copy of the module's sources:
#   scripts/test-headers-build.sh [KDIR]
# and its bindings equal those of the full tree's build when one exists
# (rust/bindings_generated.rs of this checkout). Prints ok/not ok lines.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
kdir=${1:-${KDIR:-$(DMQ_KERNEL=release "$root/tools/kdir.sh")}}
export PATH="$HOME/.cargo/bin:$PATH"
. "$here/tap.sh" headers

start=$(date +%s)
"$here/mk-headers-tree.sh" "$kdir" "$tmp/build" >"$tmp/mk.log" 2>&1
rc=$?
[ "$rc" = 0 ] || cat "$tmp/mk.log"
result "$rc" "headers-only tree of $(basename "$kdir") ($(tail -1 "$tmp/mk.log"))"
"$here/module-files.sh" "$tmp/src"
make -C "$tmp/src" modules KDIR="$tmp/build" >"$tmp/build.log" 2>&1
rc=$?
warn=$(grep -E -i 'warning|error' "$tmp/build.log")
[ "$rc" = 0 ] && [ -n "$warn" ] && rc=1
[ "$rc" = 0 ] || cat "$tmp/build.log"
result "$rc" "module built against the headers-only tree, no warnings ($(($(date +%s) - start)) s)"
rel=$(cat "$kdir/include/config/kernel.release")
vm=$(modinfo -F vermagic "$tmp/src/dm-qcow2.ko" 2>/dev/null | awk '{print $1}')
[ "$vm" = "$rel" ]
result $? "its vermagic is the kernel's ($vm)"
if [ -f "$root/rust/bindings_generated.rs" ]; then
	diff -q "$root/rust/bindings_generated.rs" "$tmp/src/rust/bindings_generated.rs" >/dev/null
	result $? "its bindings equal the full tree's (rust/bindings_generated.rs)"
fi
tap_done "headers-only build"
