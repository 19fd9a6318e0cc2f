#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make kernel-deb: Debian packages of linux-source-6.12 with the dm-qcow2
# series applied and CONFIG_DM_QCOW2=m (`make bindeb-pkg`), for appliance
# kernel builders. A whole kernel build: 20+ minutes of all cores, several
# GB in the build directory. Not part of make check.
#   scripts/mk-kernel-deb.sh [OUT]      (default out/kernel-deb; the tree is
#                                        built in OUT/linux-source-6.12)
# The configuration is the test kernel's (tools/kernel.config on
# x86_64_defconfig: CONFIG_RUST=y, clang) plus DM_QCOW2=m; DMQ_KDEB_CONFIG
# names another .config to start from (it needs CONFIG_RUST=y).
# DMQ_KDEB_PREPARE_ONLY=1 stops before the build (the tree is patched and
# configured).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=$(mkdir -p "${1:-$root/out/kernel-deb}" && cd "${1:-$root/out/kernel-deb}" && pwd)
tar=${DMQ_KSRC_TAR:-/usr/src/linux-source-6.12.tar.xz}
kdir=${KDIR:-$(DMQ_KERNEL=release "$root/tools/kdir.sh")}
config=${DMQ_KDEB_CONFIG:-$kdir/.config}
export PATH="$HOME/.cargo/bin:$PATH"
die() { echo "kernel-deb: $*" >&2; exit 1; }
# bindeb-pkg's build dependencies (dpkg-checkbuilddeps would stop late)
for t in rsync dpkg-buildpackage patch; do
	command -v "$t" >/dev/null || die "no $t: apt install rsync dpkg-dev patch"
done
[ -f "$config" ] || die "no kernel configuration at $config (make kernel, or DMQ_KDEB_CONFIG=)"
grep -qx CONFIG_RUST=y "$config" || die "$config has no CONFIG_RUST=y"

top=$(tar -tJf "$tar" 2>/dev/null | head -1 | cut -d/ -f1 || true)
src=$out/$top
rm -rf "$src"
echo "kernel-deb: extracting $tar into $out"
tar -xJf "$tar" -C "$out"
"$here/mk-patches.sh" "$out/patches" "$src" >/dev/null
# patch(1), not git apply: inside another git work tree (out/ of a checkout)
# git apply skips, silently, every path outside the current directory
for p in "$out"/patches/000[1-9]-*.patch; do
	patch -d "$src" -p1 -s --forward --no-backup-if-mismatch <"$p" || die "$(basename "$p") does not apply"
done
[ -f "$src/drivers/md/dm-qcow2/dm_qcow2.rs" ] || die "the series left no drivers/md/dm-qcow2/ in $src"
cp "$config" "$src/.config"
llvm=
grep -qx CONFIG_CC_IS_CLANG=y "$config" && llvm=LLVM=1
"$src/scripts/config" --file "$src/.config" --module DM_QCOW2
make -s -C "$src" $llvm olddefconfig
grep -qx CONFIG_DM_QCOW2=m "$src/.config" ||
	die "CONFIG_DM_QCOW2=m did not stick (needs BLK_DEV_DM, RUST, EVENTFD): see $src/.config"
echo "kernel-deb: $src is patched and configured (CONFIG_DM_QCOW2=m${llvm:+, $llvm})"
[ "${DMQ_KDEB_PREPARE_ONLY:-0}" = 1 ] && exit 0

start=$(date +%s)
make -C "$src" $llvm -j"$(nproc)" bindeb-pkg LOCALVERSION=-dmqcow2 KDEB_PKGVERSION="${DMQ_KDEB_VERSION:-1}"
echo "kernel-deb: built in $(($(date +%s) - start)) s:"
ls -l "$out"/*.deb
