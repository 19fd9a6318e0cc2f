#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 driven exactly as the C target's known callers drive it
# (reference-behaviour.md, "How people drive it"), each step checked
# against QEMU's view of the images:
#   helper_script: a chain found by following "backing file:" of
#     `qemu-img info`, every image opened with a plain `exec {fd}<>` (no
#     O_DIRECT) and flock'ed, `dmsetup create` with the descriptors; the
#     status TABLE parsed as "<nr> v<ver> <clu_sectors>"; the device found
#     again by get_img_name of the top; resize by suspend + `qemu-img
#     resize` + reload + resume; check by suspend + `qemu-img check -r
#     leaks` + resume; remove.
#   vendor_library: the dirty bit set from userspace before create (O_DIRECT
#     descriptors, top read-write, lower read-only); an internal snapshot by
#     suspend + `qemu-img snapshot -c` + resume; a merge by message.
#
# usage: qcow2_compat.sh [-l] [CASE...]

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

MIB=$((1 << 20))
MSG_OUT=			# output of the last msg_ok

# patch_into RAW OFFSET FILE: FILE written into the expected image RAW
patch_into() {
	dmq_run dd if="$3" of="$1" bs=4k seek=$(($2 / 4096)) conv=notrunc status=none
}

# chain_of TOP: the images of TOP's chain, base first, as the helper script
# finds them: "backing file:" of `qemu-img info`, relative to the image
chain_of() {
	local img=$1 b out=()
	while :; do
		out=("$(readlink -f "$img")" "${out[@]}")
		b=$("$QEMU_IMG" info "$img" | sed -n 's/^backing file: \([^ ]*\).*/\1/p') ||
			return 1
		[ -n "$b" ] || break
		case $b in
		/*) img=$b ;;
		*) img=$(dirname "$img")/$b ;;
		esac
	done
	printf '%s\n' "${out[@]}"
}

# find_by_top TOP: the device whose top is TOP (get_img_name of the top)
find_by_top() {
	local n t nr
	t=$(readlink -f "$1")
	"$DMSETUP" ls --target qcow2 2>/dev/null | while read -r n _; do
		case $n in "$DMQ_PREFIX"*) ;; *) continue ;; esac
		nr=$("$DMSETUP" table "$n" | awk '$3 == "qcow2" {print $4}')
		[ -n "$nr" ] || continue
		[ "$("$DMSETUP" message "$n" 0 get_img_name $((nr - 1)))" = "$t" ] && echo "$n"
	done
}

# table_fields NAME: "<nr> <ver> <clu_sectors>" parsed from the status
# TABLE line as the helper script does
table_fields() {
	local t
	t=$("$DMSETUP" table "$1") || return 1
	# shellcheck disable=SC2086	# the table's words
	set -- $t
	[ "$3" = qcow2 ] || return 1
	case $5 in v*) ;; *) return 1 ;; esac
	echo "$4 ${5#v} $6"
}

compat_exit() {
	"$DMSETUP" resume "$(dmq_full_name h)" >/dev/null 2>&1
	"$DMSETUP" resume "$(dmq_full_name l)" >/dev/null 2>&1
}

case_helper_script() {
	local full imgs fds=() fd img sectors f dev found
	full=$(dmq_full_name h)
	trap compat_exit EXIT
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:2M r:4M:1M
	mkdir -p sub
	# a relative backing name, resolved against the image's directory
	dmq_img_create mid.qcow2 16M cluster_size=64k base.qcow2
	dmq_write mid.qcow2 r:1M:512k P0x33:6M:1M
	dmq_run "$QEMU_IMG" create -q -f qcow2 -o cluster_size=64k -b ../mid.qcow2 \
		-F qcow2 sub/top.qcow2 16M
	dmq_write sub/top.qcow2 P0x44:3M:64k r:10M:128k
	mapfile -t imgs < <(chain_of sub/top.qcow2) || dmq_fail "qemu-img info"
	[ "${#imgs[@]}" = 3 ] || dmq_fail "chain: ${imgs[*]}"
	echo "chain from qemu-img info: ${imgs[*]}"
	convert sub/top.qcow2 before.raw

	for img in "${imgs[@]}"; do
		exec {fd}<>"$img" || dmq_fail "open $img"
		flock -n "$fd" || dmq_fail "flock $img"
		fds+=("$fd")
	done
	sectors=$(($(stat -c %s before.raw) / 512))
	dmq_run "$DMSETUP" create "$full" --table "0 $sectors qcow2 ${fds[*]}"
	read -r -a f <<<"$(table_fields "$full")" || dmq_fail "table: $("$DMSETUP" table "$full")"
	[ "${f[0]}" = 3 ] && [ "${f[1]}" = 3 ] && [ "${f[2]}" = 128 ] ||
		dmq_fail "status TABLE: '${f[*]}', expected 3 images, v3, 128 sectors"
	echo "status TABLE: ${f[0]} images, v${f[1]}, ${f[2]} sectors a cluster"
	found=$(find_by_top sub/top.qcow2)
	[ "$found" = "$full" ] || dmq_fail "found by the top's get_img_name: '$found'"
	echo "found again by get_img_name of the top: $found"
	dev=$(dmq_dev h) || dmq_fail "no device node"
	dump "$dev" dev.raw
	same before.raw dev.raw "the device does not read like qemu-img convert"
	dmq_run dd if=/dev/urandom of=a.bin bs=64k count=2 status=none
	put a.bin "$dev" $((5 * MIB))
	cp before.raw want.raw && patch_into want.raw $((5 * MIB)) a.bin

	# resize: suspend, qemu-img resize, reload with the new length, resume
	dmq_run "$DMSETUP" suspend "$full"
	dmq_run "$QEMU_IMG" resize -q -f qcow2 sub/top.qcow2 24M
	dmq_run "$DMSETUP" reload "$full" --table "0 $((24 * 2048)) qcow2 ${fds[*]}"
	dmq_run "$DMSETUP" resume "$full"
	[ "$(blockdev --getsize64 "$dev")" = $((24 * MIB)) ] ||
		dmq_fail "size after resize: $(blockdev --getsize64 "$dev")"
	dmq_run truncate -s 24M want.raw
	put a.bin "$dev" $((20 * MIB))
	patch_into want.raw $((20 * MIB)) a.bin
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after the resize"
	echo "resized to 24M by suspend + qemu-img resize + reload + resume"

	# check: suspend, qemu-img check -r leaks, resume
	dmq_run "$DMSETUP" suspend "$full"
	dmq_run "$QEMU_IMG" check -q -r leaks -f qcow2 sub/top.qcow2
	dmq_run "$DMSETUP" resume "$full"
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after the check"
	echo "checked by suspend + qemu-img check -r leaks + resume"

	dmq_remove h || dmq_fail "dmsetup remove failed"
	for fd in "${fds[@]}"; do
		exec {fd}>&-
	done
	dmq_check_images base.qcow2 mid.qcow2 sub/top.qcow2
	convert sub/top.qcow2 top.raw
	same want.raw top.raw "qemu-img convert of the top differs from the device"
	echo "QEMU reads the chain as the device did"
}

case_vendor_library() {
	local full dev inc
	full=$(dmq_full_name l)
	trap compat_exit EXIT
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:4M r:8M:2M
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 r:2M:256k
	convert top.qcow2 before.raw
	# the library marks the top dirty itself before it creates the device
	inc=$(dmq_header top.qcow2 incompatible_features) || dmq_fail "header"
	dmq_patch top.qcow2 incompatible_features=$((inc | 1))
	# O_DIRECT descriptors: the base read-write too (it receives the merge)
	dmq_create l --rw rw:base.qcow2 top.qcow2 || dmq_fail "create with a dirty top refused"
	dev=$(dmq_dev l) || dmq_fail "no device node"
	dump "$dev" dev.raw
	same before.raw dev.raw "the device does not read like qemu-img convert"
	echo "a top marked dirty from userspace maps"

	# internal snapshot: suspend, qemu-img snapshot -c, resume
	dmq_run dd if=/dev/urandom of=a.bin bs=64k count=4 status=none
	put a.bin "$dev" $((MIB))
	cp before.raw s1.raw && patch_into s1.raw $((MIB)) a.bin
	dmq_run "$DMSETUP" suspend "$full"
	dmq_run "$QEMU_IMG" snapshot -c s1 top.qcow2
	dmq_run "$DMSETUP" resume "$full"
	put a.bin "$dev" $((12 * MIB))
	cp s1.raw want.raw && patch_into want.raw $((12 * MIB)) a.bin
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after the snapshot"
	# (read now: after the merge the snapshot's unallocated clusters show
	# the merged base)
	dmq_run "$QEMU_IMG" convert -U -f qcow2 -O raw -l snapshot.name=s1 top.qcow2 snap.raw
	same s1.raw snap.raw "the internal snapshot of top.qcow2"
	echo "internal snapshot by suspend + qemu-img snapshot -c + resume"

	# merge by message
	msg_ok l merge_backward start -1 0
	dmq_wait_ready l merge_backward
	msg_ok l merge_backward complete
	[ "$(chain_len l)" = 1 ] || dmq_fail "chain after the merge: $(chain_len l) images"
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after the merge"
	echo "merged by message: one image left"
	dmq_remove l || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2
	convert base.qcow2 base.raw
	same want.raw base.raw "qemu-img convert of the base differs from the device"
	dmq_check_images top.qcow2
	echo "QEMU reads the merged base as the device did"
}

DMQ_CASES=(
	helper_script
	vendor_library
)

dmq_main "$@"
