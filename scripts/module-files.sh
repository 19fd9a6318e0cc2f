#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The module's build sources (what DKMS, the headers-only build and the
# patch series ship): scripts/module-files.sh [DEST]
# Without DEST: prints the list, one path a line, relative to the checkout.
# With DEST: copies them there (DEST is created).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
list() {
	# the kernel crate's sources, the C shim and its headers, the build
	# files; not the host crate (drivers/qcow2-format), not generated files
	git ls-files -- Kbuild Makefile 'drivers/*.rs' 'rust/*.rs' 'rust/*.c' 'rust/*.h' \
		scripts/preflight.sh scripts/libclang_version.h |
		grep -v -e '^drivers/qcow2-format/' -e '^rust/bindings_generated.rs$'
}
if [ $# -eq 0 ]; then
	list
	exit 0
fi
mkdir -p "$1"
list | tar -cf - -T - | tar -xf - -C "$1"
