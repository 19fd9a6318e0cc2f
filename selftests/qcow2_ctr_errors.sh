#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 constructor checks: every table below must be refused with the
# expected "qcow2: <message> (<errno>)" line in dmesg and no device left
# behind; the positive controls must map.
#
# usage: qcow2_ctr_errors.sh [-l] [CASE...]

set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

MIB=$((1 << 20))
SECTORS_16M=$((16 * MIB / 512))

# a plain valid image: v3, 64k clusters, 16 MiB, a little data
mk_valid() {
	local img=$1 opts=${2:-cluster_size=64k}
	dmq_img_create "$img" 16M "$opts"
	dmq_write "$img" t:0:64k r:1M+512:8k
}

# mapped device must exist, be read-only, have the right size, and read
mapped_ok() {
	local name=$1 bytes=$2 dev got
	dev=$(dmq_dev "$name") || dmq_fail "no device node for $name"
	got=$(blockdev --getsize64 "$dev") || dmq_fail "blockdev --getsize64 $dev"
	[ "$got" = "$bytes" ] || dmq_fail "device size $got, expected $bytes"
	[ "$(blockdev --getro "$dev")" = 1 ] || dmq_fail "$dev is not read-only"
	dmq_run dd if="$dev" of=/dev/null bs=64k count=16 iflag=direct status=none
	dmq_remove "$name" || dmq_fail "dmsetup remove failed"
	! dmq_dev_exists "$name" || dmq_fail "device still there after remove"
}

# ------------------------------------------------------ positive controls

case_valid_single() {
	mk_valid a.qcow2
	dmq_create ok a.qcow2 || dmq_fail "valid read-only table refused"
	mapped_ok ok $((16 * MIB))
}

case_valid_chain() {
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 P0x33:64k:4k
	dmq_create ok base.qcow2 top.qcow2 || dmq_fail "valid chain refused"
	mapped_ok ok $((16 * MIB))
}

# table length exactly the top's size; shorter tables are fine too
case_valid_table_lengths() {
	mk_valid a.qcow2
	dmq_create ok --length "$SECTORS_16M" a.qcow2 ||
		dmq_fail "table of exactly the virtual size refused"
	mapped_ok ok $((16 * MIB))
	dmq_create ok --length 8 a.qcow2 || dmq_fail "8-sector table refused"
	mapped_ok ok 4096
}

# 4k clusters, one refcount table cluster: describes exactly 4 GiB
case_valid_refcount_limit() {
	mk_valid a.qcow2 cluster_size=4k
	dmq_patch a.qcow2 refcount_table_clusters=1
	[ "$(dmq_header a.qcow2 refcount_order)" = 4 ] || dmq_fail "refcount_order"
	dmq_run truncate -s 4G a.qcow2
	dmq_create ok a.qcow2 || dmq_fail "4 GiB file with a 4 GiB refcount table refused"
	mapped_ok ok $((16 * MIB))
}

# ------------------------------------------------------------- fd checks

case_no_images() {
	dmq_expect_ctr_error bad "No images given" -EINVAL --length 8
}

case_wrong_fd() {
	dmq_expect_ctr_error bad "Wrong fd" -EBADF --length "$SECTORS_16M" fd:999
}

case_wrong_fd_top() {
	mk_valid base.qcow2
	dmq_expect_ctr_error bad "Wrong fd" -EBADF --length "$SECTORS_16M" \
		base.qcow2 fd:999
}

# the read end of a pipe, O_DIRECT set: readable, O_DIRECT, not regular
case_not_regular_file() {
	dmq_expect_ctr_error bad "Not a regular file" -EINVAL \
		--length "$SECTORS_16M" pipe:
}

case_cached_mode() {
	mk_valid a.qcow2
	dmq_expect_ctr_error bad "Image opened in cached mode, need O_DIRECT" \
		-EINVAL cached:a.qcow2
}

case_cached_mode_base() {
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_expect_ctr_error bad "Image opened in cached mode, need O_DIRECT" \
		-EINVAL cached:base.qcow2 top.qcow2
}

# O_APPEND: every write would land at the end of the file
case_append_mode() {
	mk_valid a.qcow2
	dmq_expect_ctr_error bad "Image opened with O_APPEND" -EINVAL \
		--rw append:a.qcow2
}

case_append_mode_base() {
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_expect_ctr_error bad "Image opened with O_APPEND" -EINVAL \
		roappend:base.qcow2 top.qcow2
}

case_top_not_writable() {
	mk_valid a.qcow2
	dmq_expect_ctr_error bad "Top image is not opened for writing" -EACCES \
		--rw ro:a.qcow2
}

case_not_readable() {
	mk_valid a.qcow2
	dmq_expect_ctr_error bad "Image is not opened for reading" -EACCES \
		wo:a.qcow2
}

case_not_readable_base() {
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_expect_ctr_error bad "Image is not opened for reading" -EACCES \
		wo:base.qcow2 top.qcow2
}

# --------------------------------------------------------- header checks

# patched_error MSG ERRNO FIELD=VAL...: a valid image with the header patched
patched_error() {
	local msg=$1 err=$2
	shift 2
	mk_valid a.qcow2
	dmq_patch a.qcow2 "$@"
	dmq_expect_ctr_error bad "$msg" "$err" --length "$SECTORS_16M" a.qcow2
}

case_bad_magic() {
	patched_error "Bad qcow2 magic" -EINVAL magic=0x514649fa
}

case_bad_magic_raw() {
	dmq_run dd if=/dev/zero of=a.raw bs=1M count=16 status=none
	dmq_expect_ctr_error bad "Bad qcow2 magic" -EINVAL \
		--length "$SECTORS_16M" a.raw
}

case_version_4() {
	patched_error "Unsupported qcow2 version" -EINVAL version=4
}

case_version_1() {
	patched_error "Unsupported qcow2 version" -EINVAL version=1
}

case_cluster_bits_22() {
	patched_error "Bad cluster_bits" -EINVAL cluster_bits=22
}

case_cluster_bits_8() {
	patched_error "Bad cluster_bits" -EINVAL cluster_bits=8
}

case_misaligned_l1() {
	patched_error "Misaligned L1 table" -EINVAL l1_table_offset+=512
}

case_misaligned_refcount_table() {
	patched_error "Misaligned refcount table" -EINVAL \
		refcount_table_offset+=512
}

case_encrypted() {
	patched_error "Encrypted images are not supported" -EOPNOTSUPP \
		crypt_method=1
}

case_corrupt_bit() {
	patched_error "Image is marked corrupt" -EOPNOTSUPP \
		'incompatible_features|=2'
}

case_external_data_file() {
	patched_error "External data files are not supported" -EOPNOTSUPP \
		'incompatible_features|=4'
}

case_zstd() {
	if ! "$QEMU_IMG" create -q -f qcow2 -o cluster_size=64k,compression_type=zstd \
		a.qcow2 16M >/dev/null 2>&1; then
		# qemu-img without zstd: set the type and its feature bit by hand
		dmq_img_create a.qcow2 16M cluster_size=64k
		dmq_patch a.qcow2 compression_type=1 'incompatible_features|=8'
	fi
	[ "$(dmq_header a.qcow2 compression_type)" = 1 ] ||
		dmq_fail "compression_type is not zstd"
	dmq_expect_ctr_error bad "Only zlib compression is supported" \
		-EOPNOTSUPP a.qcow2
}

case_unknown_incompat_bit() {
	patched_error "Unknown incompatible features" -EOPNOTSUPP \
		'incompatible_features|=0x400'
}

case_cluster_512() {
	dmq_img_create a.qcow2 16M cluster_size=512
	dmq_expect_ctr_error bad "Cluster size below PAGE_SIZE" -EOPNOTSUPP \
		a.qcow2
}

case_cluster_2k() {
	dmq_img_create a.qcow2 16M cluster_size=2k
	dmq_expect_ctr_error bad "Cluster size below PAGE_SIZE" -EOPNOTSUPP \
		a.qcow2
}

case_refcount_table_too_small() {
	mk_valid a.qcow2 cluster_size=4k
	dmq_patch a.qcow2 refcount_table_clusters=1
	[ "$(dmq_header a.qcow2 refcount_order)" = 4 ] || dmq_fail "refcount_order"
	# 512 entries * 2048 clusters per refblock * 4 KiB = 4 GiB < 5 GiB
	dmq_run truncate -s 5G a.qcow2
	dmq_expect_ctr_error bad "File larger than its refcount table describes" \
		-EFBIG a.qcow2
}

# ---------------------------------------------------------- chain checks

case_differ_cluster_size() {
	mk_valid base.qcow2 cluster_size=64k
	dmq_img_create top.qcow2 16M cluster_size=4k base.qcow2
	dmq_expect_ctr_error bad "Deltas differ in cluster size" -EXDEV \
		base.qcow2 top.qcow2
}

case_differ_extended_l2() {
	mk_valid base.qcow2 cluster_size=64k,extended_l2=off
	dmq_img_create top.qcow2 16M cluster_size=64k,extended_l2=on base.qcow2
	dmq_expect_ctr_error bad "Deltas differ in extended L2" -EXDEV \
		base.qcow2 top.qcow2
}

case_base_has_backing() {
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_expect_ctr_error bad "Base image has a backing file" -ENOENT \
		top.qcow2
}

case_top_smaller_than_table() {
	mk_valid a.qcow2
	dmq_expect_ctr_error bad "Top image smaller than the table" -EBADSLT \
		--extra-sectors 8 a.qcow2
}

case_lower_delta_larger() {
	dmq_img_create base.qcow2 32M cluster_size=64k
	dmq_write base.qcow2 t:16M:64k
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_expect_ctr_error bad "Lower delta larger than the one above it" \
		-EBADSLT base.qcow2 top.qcow2
}

case_lower_delta_larger_mid() {
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_img_create mid.qcow2 32M cluster_size=64k base.qcow2
	dmq_img_create top.qcow2 24M cluster_size=64k mid.qcow2
	dmq_expect_ctr_error bad "Lower delta larger than the one above it" \
		-EBADSLT base.qcow2 mid.qcow2 top.qcow2
}

# ------------------------------------------------ the same file twice

# One file in two places of the chain would be written as the top while
# read (or merged) as a lower delta: refused whichever way it is named.
case_same_file_twice() {
	mk_valid base.qcow2
	dmq_expect_ctr_error bad "Same image file given twice in the chain" \
		-EINVAL base.qcow2 base.qcow2
}

# the top above itself: a chain that passes every other check
case_same_file_top_twice() {
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_expect_ctr_error bad "Same image file given twice in the chain" \
		-EINVAL --rw base.qcow2 top.qcow2 top.qcow2
}

# another name (a hard link) of the base as the writable top
case_same_file_hard_link() {
	mk_valid base.qcow2
	dmq_img_create mid.qcow2 16M cluster_size=64k base.qcow2
	dmq_run ln base.qcow2 link.qcow2
	dmq_expect_ctr_error bad "Same image file given twice in the chain" \
		-EINVAL --rw base.qcow2 mid.qcow2 link.qcow2
}

# ------------------------------------------------------- writable tables

# mapped_rw_ok NAME BYTES TOP: the device is writable; a 4k O_DIRECT write
# at 1 MiB lands in TOP (read back with qemu-io), which stays consistent
mapped_rw_ok() {
	local name=$1 bytes=$2 top=$3 dev got out
	dev=$(dmq_dev "$name") || dmq_fail "no device node for $name"
	got=$(blockdev --getsize64 "$dev") || dmq_fail "blockdev --getsize64 $dev"
	[ "$got" = "$bytes" ] || dmq_fail "device size $got, expected $bytes"
	got=$(blockdev --getro "$dev") || dmq_fail "blockdev --getro $dev"
	[ "$got" = 0 ] || dmq_fail "$dev is read-only (getro=$got)"
	"$PYTHON" -c 'import sys; sys.stdout.buffer.write(b"\x6b" * 4096)' >w.bin ||
		dmq_fail "python"
	dmq_run dd if=w.bin of="$dev" bs=4k seek=256 count=1 oflag=direct \
		conv=notrunc,fsync status=none
	dmq_remove "$name" || dmq_fail "dmsetup remove failed"
	! dmq_dev_exists "$name" || dmq_fail "device still there after remove"
	dmq_check_images "$top"
	out=$("$QEMU_IO" -f qcow2 -c "read -q -P 0x6b 1M 4k" "$top" 2>&1) ||
		{ printf '%s\n' "$out"; dmq_fail "qemu-io read of $top failed"; }
	[ -z "$out" ] || { printf '%s\n' "$out"; dmq_fail "$top: the write is not there"; }
}

case_writable_single() {
	mk_valid a.qcow2
	dmq_create ok --rw a.qcow2 || dmq_fail "valid writable table refused"
	mapped_rw_ok ok $((16 * MIB)) a.qcow2
}

case_writable_chain() {
	local sum
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	sum=$(sha256sum <base.qcow2)
	dmq_create ok --rw base.qcow2 top.qcow2 ||
		dmq_fail "valid writable chain refused"
	mapped_rw_ok ok $((16 * MIB)) top.qcow2
	[ "$(sha256sum <base.qcow2)" = "$sum" ] || dmq_fail "base.qcow2 changed"
	dmq_check_images base.qcow2
}

# internal snapshots in the top: refused for writing, fine read-only
case_writable_snapshot_cow() {
	local dev out
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 P0x33:64k:4k
	dmq_run "$QEMU_IMG" snapshot -c s1 top.qcow2
	[ "$(dmq_header top.qcow2 nb_snapshots)" = 1 ] || dmq_fail "no snapshot in top.qcow2"
	dmq_run "$QEMU_IMG" convert -O raw -l snapshot.name=s1 top.qcow2 snap0.raw
	dmq_create ok --rw base.qcow2 top.qcow2 ||
		dmq_fail "writable table of a top with snapshots refused"
	dev=$(dmq_dev ok) || dmq_fail "no device node"
	# Overwrite the cluster the snapshot shares (data COW) and a fresh one.
	"$PYTHON" -c 'import sys; sys.stdout.buffer.write(b"\x6b" * 4096)' >w.bin || dmq_fail "python"
	dmq_run dd if=w.bin of="$dev" bs=4k seek=16 count=1 oflag=direct conv=notrunc,fsync status=none
	dmq_run dd if=w.bin of="$dev" bs=4k seek=256 count=1 oflag=direct conv=notrunc,fsync status=none
	dmq_remove ok || dmq_fail "dmsetup remove failed"
	dmq_check_images top.qcow2
	for off in 64k 1M; do
		out=$("$QEMU_IO" -f qcow2 -c "read -q -P 0x6b $off 4k" top.qcow2 2>&1) ||
			{ printf '%s\n' "$out"; dmq_fail "qemu-io read of top.qcow2 failed"; }
		[ -z "$out" ] || { printf '%s\n' "$out"; dmq_fail "the write at $off is not there"; }
	done
	dmq_run "$QEMU_IMG" convert -O raw -l snapshot.name=s1 top.qcow2 snap1.raw
	cmp snap0.raw snap1.raw || dmq_fail "the snapshot changed"
}

# only the top matters: a lower delta with internal snapshots is fine
case_writable_snapshot_base() {
	mk_valid base.qcow2
	dmq_run "$QEMU_IMG" snapshot -c s1 base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_create ok --rw base.qcow2 top.qcow2 ||
		dmq_fail "writable table over a base with snapshots refused"
	mapped_rw_ok ok $((16 * MIB)) top.qcow2
}

DMQ_CASES=(
	valid_single
	valid_chain
	valid_table_lengths
	valid_refcount_limit
	no_images
	wrong_fd
	wrong_fd_top
	not_regular_file
	cached_mode
	cached_mode_base
	append_mode
	append_mode_base
	top_not_writable
	not_readable
	not_readable_base
	bad_magic
	bad_magic_raw
	version_4
	version_1
	cluster_bits_22
	cluster_bits_8
	misaligned_l1
	misaligned_refcount_table
	encrypted
	corrupt_bit
	external_data_file
	zstd
	unknown_incompat_bit
	cluster_512
	cluster_2k
	refcount_table_too_small
	differ_cluster_size
	differ_extended_l2
	base_has_backing
	top_smaller_than_table
	lower_delta_larger
	lower_delta_larger_mid
	same_file_twice
	same_file_top_twice
	same_file_hard_link
	writable_single
	writable_chain
	writable_snapshot_cow
	writable_snapshot_base
)

dmq_main "$@"
