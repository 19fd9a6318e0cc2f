#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The preflight's verdicts, host-side, no root, a few seconds:
#   scripts/test-preflight.sh [KDIR]   (KDIR: a built Rust kernel, our test
#                                       kernel by default)
# Prints "ok N - ..." / "not ok N - ..." per case and exits non-zero when
# any failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
kdir=${1:-${KDIR:-$(DMQ_KERNEL=release "$root/tools/kdir.sh")}}
export PATH="$HOME/.cargo/bin:$PATH"
pre=$here/preflight.sh
. "$here/tap.sh" preflight

# check NAME WANT_RC GREP_PATTERN... -- CMD...: run CMD, want its exit
# status and every pattern in its output
check() {
	local name=$1 want=$2; shift 2
	local pats=()
	while [ "$1" != -- ]; do pats+=("$1"); shift; done
	shift
	local out rc p bad=
	out=$("$@" 2>&1); rc=$?
	n=$((n + 1))
	[ "$rc" = "$want" ] || bad="exit $rc, want $want"
	for p in "${pats[@]}"; do
		grep -qF -- "$p" <<<"$out" || bad+="${bad:+; }no '$p' in the output"
	done
	if [ -z "$bad" ]; then
		echo "ok $n - $name"
	else
		echo "not ok $n - $name: $bad"
		sed 's/^/#   /' <<<"$out"
		failed=$((failed + 1))
	fi
}

if [ ! -f "$kdir/include/config/auto.conf" ]; then
	echo "not ok 1 - no built kernel at $kdir (make kernel)"
	exit 1
fi
want=$(sed -n 's/^CONFIG_RUSTC_VERSION_TEXT="\?\([^"]*\)"\?$/\1/p' "$kdir/include/config/auto.conf")

# 1. our kernel: everything there
check "our kernel passes" 0 "preflight: ok" "$want" -- "$pre" "$kdir"

# 2. a kernel without Rust (Debian 12/13 stock): the stock kernel's headers
# when installed, else a fake headers directory with such a .config
stock=/lib/modules/$(uname -r)/build
if [ -f "$stock/.config" ] && ! grep -qx CONFIG_RUST=y "$stock/.config"; then
	check "stock kernel without Rust: skip (77)" 77 "CONFIG_RUST is not set" -- "$pre" "$stock"
fi
mkdir -p "$tmp/norust/include/config"
printf 'CONFIG_X86=y\nCONFIG_MODVERSIONS=y\nCONFIG_BLK_DEV_DM=m\nCONFIG_EVENTFD=y\n# CONFIG_RUST is not set\n' \
	>"$tmp/norust/.config"
echo 6.1.0-99-amd64 >"$tmp/norust/include/config/kernel.release"
check "kernel without CONFIG_RUST: skip (77)" 77 "kernel 6.1.0-99-amd64 has no Rust support" "skipped" \
	-- "$pre" "$tmp/norust"

# 3. a Rust kernel without device-mapper: skip too
sed -e 's/^CONFIG_BLK_DEV_DM=.*//' -e '$aCONFIG_RUST=y' "$tmp/norust/.config" >"$tmp/norust/.config.new"
mkdir -p "$tmp/nodm/include/config"
mv "$tmp/norust/.config.new" "$tmp/nodm/.config"
check "Rust kernel without device-mapper: skip (77)" 77 "CONFIG_BLK_DEV_DM is not set" -- "$pre" "$tmp/nodm"

# 4. headers of a Rust kernel without the Rust build files (Debian sid,
# Fedora): one line per missing file, with what to install
mkdir -p "$tmp/norustfiles/include/config" "$tmp/norustfiles/arch/x86"
cp "$kdir/include/config/auto.conf" "$tmp/norustfiles/include/config/"
cp "$kdir/arch/x86/Makefile" "$tmp/norustfiles/arch/x86/"
check "Rust kernel whose headers lack the Rust files: problems (1)" 1 \
	"rust/libkernel.rmeta is missing" "rust/libmacros.so" "scripts/target.json" \
	"include/generated/rustc_cfg is missing" "linux-lib-rust" -- "$pre" "$tmp/norustfiles"

# 5. another rustc than the kernel's: both version strings named
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "rustc 1.84.1 (e71f9a9a9 2025-01-27) (built from a source tarball)"\n' >"$tmp/bin/rustc"
chmod +x "$tmp/bin/rustc"
check "mismatched rustc: problem (1) naming both versions" 1 \
	"rustc is 'rustc 1.84.1 (e71f9a9a9 2025-01-27) (built from a source tarball)'" \
	"built with '$want'" -- env PATH="$tmp/bin:$PATH" "$pre" "$kdir"

# 6. same number, other build: the whole string counts (E0514)
printf '#!/bin/sh\necho "%s"\n' "$(sed 's/(\([0-9a-f]*\) /(0000000ff /' <<<"$want")" >"$tmp/bin/rustc"
check "same rustc number, another build: problem (1)" 1 "rustc is" "built with '$want'" \
	-- env PATH="$tmp/bin:$PATH" "$pre" "$kdir"

# 7. no bindgen
check "no bindgen: problem (1)" 1 "bindgen not found" -- env BINDGEN=/nonexistent/bindgen "$pre" "$kdir"

# 8. no kernel directory at all
check "no kernel directory: problem (1)" 1 "install the kernel's headers" -- "$pre" "$tmp/none"

tap_done "preflight cases"
