#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Can dm-qcow2 be built against this kernel with this toolchain?
#   scripts/preflight.sh [KDIR]      (KDIR: the kernel's build directory,
#                                     default /lib/modules/$(uname -r)/build)
# Prints one line per problem, with what to install, and exits
#   0  everything an out-of-tree Rust module needs is there,
#   77 the kernel cannot host the module at all (no CONFIG_RUST, no
#      device-mapper, no eventfd): nothing to install fixes that, a
#      package build skips this kernel,
#   1  something is missing or does not match (the lines say what).
# RUSTC, BINDGEN, CC name the tools when not rustc, bindgen and the
# kernel's compiler from PATH (as the kernel's make takes them).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
kdir=${1:-${KDIR:-/lib/modules/$(uname -r)/build}}
rustc=${RUSTC:-rustc}
bindgen=${BINDGEN:-bindgen}
problems=0

problem() {
	echo "preflight: $*" >&2
	problems=$((problems + 1))
}
skip() {
	echo "preflight: $*" >&2
	echo "preflight: skipped: this kernel cannot load dm-qcow2 (see README, 'Installing on other kernels')" >&2
	exit 77
}

if [ ! -d "$kdir" ]; then
	echo "preflight: no kernel build directory at $kdir: install the kernel's headers (Debian/Ubuntu: linux-headers-<release>; Arch: linux-headers; Fedora: kernel-devel) or pass KDIR=" >&2
	exit 1
fi
config=
for c in "$kdir/include/config/auto.conf" "$kdir/.config"; do
	[ -f "$c" ] && { config=$c; break; }
done
if [ -z "$config" ]; then
	echo "preflight: $kdir has no kernel configuration (include/config/auto.conf or .config): not a configured kernel build or headers directory" >&2
	exit 1
fi
release=$(cat "$kdir/include/config/kernel.release" 2>/dev/null || basename "$(dirname "$kdir")")

# cfg NAME: the option's value in the kernel's configuration ("" when unset)
cfg() {
	sed -n "s/^$1=//p" "$config" | tail -1 | sed 's/^"\(.*\)"$/\1/'
}

# The kernel itself: without these, nothing to install helps.
[ "$(cfg CONFIG_RUST)" = y ] ||
	skip "kernel $release has no Rust support (CONFIG_RUST is not set in $config): dm-qcow2 needs a kernel built with CONFIG_RUST=y"
case "$(cfg CONFIG_BLK_DEV_DM)" in
y | m) ;;
*) skip "kernel $release has no device-mapper (CONFIG_BLK_DEV_DM is not set)" ;;
esac
[ "$(cfg CONFIG_EVENTFD)" = y ] ||
	skip "kernel $release has no eventfd (CONFIG_EVENTFD is not set)"

# The kernel's Rust build files, shipped by its full build tree or by a
# headers package that carries them (Ubuntu: linux-lib-rust-<abi>; Arch:
# linux-headers).
rustpkg="install the kernel's Rust build files (Ubuntu: linux-lib-rust-$release; Arch: linux-headers) or build against the kernel's full build tree"
for f in rust/libcore.rmeta rust/libcompiler_builtins.rmeta rust/libkernel.rmeta \
	include/generated/rustc_cfg; do
	[ -f "$kdir/$f" ] || problem "$kdir/$f is missing: $rustpkg"
done
compgen -G "$kdir/rust/libmacros*.so" >/dev/null ||
	problem "$kdir/rust/libmacros.so (the kernel's proc macros) is missing: $rustpkg"
srcarch=
for a in X86:x86 ARM64:arm64 LOONGARCH:loongarch RISCV:riscv UML:um; do
	[ "$(cfg "CONFIG_${a%%:*}")" = y ] && { srcarch=${a#*:}; break; }
done
archmk=$kdir/arch/$srcarch/Makefile
[ -f "$archmk" ] || archmk=$(readlink -f "$kdir/source" 2>/dev/null)/arch/$srcarch/Makefile
if grep -qs 'scripts/target.json' "$archmk" && [ ! -f "$kdir/scripts/target.json" ]; then
	problem "$kdir/scripts/target.json (rustc's target for this kernel) is missing: $rustpkg"
fi
[ -f "$kdir/Module.symvers" ] ||
	echo "preflight: warning: $kdir/Module.symvers is missing: modpost cannot check the module's symbols" >&2

# rustc: the very compiler the kernel was built with, to the last letter
# of its version string (another one cannot read the kernel's .rmeta: E0514).
want=$(cfg CONFIG_RUSTC_VERSION_TEXT)
meta=
if [ -f "$kdir/rust/libcore.rmeta" ]; then
	meta=$(head -c 512 "$kdir/rust/libcore.rmeta" | tr -c '[:print:]' '\n' |
		grep -o 'rustc [0-9][^)]*)' | head -1)
fi
[ -n "$want" ] || want=$meta
if [ -n "$meta" ] && [ "$meta" != "$want" ]; then
	problem "the kernel's rust/libcore.rmeta was made by '$meta' but its configuration says '$want': inconsistent Rust build files"
fi
if ! have=$("$rustc" --version 2>/dev/null); then
	problem "rustc not found: install the kernel's rustc${want:+, '$want'} (rustup toolchain install <its version>)"
elif [ -n "$want" ] && [ "$have" != "$want" ]; then
	problem "rustc is '$have' but kernel $release was built with '$want': install that exact rustc (rustup toolchain install $(awk '{print $2}' <<<"$want"), then rustup default or PATH)"
fi

# bindgen and its libclang
if ! bgv=$("$bindgen" --version 2>/dev/null); then
	problem "bindgen not found: install bindgen-cli (cargo install --locked bindgen-cli; Debian: the bindgen package) and libclang (Debian: libclang-dev)"
elif ! [[ $("$bindgen" "$here/libclang_version.h" 2>&1) == *"clang version"* ]]; then
	problem "$bgv cannot run libclang: install libclang (Debian/Ubuntu: libclang-dev; Arch: clang; Fedora: clang-devel)"
fi

# The C compiler and linker the kernel was built with
if [ "$(cfg CONFIG_CC_IS_CLANG)" = y ]; then
	command -v "${CC:-clang}" >/dev/null ||
		problem "kernel $release was built with clang ($(cfg CONFIG_CC_VERSION_TEXT)): install clang"
	if [ "$(cfg CONFIG_LD_IS_LLD)" = y ]; then
		command -v ld.lld >/dev/null || problem "kernel $release was linked with ld.lld: install lld"
	fi
else
	command -v "${CC:-gcc}" >/dev/null ||
		problem "kernel $release was built with GCC ($(cfg CONFIG_CC_VERSION_TEXT)): install gcc"
fi
command -v make >/dev/null || problem "make not found: install make"

if [ "$problems" -gt 0 ]; then
	echo "preflight: $problems problem(s): dm-qcow2 cannot be built against $kdir" >&2
	exit 1
fi
echo "preflight: ok: kernel $release ($kdir), $have, $bgv"
