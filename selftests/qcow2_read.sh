#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 read path: build images with qemu-img/qemu-io, map them
# read-only, and compare the device with `qemu-img convert -O raw` of the
# top image: sha256 of the whole device (O_DIRECT 1 MiB reads, and
# buffered reads for small devices), then O_DIRECT and buffered reads of
# ranges around cluster boundaries and seeded random ranges.
#
# usage: qcow2_read.sh [-l] [CASE...]

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

BUFFERED_MAX=$((64 << 20))	# also hash buffered reads up to this size
EXTRA_RANGES=()			# OFF:LEN ranges a case wants checked too

# check_map CLUSTER [--length SECTORS] SPEC...: map SPEC... (base first)
# read-only and compare the device with the raw conversion of the top.
check_map() {
	local cluster=$1 len_args=() raw dev size bytes top
	shift
	if [ "${1:-}" = "--length" ]; then
		len_args=(--length "$2")
		shift 2
	fi
	top=${!#}
	raw="expected-$(basename "$top").raw"
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw "$top" "$raw"
	if [ ${#len_args[@]} -gt 0 ]; then
		dmq_run truncate -s $((len_args[1] * 512)) "$raw"
	fi
	size=$(stat -c %s "$raw")

	dmq_create v "${len_args[@]}" "$@" ||
		dmq_fail "dmsetup create failed for $*"
	dev=$(dmq_dev v) || dmq_fail "no device node"
	bytes=$(blockdev --getsize64 "$dev") || dmq_fail "blockdev $dev"
	[ "$bytes" = "$size" ] || dmq_fail "device has $bytes bytes, expected $size"

	# cmp, not sha256sum: hashing costs seconds a case under TCG
	if ! dd if="$dev" iflag=direct bs=1M status=none | cmp -s - "$raw"; then
		dmq_py dmq_img cmp "$dev" "$raw" \
			--cluster "$cluster" --random 0 --range "0:$size"
		dmq_fail "$dev (O_DIRECT, bs=1M) differs from $raw"
	fi
	if [ "$size" -le "$BUFFERED_MAX" ]; then
		cmp -s "$dev" "$raw" || dmq_fail "$dev (buffered) differs from $raw"
	fi
	local range_args=() r
	for r in "${EXTRA_RANGES[@]}"; do
		range_args+=(--range "$r")
	done
	dmq_py dmq_img cmp -v "$dev" "$raw" \
		--cluster "$cluster" "${range_args[@]}" ||
		dmq_fail "range reads of $dev differ from $raw"
	echo "ok: $* ($size bytes)"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	rm -f "$raw"
}

# map_count IMG EXPR: number of `qemu-img map` extents e for which the
# python expression EXPR holds (guards that a fixture has what it claims)
map_count() {
	"$QEMU_IMG" map -f qcow2 --output=json "$1" |
		"$PYTHON" -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin) if eval(sys.argv[1])))' "$2"
}

# need_extents IMG WHAT EXPR: fail unless some extent matches EXPR
need_extents() {
	local n
	n=$(map_count "$1" "$3") || dmq_fail "qemu-img map $1"
	[ "$n" -gt 0 ] || dmq_fail "fixture: $1 has no $2"
	echo "$1: $n extents with $2"
}

compressed_count() {
	map_count "$1" 'e.get("compressed")'
}

# mk_raw_mix FILE SIZE: raw file with text, random, pattern and hole ranges
mk_raw_mix() {
	local f=$1 size=$2
	dmq_run truncate -s "$(dmq_size "$size")" "$f"
	shift 2
	dmq_write_raw "$f" "$@"
}

# ------------------------------------------------------------ cluster size

case_cluster_4k() {
	dmq_img_create base.qcow2 16M cluster_size=4k
	dmq_write base.qcow2 t:0:64k r:1M+512:9k P0x11:2M-4k:8k \
		t:5M+100:3000 r:8M:1M t:16M-6k:6k
	dmq_img_create top.qcow2 16M cluster_size=4k base.qcow2
	dmq_write top.qcow2 r:4k:4k t:8k+512:7k P0x22:1M+4k:1k zu:8M+64k:8k \
		z:8M+256k+512:1k t:12M:2M+2k r:16M-512:512
	EXTRA_RANGES=(2M-4k:8k 8M+60k:16k)
	check_map 4k base.qcow2
	check_map 4k base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

case_cluster_64k() {
	dmq_img_create a.qcow2 32M cluster_size=64k
	dmq_write a.qcow2 t:0:64k t:192k+512:100k r:1M-3k:70k P0x5a:20M+1:1 \
		t:4M:256k z:4M:128k zu:4M+192k:64k r:31M:1M t:8M+64k-1:2
	EXTRA_RANGES=(4M-4k:320k 1M-4k:8k)
	check_map 64k a.qcow2
	dmq_check_images a.qcow2
}

case_cluster_2m() {
	dmq_img_create base.qcow2 32M cluster_size=2M
	dmq_write base.qcow2 t:0:2M r:2M-4k:8k t:7M+512:3M \
		P0x5a:20M+4097:10000 r:32M-512:512
	dmq_img_create top.qcow2 32M cluster_size=2M base.qcow2
	dmq_write top.qcow2 r:1M:64k zu:4M:2M t:9M:4k P0x77:30M:2M
	EXTRA_RANGES=(4M-4k:2M+8k 2M-64k:128k)
	check_map 2M base.qcow2
	check_map 2M base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

# ---------------------------------------------------------------- versions

case_v2_64k() {
	dmq_img_create a.qcow2 32M cluster_size=64k,compat=0.10
	[ "$(dmq_header a.qcow2 version)" = 2 ] || dmq_fail "not a v2 image"
	dmq_write a.qcow2 t:0:64k r:100k:200k P0x42:10M+3:5 t:31M+512:512k \
		z:100k+64k:64k
	check_map 64k a.qcow2
	dmq_check_images a.qcow2
}

case_v2_chain() {
	dmq_img_create base.qcow2 16M cluster_size=64k,compat=0.10
	dmq_write base.qcow2 t:0:8M
	dmq_img_create top.qcow2 16M cluster_size=64k,compat=0.10 base.qcow2
	[ "$(dmq_header top.qcow2 version)" = 2 ] || dmq_fail "not a v2 image"
	dmq_write top.qcow2 r:64k:64k z:1M:128k t:3M+1k:2k P0x99:15M:1M
	check_map 64k base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

case_v3_on_v2() {
	dmq_img_create base.qcow2 16M cluster_size=64k,compat=0.10
	dmq_write base.qcow2 t:0:4M
	dmq_img_create top.qcow2 16M cluster_size=64k,compat=1.1 base.qcow2
	dmq_write top.qcow2 z:0:64k r:2M+512:1k zu:3M:64k
	check_map 64k base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

# -------------------------------------------------------------- extended L2

# (128k clusters on the 4 KiB-sector pass: dmq_extl2_cluster)
case_extl2_64k() {
	local c o
	c=$(dmq_extl2_cluster 64k)
	o=cluster_size=$c,extended_l2=on
	dmq_img_create base.qcow2 16M "$o"
	dmq_write base.qcow2 t:0:1M r:3M:512k P0x44:8M+60k:8k r:10M+3k:1k
	dmq_img_create top.qcow2 16M "$o" base.qcow2
	dmq_write top.qcow2 r:2k:2k t:64k+6k:4k P0x55:128k+100:1000 \
		r:1M-1k:2k z:3M+4k:4k zu:3M+64k:2k t:8M+62k:4k r:12M+30k:3k \
		zu:3M+128k:64k t:10M+2k:1k
	need_extents top.qcow2 "partial subcluster data" \
		'e["depth"] == 0 and e["data"] and e["length"] < 65536'
	EXTRA_RANGES=(8M+56k:16k 10M:64k 12M+28k:8k)
	check_map "$c" base.qcow2
	check_map "$c" base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

case_extl2_2m() {
	local o=cluster_size=2M,extended_l2=on
	dmq_img_create base.qcow2 16M "$o"
	dmq_write base.qcow2 t:0:4M P0x21:9M+100:1000
	dmq_img_create top.qcow2 16M "$o" base.qcow2
	dmq_write top.qcow2 r:64k:64k t:2M+100k:200k z:1M:128k \
		P0x66:6M-32k:64k r:10M+1:1000 zu:3M:64k
	EXTRA_RANGES=(9M:128k 2M+64k:256k 6M-64k:128k)
	check_map 2M base.qcow2
	check_map 2M base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

# ---------------------------------------------------------------- compressed

# compressed_case CLUSTER RAWSIZE [extra -o options]
compressed_case() {
	local cluster=$1 size=$2 opts=${3:-} n
	mk_raw_mix src.raw "$size" t:0:3M r:3M+512:1M P0x11:5M:1M \
		t:6M+3k:1M+5k "r:$size-1M+512:1M-512"
	dmq_run "$QEMU_IMG" convert -c -f raw -O qcow2 \
		-o "cluster_size=$cluster${opts:+,$opts}" src.raw a.qcow2
	n=$(compressed_count a.qcow2) || dmq_fail "qemu-img map"
	[ "$n" -gt 0 ] || dmq_fail "no compressed clusters in a.qcow2"
	echo "a.qcow2: $n compressed extents"
	dmq_run "$QEMU_IMG" compare -f raw -F qcow2 src.raw a.qcow2
	check_map "$cluster" a.qcow2
	dmq_check_images a.qcow2
}

case_compressed_64k() {
	compressed_case 64k 16M
}

case_compressed_4k() {
	compressed_case 4k 8M
}

case_compressed_2m() {
	compressed_case 2M 16M
}

case_compressed_extl2() {
	compressed_case "$(dmq_extl2_cluster 64k)" 8M extended_l2=on
}

case_compressed_overlay() {
	local n
	mk_raw_mix src.raw 16M t:0:3M r:3M+512:1M P0x11:5M:1M t:8M:2M
	dmq_run "$QEMU_IMG" convert -c -f raw -O qcow2 -o cluster_size=64k \
		src.raw base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 r:128k+512:3k t:1M:64k ct:4M:128k cr:11M:64k \
		z:8M+64k:64k P0x3c:9M+100:200 ct:12M:64k
	n=$(compressed_count top.qcow2) || dmq_fail "qemu-img map"
	[ "$n" -gt 0 ] || dmq_fail "no compressed clusters in top.qcow2"
	check_map 64k base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

# ------------------------------------------------------------- zero clusters

case_zero_clusters() {
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 P0xaa:0:8M t:8M:1M
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	# zero over lower data (aligned, unmapped, unaligned), zero over the
	# top's own data (zero flag with a host offset), beyond lower data
	dmq_write top.qcow2 z:0:64k zu:1M:256k z:2M+4k:8k z:8M+64k:128k \
		r:4M:192k z:4M:64k zu:4M+64k:64k r:12M:64k z:12M+32k:64k
	need_extents top.qcow2 "zero clusters" \
		'e["depth"] == 0 and e["zero"] and "offset" not in e'
	need_extents top.qcow2 "zero clusters keeping their host offset" \
		'e["depth"] == 0 and e["zero"] and "offset" in e'
	EXTRA_RANGES=(4M-4k:200k 2M:64k 12M:128k)
	check_map 64k base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

case_zero_extl2() {
	local c o
	c=$(dmq_extl2_cluster 64k)
	o=cluster_size=$c,extended_l2=on
	dmq_img_create base.qcow2 8M "$o"
	dmq_write base.qcow2 P0xcc:0:4M t:4M:2M
	dmq_img_create top.qcow2 8M "$o" base.qcow2
	# per-subcluster (2k) zero bits over lower data, mixed with data
	dmq_write top.qcow2 z:0:2k z:64k+4k:8k zu:128k:64k r:192k:2k \
		z:192k+2k:2k z:4M+30k:10k r:6M:3k zu:4M+64k:6k z:5M+1k:3k \
		r:5M+128k:64k zu:5M+128k+4k:4k
	need_extents top.qcow2 "zero subclusters" \
		'e["depth"] == 0 and e["zero"] and e["length"] < 65536'
	need_extents top.qcow2 "zero subclusters in allocated clusters" \
		'e["depth"] == 0 and e["zero"] and "offset" in e'
	EXTRA_RANGES=(4M+28k:16k 5M:8k 5M+128k:64k)
	check_map "$c" base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

# -------------------------------------------------------- corrupt metadata
# Every L1, L2 and refcount table entry the target uses, and every
# compressed stream, is checked: a bad one fails the bio with EIO and logs
# "dm-qcow2: image <img_id>: <what>"; the rest of the device reads as
# before. (Entries pointing past the end of the file are not errors: the
# table or data there reads as zeroes, as QEMU reads it too; qemu-img
# convert of such an image is the oracle for those ranges.)

COPIED=$((1 << 63))

# set_entry IMG KIND WHERE OP VALUE: patch a metadata entry (dmq_img.py entry)
set_entry() {
	local out
	out=$(dmq_py dmq_img entry "$@" 2>&1) ||
		{ printf '%s\n' "$out"; dmq_fail "dmq_img.py entry $*"; }
	echo "$1: $2 $3 $4 $5 -> $out"
}

# entry_val IMG KIND WHERE: the entry's value as a (signed 64-bit) shell
# number (no fail here: check the status)
entry_val() {
	local out
	out=$(dmq_py dmq_img entry "$@") || return 1
	echo $((${out#* }))
}

# expect_kmsg TEXT: the kernel logged a line with TEXT during this case
expect_kmsg() {
	local lines hit
	lines=$(dmq_dmesg_case)
	hit=$(grep -F -- "$1" <<<"$lines" | head -n 1)
	if [ -z "$hit" ]; then
		printf '%s\n' "$lines" | tail -n 30 | sed 's/^/  /'
		dmq_fail "no kernel line with '$1'"
	fi
	echo "dmesg: $hit"
}

# check_bad RAW BAD... -- SPEC...: map SPEC (base first) read-only; every
# 4k block of the BAD ranges (OFF:LEN) must fail with EIO, so must reads
# across their edges, and everything else must equal RAW
check_bad() {
	local raw=$1 args=() dev
	shift
	while [ "$1" != -- ]; do
		args+=(--bad "$1")
		shift
	done
	shift
	dmq_create v "$@" || dmq_fail "dmsetup create failed for $*"
	dev=$(dmq_dev v) || dmq_fail "no device node"
	dmq_py dmq_img badread "$dev" "$raw" "${args[@]}" ||
		dmq_fail "reads of $dev: EIO not exactly on ${args[*]}"
	dmq_remove v || dmq_fail "dmsetup remove failed"
}

# L1 entries of the base: reserved bits, a misaligned L2 table, and one
# past the end of the file; the top's own cluster in the bad range reads
case_corrupt_l1() {
	dmq_needs_kernel "EIO from the target's metadata checks"
	dmq_img_create base.qcow2 8M cluster_size=4k
	dmq_write base.qcow2 t:0:8M
	dmq_img_create top.qcow2 8M cluster_size=4k base.qcow2
	dmq_write top.qcow2 r:2M:64k
	set_entry base.qcow2 l1 3 = $((COPIED | 1 << 30))
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 expected.raw
	set_entry base.qcow2 l1 1 '|=' 4
	set_entry base.qcow2 l1 2 += 512
	check_bad expected.raw 2M+64k:2M-64k 4M:2M -- base.qcow2 top.qcow2
	expect_kmsg "dm-qcow2: image 0: Corrupt L1 entry"
}

# L2 entries: reserved bits, a misaligned data cluster, a compressed entry
# with the COPIED bit, one past the end of the file (reads zeroes); a v2
# entry with the zero flag (v3 only); extended L2 entries with a
# subcluster both allocated and zero, or the plain zero flag set
case_corrupt_l2() {
	dmq_needs_kernel "EIO from the target's metadata checks"
	dmq_img_create base.qcow2 8M cluster_size=4k
	dmq_write base.qcow2 t:0:8M
	dmq_img_create top.qcow2 8M cluster_size=4k base.qcow2
	dmq_write top.qcow2 r:1M:64k
	set_entry top.qcow2 l2 1M+12k = $((COPIED | 1 << 30))
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 expected.raw
	set_entry top.qcow2 l2 1M '|=' 2
	set_entry top.qcow2 l2 1M+4k += 512
	set_entry top.qcow2 l2 1M+8k '|=' $((1 << 62))
	check_bad expected.raw 1M:12k -- base.qcow2 top.qcow2
	expect_kmsg "dm-qcow2: image 1: Corrupt L2 entry"

	dmq_img_create v2.qcow2 2M cluster_size=4k,compat=0.10
	dmq_write v2.qcow2 t:0:2M
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw v2.qcow2 expected-v2.raw
	set_entry v2.qcow2 l2 64k '|=' 1
	check_bad expected-v2.raw 64k:4k -- v2.qcow2

	# 128k clusters: 4k subclusters, also on 4k-sector devices
	dmq_img_create x.qcow2 4M cluster_size=128k,extended_l2=on
	dmq_write x.qcow2 t:0:4M
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw x.qcow2 expected-x.raw
	set_entry x.qcow2 l2bitmap 1M '|=' $((1 << 32))
	set_entry x.qcow2 l2 2M '|=' 1
	check_bad expected-x.raw 1M:128k 2M:128k -- x.qcow2
}

# compressed clusters: a garbage stream, a stream past the end of the file
# (zeroes do not inflate), a stream cut to one sector
case_corrupt_compressed() {
	local raw host c
	dmq_needs_kernel "EIO from the target's metadata checks"
	mk_raw_mix src.raw 2M t:0:2M
	dmq_run "$QEMU_IMG" convert -c -f raw -O qcow2 -o cluster_size=64k \
		src.raw a.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 expected.raw
	# 64k clusters: the host offset is in bits 0..53, the sector count
	# minus one in bits 54..61
	for c in 128k 256k 384k; do
		raw=$(entry_val a.qcow2 l2 "$c") || dmq_fail "no L2 entry at $c"
		[ $((raw >> 62 & 1)) = 1 ] || dmq_fail "cluster at $c is not compressed"
	done
	raw=$(entry_val a.qcow2 l2 128k) || dmq_fail "L2 entry at 128k"
	host=$((raw & ((1 << 54) - 1)))
	dmq_run dmq_py dmq_img fill a.qcow2 64 P0xff 0 --at "$host"
	raw=$(entry_val a.qcow2 l2 256k) || dmq_fail "L2 entry at 256k"
	set_entry a.qcow2 l2 256k = $(((raw & ~((1 << 54) - 1)) | 1 << 30))
	raw=$(entry_val a.qcow2 l2 384k) || dmq_fail "L2 entry at 384k"
	[ $((raw >> 54 & 0xff)) -gt 1 ] || dmq_fail "cluster at 384k fits a sector"
	set_entry a.qcow2 l2 384k = $(((raw & ((1 << 54) - 1)) | 1 << 62))
	check_bad expected.raw 128k:64k 256k:64k 384k:64k -- a.qcow2
	expect_kmsg "dm-qcow2: image 0: bad compressed cluster at $(printf '%#x' "$host")"
}

# write_4k DEV BLOCK ok|eio: an O_DIRECT 4k write of 0x6b bytes at 4k block
# BLOCK of DEV must succeed, or fail with EIO
write_4k() {
	local out rc
	[ -f w.bin ] || "$PYTHON" -c 'import sys; sys.stdout.buffer.write(b"\x6b" * 4096)' >w.bin ||
		dmq_fail "python"
	out=$(dd if=w.bin of="$1" bs=4k seek="$2" count=1 oflag=direct \
		conv=notrunc,fsync status=none 2>&1)
	rc=$?
	case $3 in
	ok) [ "$rc" = 0 ] || { printf '%s\n' "$out"; dmq_fail "write of block $2 failed"; } ;;
	eio)
		[ "$rc" != 0 ] || dmq_fail "write of block $2 succeeded, expected EIO"
		grep -q "Input/output error" <<<"$out" ||
			{ printf '%s\n' "$out"; dmq_fail "write of block $2: not EIO"; } ;;
	esac
	echo "write of 4k block $2: $3"
}

# A writable top over a base: writes meeting a bad L2 entry of the top, a
# garbage compressed cluster of the base (copy-on-write) or a bad refcount
# table entry (allocation) fail with EIO; a write in place lands. With the
# metadata restored afterwards, both images check clean (no cluster leaked
# by the failed copy-on-write) and the top holds exactly the write that
# succeeded.
case_corrupt_writes() {
	local dev l2 rt raw host out
	dmq_needs_kernel "EIO from the target's metadata checks"
	dmq_img_create base.qcow2 8M cluster_size=4k
	dmq_write base.qcow2 t:0:6M ct:6M:64k t:7M:1M
	dmq_img_create top.qcow2 8M cluster_size=4k base.qcow2
	dmq_write top.qcow2 r:1M:8k r:2M:64k
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 expected.raw
	dmq_run cp base.qcow2 base.orig
	# 4k clusters: the host offset of a compressed cluster is in bits 0..57
	raw=$(entry_val base.qcow2 l2 6M+8k) || dmq_fail "L2 entry at 6M+8k"
	[ $((raw >> 62 & 1)) = 1 ] || dmq_fail "base cluster at 6M+8k is not compressed"
	host=$((raw & ((1 << 58) - 1)))
	dmq_run dmq_py dmq_img fill base.qcow2 64 P0xff 0 --at "$host"
	l2=$(entry_val top.qcow2 l2 1M) || dmq_fail "L2 entry at 1M"
	rt=$(entry_val top.qcow2 reft 0) || dmq_fail "refcount table entry 0"
	set_entry top.qcow2 l2 1M '|=' 2

	dmq_create w --rw base.qcow2 top.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	write_4k "$dev" 512 ok
	write_4k "$dev" 256 eio
	# a write of part of the cluster over the bad compressed one needs its
	# data (copy-on-write): EIO. (A whole-cluster write needs nothing from
	# below and succeeds.) Not on 4 KiB logical blocks: 4k is the cluster.
	if [ "$(blockdev --getss "$dev")" = 512 ]; then
		out=$(dd if=w.bin of="$dev" bs=512 seek=$(((6 * 1024 + 8) * 2 + 1)) \
			count=1 oflag=direct conv=notrunc,fsync status=none 2>&1) &&
			dmq_fail "a partial write over the bad compressed cluster succeeded"
		grep -q "Input/output error" <<<"$out" ||
			{ printf '%s\n' "$out"; dmq_fail "partial write: not EIO"; }
		echo "write of 512 bytes at 6M+8k+512: eio"
	fi
	expect_kmsg "dm-qcow2: image 1: Corrupt L2 entry"
	dmq_run dmq_py dmq_img fill expected.raw 4k P0x6b 0 --at 2M
	dmq_py dmq_img badread "$dev" expected.raw \
		--bad 1M:4k --bad 6M+8k:4k || dmq_fail "reads of $dev"
	expect_kmsg "dm-qcow2: image 0: bad compressed cluster at $(printf '%#x' "$host")"
	dmq_remove w || dmq_fail "dmsetup remove failed"

	# a corrupt refcount table entry: the writable table is refused at
	# once (its metadata clusters' refcounts are checked at load); a
	# read-only one maps
	set_entry top.qcow2 reft 0 '|=' 1
	dmq_expect_ctr_error w "Cannot read image metadata" -EIO \
		--rw base.qcow2 top.qcow2
	expect_kmsg "dm-qcow2: image 1: Corrupt refcount table entry"
	dmq_create w base.qcow2 top.qcow2 || dmq_fail "read-only table refused"
	dmq_remove w || dmq_fail "dmsetup remove failed"

	set_entry top.qcow2 l2 1M = "$l2"
	set_entry top.qcow2 reft 0 = "$rt"
	dmq_run cp base.orig base.qcow2
	dmq_check_images base.qcow2 top.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 after.raw
	cmp expected.raw after.raw || dmq_fail "top.qcow2 is not what was written"
}

# -------------------------------------------------------------------- chains

case_chain3() {
	local o=cluster_size=64k
	dmq_img_create base.qcow2 64M "$o"
	dmq_write base.qcow2 t:0:1M P0x11:10M:5M r:63M:1M t:30M+513:100k
	dmq_img_create mid.qcow2 96M "$o" base.qcow2
	dmq_write mid.qcow2 r:512k:65k z:10M+64k:64k t:62M:4M P0x22:90M:2M \
		ct:40M:256k
	dmq_img_create top.qcow2 128M "$o" mid.qcow2
	dmq_write top.qcow2 t:64k:4k zu:10M:64k r:95M+3k:2M P0x33:127M:1M \
		z:63M+128k:64k t:70M:64k
	EXTRA_RANGES=(64M-4k:8k 64M-64k:128k 96M-4k:8k 96M-512:1k 10M-4k:200k)
	check_map 64k base.qcow2 mid.qcow2
	check_map 64k base.qcow2 mid.qcow2 top.qcow2
	dmq_check_images base.qcow2 mid.qcow2 top.qcow2
}

# virtual sizes that are not a multiple of the cluster size
# (sizes in whole logical blocks of the scratch device: a table's length
# must be, so 5M+3*512 on 512-byte sectors, 5M+3*4096 on the 4 KiB pass)
case_odd_size() {
	local ss=${DMQ_SCRATCH_SECTOR:-512}
	dmq_img_create base.qcow2 "5M+$((3 * ss))" cluster_size=64k
	dmq_write base.qcow2 r:0:3k "t:5M-10k:10k+$((3 * ss))"
	dmq_img_create top.qcow2 "7M+$ss" cluster_size=64k base.qcow2
	dmq_write top.qcow2 r:5M:4k "P0x71:7M-1k:1k+$ss"
	EXTRA_RANGES=("5M-4k:5k+$ss" 5M:4k)
	check_map 64k base.qcow2
	check_map 64k base.qcow2 top.qcow2
	dmq_check_images base.qcow2 top.qcow2
}

# a table shorter than the top's virtual size
case_short_table() {
	dmq_img_create a.qcow2 32M cluster_size=64k
	dmq_write a.qcow2 t:0:1M t:9M:2M
	# one logical block past 10M (a sector, or 8 on the 4 KiB pass)
	check_map 64k --length $(((10 << 20) / 512 + ${DMQ_SCRATCH_SECTOR:-512} / 512)) a.qcow2
	dmq_check_images a.qcow2
}

case_refcount64_4k() {
	dmq_img_create a.qcow2 8M cluster_size=4k,refcount_bits=64
	[ "$(dmq_header a.qcow2 refcount_order)" = 6 ] || dmq_fail "refcount_order"
	dmq_write a.qcow2 t:0:1M r:3M+512:5k
	check_map 4k a.qcow2
	dmq_check_images a.qcow2
}

# corrupt_writes: trimming the top on suspend reads the bad refcount table
# entry ("truncate failed"); leaked_refcounts: a damaged image whose
# refcount table cannot grow (a write fails); many_l2_tables: a write
# would overwrite an L2 table
DMQ_FAULT_CASES="corrupt_writes overlap_writes lane_meta_reuse leaked_refcounts many_l2_tables"

# bytes LEN at OFF of IMG, as a sha256
range_sum() {
	"$PYTHON" -c 'import hashlib, sys
f = open(sys.argv[1], "rb"); f.seek(int(sys.argv[2]))
print(hashlib.sha256(f.read(int(sys.argv[3]))).hexdigest())' "$@"
}

# metadata overlap protection (QEMU's overlap-check): the top's L2 entry
# at 1M points (COPIED) at its own L1 table, the one at 2M (shared, no
# COPIED) at its refcount block. A write at 1M fails with EIO, a dmesg line
# names the L1 table, the image gets the corrupt bit and takes no more
# writes (not even in place, where the fast path could reach); the table
# cannot be resumed. A discard at 2M on a second copy must not drop the
# refcount block's reference. The L1 table and refcount block are unchanged;
# the image is refused afterwards (by us and, writable, by QEMU).
case_overlap_writes() {
	local dev l1 rb info
	dmq_needs_kernel "the target's overlap checks"
	dmq_img_create top.qcow2 8M cluster_size=64k
	dmq_write top.qcow2 r:1M:64k r:2M:64k r:3M:64k
	l1=$(dmq_header top.qcow2 l1_table_offset) || dmq_fail "header"
	rb=$(entry_val top.qcow2 reft 0) || dmq_fail "refcount table entry 0"
	set_entry top.qcow2 l2 1M = "$(printf '0x%x' $((l1 | (1 << 63))))"
	set_entry top.qcow2 l2 2M = "$(printf '0x%x' "$rb")"
	dmq_run cp top.qcow2 second.qcow2
	local l1sum rbsum
	l1sum=$(range_sum top.qcow2 "$l1" 65536) && rbsum=$(range_sum top.qcow2 "$rb" 65536) ||
		dmq_fail "sha256"

	dmq_create w --rw top.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	# the cluster at 3M read first: the fast path knows it
	dmq_run dd if="$dev" of=/dev/null bs=4k skip=768 count=1 iflag=direct status=none
	write_4k "$dev" 256 eio
	expect_kmsg "dm-qcow2: image 0: write at host offset $(printf '%#x' "$l1") would overwrite its L1 table"
	write_4k "$dev" 768 eio
	echo "the image takes no more writes"
	dmq_run "$DMSETUP" suspend "$(dmq_full_name w)"
	"$DMSETUP" resume "$(dmq_full_name w)" 2>/dev/null &&
		dmq_fail "resume worked on an image found corrupt"
	dmq_remove w || dmq_fail "dmsetup remove failed"
	[ "$(range_sum top.qcow2 "$l1" 65536)" = "$l1sum" ] || dmq_fail "the L1 table changed"
	[ "$(range_sum top.qcow2 "$rb" 65536)" = "$rbsum" ] || dmq_fail "the refcount block changed"
	info=$("$QEMU_IMG" info --output=json top.qcow2) || dmq_fail "qemu-img info"
	"$PYTHON" -c 'import json, sys
sys.exit(0 if json.loads(sys.argv[1])["format-specific"]["data"].get("corrupt") else 1)' "$info" ||
		dmq_fail "the image is not marked corrupt: $info"
	echo "top.qcow2 is marked corrupt; L1 table and refcount block unchanged"
	dmq_expect_ctr_error w "Image is marked corrupt" -EOPNOTSUPP --rw top.qcow2

	# a discard of the cluster that points at the refcount block
	dmq_create w --rw second.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	dmq_run blkdiscard -o $((2 * 1024 * 1024)) -l 65536 "$dev"
	expect_kmsg "would overwrite its refcount block"
	dmq_remove w || dmq_fail "dmsetup remove failed"
	[ "$(range_sum second.qcow2 "$rb" 65536)" = "$rbsum" ] ||
		dmq_fail "the refcount block changed: its reference was dropped"
	dmq_expect_ctr_error w "Image is marked corrupt" -EOPNOTSUPP --rw second.qcow2
	echo "second.qcow2: the refcount block kept its reference"
}

# A damaged image's data cluster reused as metadata while the fast path
# knows it: the top's L2 entry at 64k points (COPIED) at a cluster whose
# refcount was set to 0. A read at 64k puts the entry in the fast path's
# table, writable; the first write at 512M needs a new L2 table, which the
# allocator puts in that "free" cluster. A write at 64k then fails with
# EIO, as the locked path's overlap check says (the table's entry went when
# the cluster became metadata); on a module without that, a lane wrote it
# in place, over the new L2 table, and the data at 512M was lost. The new
# table still maps 512M: QEMU reads the write there.
case_lane_meta_reuse() {
	local dev host l1
	dmq_needs_kernel "the fast path's metadata fence"
	dmq_img_create a.qcow2 1G cluster_size=64k,refcount_bits=64
	dmq_write a.qcow2 P0x11:0:64k P0x22:64k:64k
	host=$(entry_val a.qcow2 l2 64k) || dmq_fail "L2 entry at 64k"
	host=$((host & ((1 << 56) - 512)))
	set_entry a.qcow2 refb $((host >> 16)) = 0
	dmq_create w --rw a.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	dmq_run dd if="$dev" of=/dev/null bs=4k skip=16 count=1 iflag=direct status=none
	write_4k "$dev" 131072 ok
	l1=$(entry_val a.qcow2 l1 1) || dmq_fail "L1 entry 1"
	[ $((l1 & ((1 << 56) - 512))) = "$host" ] ||
		dmq_fail "the new L2 table is not in the cluster at $(printf '%#x' "$host")"
	echo "the L2 table for 512M went into $(printf '%#x' "$host")"
	write_4k "$dev" 16 eio
	expect_kmsg "would overwrite its L2 table"
	dmq_remove w || dmq_fail "dmsetup remove failed"
	dmq_run "$QEMU_IO" -r -f qcow2 -c "read -P 0x6b 512M 4k" -c "read -P 0x11 0 64k" a.qcow2 ||
		dmq_fail "qemu-io does not read the write at 512M"
}

# set_reft IMG FIRST VALUE: refcount table entries FIRST.. of IMG = VALUE
set_reft() {
	local rt n
	rt=$(dmq_header "$1" refcount_table_offset) &&
		n=$(($(dmq_header "$1" refcount_table_clusters) * 8192)) ||
		dmq_fail "header"
	"$PYTHON" -c 'import struct, sys
f = open(sys.argv[1], "r+b"); rt, n, first, v = map(int, sys.argv[2:])
f.seek(rt + 8 * first); f.write(struct.pack(">Q", v) * (n - first))' \
		"$1" "$rt" "$n" "$2" "$3" || dmq_fail "python"
	echo "$1: refcount table entries $2..$((n - 1)) = $(printf '%#x' "$3")"
}

# Refcounts past the end of the file: leaks (nothing can be stored there),
# a few of which a crash may leave, while a damaged image may claim every
# cluster its refcount table can describe (2^28 here). A free-cluster search
# that meets a long run of them (4096) goes on at the next refcount block
# not allocated yet, and the trim on suspend looks only inside the file:
# neither walks them one by one with the state locked.
# 1. 5000 leaked clusters after the end: the new cluster goes into the next
#    refcount block's range (2 GiB); qemu-img finds the leaks and nothing
#    else, and after its repair the image holds what was written.
# 2. Every refcount table entry names one cluster of 0xff bytes (every
#    cluster in use): the write ends (EIO where the host file system cannot
#    hold a 16 TiB file, which the table's growth needs) in seconds.
# 3. Entries 1.. name one zeroed cluster: a write and the suspend's trim end
#    in seconds.
case_leaked_refcounts() {
	local dev rb eof host z t
	dmq_needs_kernel "the target's free-cluster search"
	dmq_img_create a.qcow2 64M cluster_size=64k
	dmq_write a.qcow2 t:0:1M
	rb=$(entry_val a.qcow2 reft 0) || dmq_fail "refcount table entry 0"
	eof=$((($(stat -c %s a.qcow2) + 65535) / 65536))
	"$PYTHON" -c 'import sys
f = open(sys.argv[1], "r+b")
f.seek(int(sys.argv[2]) + 2 * int(sys.argv[3]))
f.write(b"\0\1" * 5000)' a.qcow2 "$rb" "$eof" || dmq_fail "python"
	echo "clusters $eof..$((eof + 4999)) (past the end) marked in use"
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 expected.raw
	dmq_create w --rw a.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	write_4k "$dev" 2048 ok
	expect_kmsg "dm-qcow2: image 0: refcounts mark clusters past the end of the file in use (from $(printf '%#x' $((eof * 65536))))"
	dmq_remove w || dmq_fail "dmsetup remove failed"
	host=$(($(entry_val a.qcow2 l2 8M) & ((1 << 56) - 512)))
	[ "$host" -gt $((2 << 30)) ] ||
		dmq_fail "new cluster at $host: not past the next refcount block (2 GiB)"
	echo "new cluster at $(printf '%#x' "$host")"
	dmq_run dmq_py dmq_img fill expected.raw 4k P0x6b 0 --at 8M
	check_rc a.qcow2 3
	dmq_run "$QEMU_IMG" check -q -r leaks a.qcow2
	dmq_check_images a.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 after.raw
	cmp expected.raw after.raw || dmq_fail "a.qcow2 is not what was written"

	dmq_img_create b.qcow2 64M cluster_size=64k
	dmq_write b.qcow2 P0xff:0:64k
	set_reft b.qcow2 0 $(($(entry_val b.qcow2 l2 0) & ((1 << 56) - 512)))
	dmq_create w --rw b.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	t=$SECONDS
	if dd if=w.bin of="$dev" bs=4k seek=2048 count=1 oflag=direct conv=notrunc,fsync \
		status=none 2>dd.err; then
		echo "write: ok"
	else
		echo "write: $(cat dd.err)"
	fi
	[ $((SECONDS - t)) -lt 60 ] || dmq_fail "the write took $((SECONDS - t)) s"
	[ "$(dmq_dmesg_case | grep -c "refcounts mark clusters past the end of the file")" = 2 ] ||
		dmq_fail "no second line on leaked clusters (b.qcow2's)"
	t=$SECONDS
	dmq_remove w || dmq_fail "dmsetup remove failed"
	[ $((SECONDS - t)) -lt 60 ] || dmq_fail "the removal took $((SECONDS - t)) s"

	dmq_img_create c.qcow2 64M cluster_size=64k
	dmq_write c.qcow2 t:0:1M P0x00:2M:64k
	z=$(($(entry_val c.qcow2 l2 2M) & ((1 << 56) - 512)))
	set_reft c.qcow2 1 "$z"
	dmq_create w --rw c.qcow2 || dmq_fail "writable table refused"
	dev=$(dmq_dev w) || dmq_fail "no device node"
	write_4k "$dev" 2048 ok
	t=$SECONDS
	dmq_remove w || dmq_fail "dmsetup remove failed"
	[ $((SECONDS - t)) -lt 60 ] || dmq_fail "the removal took $((SECONDS - t)) s"
	echo "removal (trim) took $((SECONDS - t)) s"
}

# Many L2 tables (what a hostile image costs): the L1 of a 512 TiB image
# names a million distinct L2 tables past the end of its ~9 MiB file, in
# descending order, all "in use" by refcount table entries naming one
# cluster of 0xff bytes. The load keeps the metadata clusters in a sorted
# array no larger than the L1 (8 MiB), not a tree node each (64 MiB of
# slab): the slab grows by less than 32 MiB. The allocated-cluster count
# skips tables past the end (they read as zeroes), so status answers with
# the two clusters that map data instead of waiting for 2^33 entries. The
# overlap check finds an L2 table in the array: a write through an L2 entry
# that points at its own table fails with EIO and leaves the table as it
# was; the tables past the end read as zeroes. The same image grown to
# 128 GiB sparsely (its tables now inside the file, in a hole: an apparent
# size bounds nothing): skipped all the same, clusters=2. Then an image
# whose L1 names its one table 1 Mi times (damaged: a 16-bit refcount cannot
# count the names; read-only here): the count walks the table once
# and counts it for every name (clusters=1 Mi) instead of looking at 2^33
# entries; reads show the table's data at every 512 MiB, as QEMU's would.
case_many_l2_tables() {
	local dev l2 ff n slab0 slab1 st sum
	dmq_needs_kernel "the target's metadata set"
	dmq_img_create m.qcow2 $((512 << 40)) cluster_size=64k
	dmq_write m.qcow2 P0xff:0:64k
	l2=$(($(entry_val m.qcow2 l1 0) & ((1 << 56) - 512))) &&
		ff=$(($(entry_val m.qcow2 l2 0) & ((1 << 56) - 512))) &&
		n=$(dmq_header m.qcow2 l1_size) || dmq_fail "entries"
	set_entry m.qcow2 l2 64k = "$(printf '0x%x' $((l2 | COPIED)))"
	set_reft m.qcow2 1 "$ff"
	"$PYTHON" -c 'import struct, sys
f = open(sys.argv[1], "r+b"); l1, n = int(sys.argv[2]), int(sys.argv[3])
f.seek(l1 + 8)
f.write(b"".join(struct.pack(">Q", 1 << 63 | (32768 + n - i) << 16) for i in range(1, n)))' \
		m.qcow2 "$(dmq_header m.qcow2 l1_table_offset)" "$n" || dmq_fail "python"
	echo "L1 entries 1..$((n - 1)): L2 tables at clusters $((32768 + n - 1))..32769 (past the end)"
	sum=$(range_sum m.qcow2 "$l2" 65536) || dmq_fail "sha256"
	cp --sparse=always m.qcow2 s.qcow2 && truncate -s 128G s.qcow2 || dmq_fail "s.qcow2"
	slab0=$(awk '/^Slab:/ { print $2 }' /proc/meminfo)
	dmq_create m --rw m.qcow2 || dmq_fail "writable table refused"
	slab1=$(awk '/^Slab:/ { print $2 }' /proc/meminfo)
	echo "slab: $slab0 kB before the load, $slab1 kB after"
	[ $((slab1 - slab0)) -lt $((32 * 1024)) ] ||
		dmq_fail "the load took $(((slab1 - slab0) / 1024)) MiB of slab"
	dev=$(dmq_dev m) || dmq_fail "no device node"
	st=$("$DMSETUP" status "$(dmq_full_name m)") || dmq_fail "dmsetup status"
	echo "status: $st"
	[[ "$st" == *" clusters=2 "* ]] || dmq_fail "clusters= is not 2"
	cmp -n 4096 <(dd if="$dev" bs=4k skip=$((512 << 8)) count=1 iflag=direct status=none) \
		/dev/zero || dmq_fail "a table past the end does not read as zeroes"
	write_4k "$dev" 16 eio
	expect_kmsg "would overwrite its L2 table"
	dmq_remove m || dmq_fail "dmsetup remove failed"
	[ "$(range_sum m.qcow2 "$l2" 65536)" = "$sum" ] || dmq_fail "the L2 table changed"
	echo "s.qcow2: m.qcow2 as it was, grown sparsely to 128 GiB (every table in a hole)"
	dmq_create s s.qcow2 || dmq_fail "read-only table refused"
	st=$(timeout 300 "$DMSETUP" status "$(dmq_full_name s)") ||
		dmq_fail "dmsetup status did not answer in 5 min (the count walked the holes?)"
	echo "status: $st"
	[[ "$st" == *" clusters=2 "* ]] || dmq_fail "clusters= is not 2"
	dmq_remove s || dmq_fail "dmsetup remove failed"

	# every L1 entry names the one table of an image (inside the file)
	dmq_img_create a.qcow2 $((512 << 40)) cluster_size=64k
	dmq_write a.qcow2 P0x6b:64k:64k
	l2=$(entry_val a.qcow2 l1 0) || dmq_fail "L1 entry 0"
	"$PYTHON" -c 'import struct, sys
f = open(sys.argv[1], "r+b"); l1, n, e = map(int, sys.argv[2:5])
f.seek(l1 + 8); f.write(struct.pack(">q", e) * (n - 1))' \
		a.qcow2 "$(dmq_header a.qcow2 l1_table_offset)" "$n" "$l2" || dmq_fail "python"
	echo "a.qcow2: all $n L1 entries name the table at $(printf '%#x' $((l2 & ((1 << 56) - 512))))"
	dmq_create a a.qcow2 || dmq_fail "read-only table refused"
	dev=$(dmq_dev a) || dmq_fail "no device node"
	st=$("$DMSETUP" status "$(dmq_full_name a)") || dmq_fail "dmsetup status"
	echo "status: $st"
	[[ "$st" == *" clusters=$n "* ]] || dmq_fail "clusters= is not $n"
	cmp -n 4096 <(dd if="$dev" bs=4k skip=$(((512 << 8) + 16)) count=1 iflag=direct status=none) \
		w.bin || dmq_fail "the table's data does not read at 512 MiB + 64k too"
	dmq_remove a || dmq_fail "dmsetup remove failed"
}

# Refcount pages read once at load: the refcount table's entries 1..8190
# name 512 data clusters of 0xff bytes in turn (8192 distinct refcount
# pages, twice the metadata cache), and the L1 names 1 Mi L2 tables (past
# the end of the file) whose refcounts lie on those pages in that cycle.
# Checked in the L1's order, each check missed the cache (1 Mi reads of
# 4 KiB per load, two loads per create); in the order of the pages, each
# page is read once: the scratch device sees fewer than 100k reads.
case_refcount_page_cycle() {
	local dev r0 r1
	dmq_needs_kernel "the target's load checks"
	dmq_img_create c.qcow2 $((512 << 40)) cluster_size=64k
	dmq_write c.qcow2 P0xff:0:32M
	"$PYTHON" -c 'import struct, sys
f = open(sys.argv[1], "r+b")
def q(off):
    f.seek(off); return struct.unpack(">Q", f.read(8))[0]
l1, rt = q(40), q(48)
n = struct.unpack(">I", (f.seek(36), f.read(4))[1])[0]
l2 = q(l1) & ((1 << 56) - 512)
blocks = [q(l2 + 8 * i) & ((1 << 56) - 512) for i in range(512)]
f.seek(rt + 8)
f.write(b"".join(struct.pack(">Q", blocks[t % 512]) for t in range(1, 8191)))
f.seek(l1 + 8)
f.write(b"".join(struct.pack(">Q", 1 << 63 | (32768 * (1 + (i // 16) % 8190) + 2048 * (i % 16)) << 16)
                 for i in range(1, n)))' c.qcow2 || dmq_fail "python"
	echo "refcount table entries 1..8190: the 512 data clusters in turn; L1 entries 1.. cycle over their pages"
	[ -n "$DMQ_LOOP" ] || dmq_skip "no scratch loop device to count reads on"
	r0=$(awk '{ print $1 }' "/sys/block/${DMQ_LOOP#/dev/}/stat") || dmq_fail "scratch device stat"
	dmq_create c --rw c.qcow2 || dmq_fail "writable table refused"
	r1=$(awk '{ print $1 }' "/sys/block/${DMQ_LOOP#/dev/}/stat")
	echo "reads of the scratch device while the table was created: $((r1 - r0))"
	[ $((r1 - r0)) -lt 100000 ] || dmq_fail "$((r1 - r0)) reads"
	dev=$(dmq_dev c) || dmq_fail "no device node"
	cmp -n 4096 <(dd if="$dev" bs=4k count=1 iflag=direct status=none) \
		<("$PYTHON" -c 'import sys; sys.stdout.buffer.write(b"\xff" * 4096)') ||
		dmq_fail "the data at 0 is not 0xff"
	dmq_remove c || dmq_fail "dmsetup remove failed"
}

DMQ_CASES=(
	cluster_4k
	cluster_64k
	cluster_2m
	v2_64k
	v2_chain
	v3_on_v2
	extl2_64k
	extl2_2m
	compressed_64k
	compressed_4k
	compressed_2m
	compressed_extl2
	compressed_overlay
	zero_clusters
	zero_extl2
	corrupt_l1
	corrupt_l2
	corrupt_compressed
	corrupt_writes
	overlap_writes
	lane_meta_reuse
	leaked_refcounts
	many_l2_tables
	refcount_page_cycle
	chain3
	odd_size
	short_table
	refcount64_4k
)
# Long cases (`make check-full`): 2 MiB clusters compressed and with
# subclusters (cluster_2m, compressed_64k/4k and extl2_64k stay), a v2
# chain (v2_64k and v3_on_v2 stay).
DMQ_LONG_CASES=(compressed_2m extl2_2m v2_chain)

dmq_main "$@"
