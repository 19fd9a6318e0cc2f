#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# DKMS builds of the dm-qcow2-dkms sources, in a throwaway DKMS tree (no
# system state touched: --dkmstree/--sourcetree in a temp dir):
#   scripts/test-dkms.sh [KDIR]     (a built Rust kernel; ours by default)
#   DMQ_DKMS_KEEP=DIR copies the built module to DIR/dm-qcow2.ko.
# 1. against a headers-only tree of KDIR (as a headers package with its
#    Rust files): a module whose vermagic is the kernel's;
# 2. against a kernel without CONFIG_RUST (the Debian stock headers in
#    DMQ_STOCK_HEADERS when given, else a fake one): skipped (77) by
#    BUILD_EXCLUSIVE_CONFIG, no build;
# 3. with another rustc on PATH: the build fails with the preflight's line
#    naming both versions.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
kdir=${1:-${KDIR:-$(DMQ_KERNEL=release "$root/tools/kdir.sh")}}
export PATH="$HOME/.cargo/bin:$PATH"
. "$here/tap.sh" dkms
command -v dkms >/dev/null || { echo "not ok 1 - dkms is not installed (make deps)"; exit 1; }

ver=0.0.0.test
rel=$(cat "$kdir/include/config/kernel.release")
src=$tmp/src/dm-qcow2-$ver
"$here/module-files.sh" "$src"
sed "s/#MODULE_VERSION#/$ver/" "$root/packaging/dkms.conf" >"$src/dkms.conf"
mkdir -p "$tmp/tree"
dk=(--dkmstree "$tmp/tree" --sourcetree "$tmp/src")
dkms add -m dm-qcow2 -v "$ver" "${dk[@]}" >"$tmp/add.log" 2>&1 || cat "$tmp/add.log"

# 1. headers-only tree
"$here/mk-headers-tree.sh" "$kdir" "$tmp/headers" >/dev/null
start=$(date +%s)
dkms build -m dm-qcow2 -v "$ver" -k "$rel" --kernelsourcedir "$tmp/headers" "${dk[@]}" >"$tmp/b1.log" 2>&1
rc=$?
ko=$tmp/tree/dm-qcow2/$ver/$rel/$(uname -m)/module/dm-qcow2.ko
if [ "$rc" != 0 ] || [ ! -f "$ko" ]; then
	cat "$tmp/b1.log" "$tmp/tree/dm-qcow2/$ver/build/make.log" 2>/dev/null
	rc=1
fi
result "$rc" "dkms build against a headers-only tree of $rel ($(($(date +%s) - start)) s)"
vm=$(modinfo -F vermagic "$ko" 2>/dev/null | awk '{print $1}')
[ "$vm" = "$rel" ]
result $? "the DKMS module's vermagic is the kernel's ($vm)"
if [ -n "${DMQ_DKMS_KEEP:-}" ] && [ -f "$ko" ]; then
	mkdir -p "$DMQ_DKMS_KEEP" && cp "$ko" "$DMQ_DKMS_KEEP/dm-qcow2.ko"
fi
dkms remove -m dm-qcow2 -v "$ver" -k "$rel" "${dk[@]}" >/dev/null 2>&1
dkms add -m dm-qcow2 -v "$ver" "${dk[@]}" >/dev/null 2>&1

# 2. no CONFIG_RUST: skipped
stock=${DMQ_STOCK_HEADERS:-}
if [ -z "$stock" ]; then
	stock=$tmp/norust
	mkdir -p "$stock/include/config"
	printf 'CONFIG_X86=y\nCONFIG_MODVERSIONS=y\nCONFIG_BLK_DEV_DM=m\nCONFIG_EVENTFD=y\n# CONFIG_RUST is not set\n' \
		>"$stock/.config"
	cp "$stock/.config" "$stock/include/config/auto.conf"
	echo 6.1.0-99-amd64 >"$stock/include/config/kernel.release"
fi
srel=$(cat "$stock/include/config/kernel.release")
dkms build -m dm-qcow2 -v "$ver" -k "$srel" --kernelsourcedir "$stock" "${dk[@]}" >"$tmp/b2.log" 2>&1
rc=$?
[ "$rc" = 77 ] && grep -q 'BUILD_EXCLUSIVE' "$tmp/b2.log"
r=$?
[ "$r" = 0 ] || cat "$tmp/b2.log"
result "$r" "dkms build for a kernel without CONFIG_RUST ($srel): skipped, exit $rc"

# 3. another rustc: the preflight's message
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "rustc 1.84.1 (e71f9a9a9 2025-01-27)"\n' >"$tmp/bin/rustc"
chmod +x "$tmp/bin/rustc"
PATH="$tmp/bin:$PATH" HOME=$tmp dkms build -m dm-qcow2 -v "$ver" -k "$rel" --kernelsourcedir "$tmp/headers" "${dk[@]}" \
	>"$tmp/b3.log" 2>&1
rc=$?
log=$tmp/tree/dm-qcow2/$ver/build/make.log
[ "$rc" != 0 ] && grep -q "rustc is 'rustc 1.84.1 (e71f9a9a9 2025-01-27)' but kernel $rel was built with" "$log" 2>/dev/null
r=$?
[ "$r" = 0 ] || cat "$tmp/b3.log" "$log" 2>/dev/null
result "$r" "dkms build with another rustc: fails (exit $rc) with the preflight's message"
[ "$r" = 0 ] && grep '^preflight:' "$log" | sed 's/^/#   /'

tap_done dkms
