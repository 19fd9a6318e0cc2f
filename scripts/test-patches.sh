#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The kernel patch series (scripts/mk-patches.sh), as root:
#   scripts/test-patches.sh [KDIR]     (the built test kernel; ours by default)
# 0. every patch is clean for the kernel's scripts/checkpatch.pl;
# 1. it applies with `git am` to a pristine linux-source-6.12 extraction
#    (DMQ_KSRC_TAR): of the paths the series touches (git am reads no
#    other), or of the whole tree with DMQ_PATCH_FULL=1 (minutes);
# 2. the module builds in-tree with CONFIG_DM_QCOW2=m, reusing the built
#    tree: an overlay mount over KDIR (never written), the series applied
#    there, `scripts/config --module DM_QCOW2` + syncconfig, then
#    `make M=drivers/md/dm-qcow2` (a full `make` would rebuild the kernel's
#    Rust crates: the overlay's path differs from the cached tree's).
# DMQ_INTREE_KEEP=DIR copies the in-tree module to DIR/dm-qcow2.ko.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
kdir=${1:-${KDIR:-$(DMQ_KERNEL=release "$root/tools/kdir.sh")}}
tar=${DMQ_KSRC_TAR:-/usr/src/linux-source-6.12.tar.xz}
export PATH="$HOME/.cargo/bin:$PATH"
. "$here/tap.sh" patchtest
ov=$tmp/ov/merged
cleanup() {
	mountpoint -q "$ov" && umount "$ov"
	rm -rf "$tmp"
}
trap cleanup EXIT
t0=$(date +%s)
since() { echo "$(($(date +%s) - $1)) s"; }

"$here/mk-patches.sh" "$tmp/patches" "$kdir" >"$tmp/mk.log" 2>&1
rc=$?
[ "$rc" = 0 ] || cat "$tmp/mk.log"
result "$rc" "make patches: $(ls "$tmp/patches" 2>/dev/null | grep -vc '^0000-') patches"
patches=("$tmp"/patches/000[1-9]-*.patch)

# 0. checkpatch: no error, no warning (the kernel tree's own script)
cp_log=$tmp/checkpatch.log
: >"$cp_log"
clean=0
for p in "${patches[@]}"; do
	if out=$("$kdir/scripts/checkpatch.pl" --no-tree --terse "$p" 2>&1) && ! grep -q 'WARNING\|ERROR' <<<"$out"; then
		clean=$((clean + 1))
	else
		printf '%s\n' "$out" >>"$cp_log"
	fi
done
[ "$clean" = "${#patches[@]}" ]
cp_rc=$?
[ "$cp_rc" = 0 ] || cat "$cp_log"
result "$cp_rc" "scripts/checkpatch.pl: $clean of ${#patches[@]} patches clean (no error, no warning)"

# 1. git am on a pristine extraction
start=$(date +%s)
top=$(tar -tJf "$tar" 2>/dev/null | head -1 | cut -d/ -f1)
mkdir -p "$tmp/pristine"
if [ "${DMQ_PATCH_FULL:-0}" = 1 ]; then
	tar -xJf "$tar" -C "$tmp/pristine"
	what="the whole tree"
else
	# the paths the patches touch (modified files; new ones need their
	# directory only)
	mapfile -t paths < <(sed -n 's|^--- a/||p' "${patches[@]}" | sort -u)
	tar -xJf "$tar" -C "$tmp/pristine" "${paths[@]/#/$top/}"
	what="${#paths[@]} touched files"
fi
r=$tmp/pristine/$top
g() { git -C "$r" -c user.name=test -c user.email=test@localhost "$@"; }
g init -q && g add -f -A . && g commit -q -m pristine &&
	g am -q "${patches[@]}" >"$tmp/am.log" 2>&1
rc=$?
[ "$rc" = 0 ] || cat "$tmp/am.log"
result "$rc" "git am onto pristine $(basename "$tar") ($what, $(since "$start"))"

# 2. in-tree build over the cached tree
if [ "$(id -u)" != 0 ]; then
	result 1 "in-tree build: needs root (overlay mount)"
else
	start=$(date +%s)
	mkdir -p "$tmp/ov/upper" "$tmp/ov/work" "$ov"
	llvm=
	grep -qx CONFIG_CC_IS_CLANG=y "$kdir/include/config/auto.conf" && llvm=LLVM=1
	{
		mount -t overlay overlay -o "lowerdir=$kdir,upperdir=$tmp/ov/upper,workdir=$tmp/ov/work" "$ov" &&
			for p in "${patches[@]}"; do (cd "$ov" && git apply "$p") || exit 1; done &&
			"$ov/scripts/config" --file "$ov/.config" --module DM_QCOW2 &&
			make -s -C "$ov" $llvm syncconfig &&
			grep -qx CONFIG_DM_QCOW2=m "$ov/include/config/auto.conf" &&
			make -C "$ov" $llvm M=drivers/md/dm-qcow2 modules
	} >"$tmp/build.log" 2>&1
	rc=$?
	ko=$ov/drivers/md/dm-qcow2/dm-qcow2.ko
	[ "$rc" = 0 ] && [ -f "$ko" ] && ! grep -qiE 'warning|error' "$tmp/build.log"
	rc=$?
	[ "$rc" = 0 ] || cat "$tmp/build.log"
	result "$rc" "in-tree build with CONFIG_DM_QCOW2=m over the cached tree ($(since "$start"))"
	vm=$(modinfo -F vermagic "$ko" 2>/dev/null | awk '{print $1}')
	[ -n "$vm" ] && [ "$vm" = "$(cat "$kdir/include/config/kernel.release")" ]
	result $? "the in-tree module's vermagic is the kernel's ($vm)"
	if [ -n "${DMQ_INTREE_KEEP:-}" ] && [ -f "$ko" ]; then
		mkdir -p "$DMQ_INTREE_KEEP" && cp "$ko" "$DMQ_INTREE_KEEP/dm-qcow2.ko"
	fi
fi
tap_done patches "($(since "$t0"))"
