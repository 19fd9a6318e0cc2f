#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make patches: the kernel patch series adding dm-qcow2 as
# drivers/md/dm-qcow2/ (CONFIG_DM_QCOW2), as `git format-patch` output:
#   scripts/mk-patches.sh [OUT] [KSRC]
# OUT: default out/patches (emptied first). KSRC: a linux 6.12 tree whose
# drivers/md/Kconfig, drivers/md/Makefile, MAINTAINERS and
# Documentation/admin-guide/device-mapper/index.rst are the base (default:
# the cached test kernel's, which are linux-source-6.12's; scripts/
# test-patches.sh checks that the series applies to a pristine extraction).
#
# The module's files go in unchanged but for two places: the crate root's
# path to the abstractions (drivers/md/dm-qcow2/rust/ beside it instead of
# ../rust/), and the Makefile, made from Kbuild (in-tree object names, the
# kernel's own libclang probe header). Author and Signed-off-by: this
# checkout's git identity.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${1:-$root/out/patches}
ksrc=${2:-${KSRC:-$(DMQ_KERNEL=release "$root/tools/kdir.sh")}}
# (HEAD's author where no identity is configured, as on CI)
name=$(git -C "$root" config user.name || git -C "$root" log -1 --format=%an)
email=$(git -C "$root" config user.email || git -C "$root" log -1 --format=%ae)
head=$(git -C "$root" rev-parse --short HEAD)
tmp=$(mktemp -d /tmp/dmq-patches.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
r=$tmp/linux
d=$r/drivers/md/dm-qcow2
base_files=(drivers/md/Kconfig drivers/md/Makefile MAINTAINERS
	Documentation/admin-guide/device-mapper/index.rst)

mkdir -p "$r"
for f in "${base_files[@]}"; do
	install -D -m644 "$ksrc/$f" "$r/$f"
done
g() { git -C "$r" -c user.name="$name" -c user.email="$email" "$@"; }
g init -q
g add -A
g commit -q -m "base: linux 6.12 (the files the series touches)"
commit() { # SUBJECT BODY: commit everything with a Signed-off-by
	g add -A
	g commit -q -s -F - <<<"$1

$2"
}

# The MAINTAINERS entry, written (again) with the F: patterns given: each
# patch lists the files it adds, so each touches MAINTAINERS (checkpatch).
maintainers() {
	python3 - "$r" "$name" "$email" "$@" <<'EOF'
import re, sys
r, name, email, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
p = r + "/MAINTAINERS"
s = open(p).read()
title = "DEVICE-MAPPER QCOW2 TARGET\n"
entry = title + f"""M:\t{name} <{email}>
L:\tdm-devel@lists.linux.dev
L:\trust-for-linux@vger.kernel.org
S:\tMaintained
""" + "".join(f"F:\t{f}\n" for f in sorted(files)) + "\n"
if title in s:
    s = re.sub(re.escape(title) + r"(?:[A-Z]:\t[^\n]*\n)*\n", lambda m: entry, s, count=1)
else:
    anchor = "DEVICE-MAPPER VDO TARGET\n"
    assert anchor in s
    s = s.replace(anchor, entry + anchor, 1)
open(p, "w").write(s)
EOF
}

# copy_submodules DIR DEST: the .rs files of DIR's subdirectories (the
# submodules' directories: rust/dm/, drivers/target/, ...) into DEST; not
# the host crate (drivers/qcow2-format)
copy_submodules() {
	local sub
	for sub in "$root/$1"/*/; do
		sub=$(basename "$sub")
		[ "$sub" = qcow2-format ] && continue
		compgen -G "$root/$1/$sub/*.rs" >/dev/null || continue
		mkdir -p "$2/$sub"
		cp "$root/$1/$sub"/*.rs "$2/$sub/"
	done
}

# 1. the abstractions (no build yet: nothing refers to them)
mkdir -p "$d/rust"
cp "$root"/rust/*.rs "$root"/rust/shim.c "$root"/rust/shim.h "$root"/rust/bindings_helper.h "$d/rust/"
copy_submodules rust "$d/rust"
rm -f "$d/rust/bindings_generated.rs"
maintainers drivers/md/dm-qcow2/rust/
commit "dm qcow2: add Rust abstractions for device-mapper targets" \
"The qcow2 target added by the next patch is written in Rust. The kernel
crate of 6.12 has no bindings for device-mapper targets, bios owned by a
driver, files opened from descriptors for direct I/O, a workqueue of a
driver's own or zlib's raw inflate.

Add them under drivers/md/dm-qcow2/rust/: safe types over the C APIs
(dm::Registration and the target callbacks, bio::Bio, file::File,
wq::Queue, zlib::Inflate, ...), a small C shim for static inline
functions and the module parameter, and the header bindgen reads for
the C declarations the kernel crate does not cover. Every unsafe block
of the driver lives here, each with a SAFETY comment.

Nothing builds these files yet; the next patch adds the target and its
Makefile. Add a MAINTAINERS entry for the new directory, with the lists
to copy: dm-devel for device-mapper and rust-for-linux for the Rust
code."

# 2. the target, its Makefile, Kconfig and drivers/md/Makefile entries
for f in "$root"/drivers/*.rs; do cp "$f" "$d/"; done
copy_submodules drivers "$d"
sed -i 's|^#\[path = "../rust/mod.rs"\]$|#[path = "rust/mod.rs"]|' "$d/dm_qcow2.rs"
grep -q '^#\[path = "rust/mod.rs"\]$' "$d/dm_qcow2.rs" || { echo "mk-patches: no #[path] to rewrite in dm_qcow2.rs" >&2; exit 1; }
sed -e 's|^obj-m := dm-qcow2.o$|obj-$(CONFIG_DM_QCOW2) += dm-qcow2.o|' \
	-e 's|(drivers/dm_qcow2.rs, which|(dm_qcow2.rs, which|' \
	-e 's|drivers/dm_qcow2.o|dm_qcow2.o|g' \
	-e 's|\$(src)/scripts/libclang_version.h|$(srctree)/scripts/rust_is_available_bindgen_libclang.h|' \
	-e '/^# resolved through `use kernel::bindings::\*`. Nothing here needs more than$/{s/ Nothing here needs more than$//;n;d}' \
	"$root/Kbuild" >"$d/Makefile"
grep -q 'obj-$(CONFIG_DM_QCOW2)' "$d/Makefile" && ! grep -q 'drivers/dm_qcow2\|libclang_version.h' "$d/Makefile" ||
	{ echo "mk-patches: the Makefile rewrite of Kbuild failed" >&2; exit 1; }
printf '# SPDX-License-Identifier: GPL-2.0-only\n/rust/bindings_generated.rs\n' >"$d/.gitignore"
python3 - "$r" <<'EOF'
import sys
r = sys.argv[1]
p = r + "/drivers/md/Kconfig"
s = open(p).read()
entry = '''config DM_QCOW2
	tristate "qcow2 image chain target (EXPERIMENTAL)"
	depends on BLK_DEV_DM && RUST && EVENTFD
	select ZLIB_INFLATE
	help
	  This device-mapper target exposes a chain of qcow2 images (a
	  base image and the overlays above it, passed to the table as
	  open file descriptors) as one block device: reads and writes
	  go through the chain's metadata to the image files with direct
	  I/O, in the kernel. Deltas can be merged while the device is
	  online. The target is written in Rust.

	  See Documentation/admin-guide/device-mapper/dm-qcow2.rst.

	  To compile this code as a module, choose M here: the module
	  will be called dm-qcow2.

	  If unsure, say N.

'''
anchor = 'source "drivers/md/dm-vdo/Kconfig"\n'
assert anchor in s
s = s.replace(anchor, entry + anchor, 1)
open(p, "w").write(s)
p = r + "/drivers/md/Makefile"
s = open(p).read()
anchor = "obj-$(CONFIG_DM_VDO)            += dm-vdo/\n"
assert anchor in s
s = s.replace(anchor, anchor + "obj-$(CONFIG_DM_QCOW2)\t\t+= dm-qcow2/\n", 1)
open(p, "w").write(s)
EOF
maintainers drivers/md/dm-qcow2/
commit "dm qcow2: add a target for qcow2 image chains" \
"Add the qcow2 device-mapper target: it maps a chain of qcow2 images
(v2 and v3: a base image and its overlays, each one a delta, handed to
the table line as open file descriptors) as one block device and does
the image format's work in the kernel: reads through the L1/L2 tables
of the chain, compressed and zero clusters, allocation with refcounts,
copy-on-write of shared clusters, discard and write-zeroes, and online
merges of deltas. Table line, messages, status and module parameter are
those of Virtuozzo's C target of the same name, so its tools work
unchanged.

The target is bio-based: map() queues a bio, a work item of the table's
own workqueue resolves it through the metadata cache and submits direct
I/O on the image files, and the bio ends when its last piece does.
Metadata is written in an order that keeps the images consistent after
a crash: data before the L2 entry pointing at it, a new L2 table before
its L1 entry, refcount increments before any reference.

The driver is a Rust crate (dm_qcow2.rs, built on the abstractions of
the previous patch) plus the C shim. Its Makefile generates bindings
for the C declarations the kernel crate does not cover with the
kernel's own bindgen options (rust/bindgen_parameters and the C flags,
filtered for libclang on GCC-built kernels as rust/Makefile does), and
allowlists only the driver's items: everything else comes from
kernel::bindings.

DM_QCOW2 depends on RUST and EVENTFD (a merge can signal an eventfd)
and selects ZLIB_INFLATE for compressed clusters."

# 3. documentation
mkdir -p "$r/Documentation/admin-guide/device-mapper"
cp "$root/Documentation/admin-guide/device-mapper/dm-qcow2.rst" "$r/Documentation/admin-guide/device-mapper/"
sed -i 's/^    dm-log$/    dm-log\n    dm-qcow2/' "$r/Documentation/admin-guide/device-mapper/index.rst"
grep -qx '    dm-qcow2' "$r/Documentation/admin-guide/device-mapper/index.rst" ||
	{ echo "mk-patches: no index.rst entry" >&2; exit 1; }
maintainers Documentation/admin-guide/device-mapper/dm-qcow2.rst drivers/md/dm-qcow2/
commit "docs: dm-qcow2: document the qcow2 target" \
"Describe the qcow2 device-mapper target: the table line, the messages
and status, the module parameter, merges and what the target does on a
crash, and link the page from the device-mapper index and the target's
MAINTAINERS entry."

rm -rf "$out"
mkdir -p "$out"
g format-patch -q --cover-letter -o "$out" HEAD~3
cover=$(ls "$out"/0000-*.patch)
python3 - "$cover" "$head" <<'EOF'
import sys
p, head = sys.argv[1:3]
s = open(p).read()
s = s.replace("*** SUBJECT HERE ***", "dm: add dm-qcow2, a qcow2 image chain target in Rust")
s = s.replace("*** BLURB HERE ***", f"""This series adds dm-qcow2, a device-mapper target that exposes a chain
of qcow2 images as one block device, written in Rust on top of a small
set of abstractions for device-mapper targets, bios, files and zlib.
It is a drop-in for Virtuozzo's C target of the same name (same table
line, messages and status).

Patch 1 adds the abstractions, patch 2 the target with its Kconfig and
Makefile entries, patch 3 the documentation; each extends the target's
MAINTAINERS entry by the files it adds. It applies to linux 6.12 and needs CONFIG_RUST=y.

Built from dm-qcow2 {head}.""")
open(p, "w").write(s)
EOF
ls "$out"
