#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# A headers-only tree of a built kernel, the way distributions ship one:
#   scripts/mk-headers-tree.sh KDIR DEST
# DEST gets what the kernel's own scripts/package/install-extmod-build puts
# into a linux-headers package (Makefiles, include/, arch/*/include, scripts/
# with its host binaries, Module.symvers, include/config/auto.conf, no .cmd
# and no .o files), plus .config, plus the Rust build files as Ubuntu's
# linux-lib-rust and Arch's linux-headers add them (rust/*.rmeta, rust/*.so;
# scripts/target.json and include/generated/rustc_cfg come with scripts/ and
# include/generated). Nothing else of the build tree: no sources, no
# rust/bindgen_parameters, no .cmd file.
set -euo pipefail
kdir=$(cd "${1:?usage: $0 KDIR DEST}" && pwd)
dest=${2:?usage: $0 KDIR DEST}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

srcarch=x86
grep -q '^CONFIG_X86=y' "$kdir/include/config/auto.conf" || srcarch=$(uname -m | sed 's/aarch64/arm64/')
cd "$kdir"
# CC = HOSTCC: the host programs are copied as built, not rebuilt
srctree=. SRCARCH=$srcarch CC=cc HOSTCC=cc MAKE=make \
	sh scripts/package/install-extmod-build "$dest"
cp .config "$dest/"
mkdir -p "$dest/rust"
cp rust/*.rmeta rust/*.so "$dest/rust/"
echo "headers tree: $dest ($(du -sh "$dest" | cut -f1); $(find "$dest" -name '.*.cmd' | wc -l) .cmd files)"
