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
	local img=$1 opts=${2:-cluster_size=64k} t
	# made once per run and options, then copied: qemu-img and qemu-io
	# cost seconds a case under TCG
	t=$DMQ_SCRATCH/valid-${opts//[^a-zA-Z0-9]/_}.qcow2
	if [ ! -f "$t" ]; then
		dmq_img_create "$t.new" 16M "$opts"
		dmq_write "$t.new" t:0:64k r:1M+512:8k
		mv "$t.new" "$t"
	fi
	cp --sparse=always "$t" "$img" || dmq_fail "cp $t $img"
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
	dmq_dev_absent "$name" || dmq_fail "device still there after remove"
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

# A crash while the refcount table moved leaves the file longer than the
# table describes, by the new refcount block and table, rounded up to the
# file's 128 MiB growth step: accepted (QEMU opens such a file too; the C
# target refuses it), writable, and the suspend's trim cuts it back. A
# longer file is refused (refcount_table_too_small).
case_refcount_table_move_crash() {
	local dev
	mk_valid a.qcow2 cluster_size=4k
	dmq_patch a.qcow2 refcount_table_clusters=1
	convert a.qcow2 exp.raw
	# 512 entries * 2048 clusters per refblock * 4 KiB = 4 GiB, + 100 MiB
	dmq_run truncate -s 4196M a.qcow2
	dmq_create ok a.qcow2 || dmq_fail "a file a table move left was refused"
	mapped_ok ok $((16 * MIB))
	dmq_create v --rw a.qcow2 >/dev/null || dmq_fail "writable table refused"
	dev=$(dmq_dev v) || dmq_fail "no device node"
	random w.bin 64k
	dmq_run dd if=w.bin of="$dev" bs=64k seek=100 count=1 oflag=direct conv=notrunc,fsync status=none
	dmq_run dd if=w.bin of=exp.raw bs=64k seek=100 count=1 conv=notrunc status=none
	dmq_remove v || dmq_fail "dmsetup remove failed"
	if dmq_trims_on_suspend; then
		[ "$(stat -c %s a.qcow2)" -lt $((4096 * MIB)) ] ||
			dmq_fail "the suspend did not trim the file: $(stat -c %s a.qcow2) bytes"
	fi
	dmq_check_images a.qcow2
	convert a.qcow2 got.raw
	cmp exp.raw got.raw || dmq_fail "qemu-img convert differs from what was written"
	echo "4 GiB + 100 MiB accepted, written, trimmed; QEMU reads the write"
}

# ------------------------------------------------------------- fd checks

case_no_images() {
	dmq_expect_ctr_error bad "No images given" -EINVAL --length 8
}

# a number that is no open descriptor: -ENOENT, as the C target
case_wrong_fd() {
	dmq_expect_ctr_error bad "Error attaching file" -ENOENT \
		--length "$SECTORS_16M" fd:999
}

case_wrong_fd_top() {
	mk_valid base.qcow2
	dmq_expect_ctr_error bad "Error attaching file" -ENOENT \
		--length "$SECTORS_16M" base.qcow2 fd:999
}

# not a number at all: -EINVAL "Wrong fd"
case_fd_not_a_number() {
	dmq_expect_ctr_error bad "Wrong fd" -EINVAL --length "$SECTORS_16M" fd:3x
	dmq_expect_ctr_error bad "Wrong fd" -EINVAL --length "$SECTORS_16M" fd:-1
}

# the read end of a pipe, O_DIRECT set: readable, O_DIRECT, not regular
case_not_regular_file() {
	dmq_expect_ctr_error bad "Not a regular file" -EINVAL \
		--length "$SECTORS_16M" pipe:
}

# Descriptors without O_DIRECT work, as with the C target (the vendor's
# helper script opens images with a plain `exec {fd}<>`): the target sets
# IOCB_DIRECT on every request itself. Data written through the page cache
# just before (qemu-io without -t none) reads back; a write through the
# device is what qemu-img then sees.
case_cached_mode() {
	local dev
	mk_valid a.qcow2
	dmq_write a.qcow2 P0x5c:2M:64k
	dmq_run "$QEMU_IMG" convert -O raw a.qcow2 want.raw
	dmq_create ok cached:a.qcow2 || dmq_fail "descriptor without O_DIRECT refused"
	dev=$(dmq_dev ok) || dmq_fail "no device node"
	dmq_run cmp "$dev" want.raw
	dmq_remove ok || dmq_fail "dmsetup remove failed"
}

case_cached_mode_base() {
	local dev
	mk_valid base.qcow2
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_run "$QEMU_IMG" convert -O raw top.qcow2 want.raw
	dmq_create ok --rw cached:base.qcow2 cachedrw:top.qcow2 ||
		dmq_fail "descriptors without O_DIRECT refused"
	dev=$(dmq_dev ok) || dmq_fail "no device node"
	dmq_run cmp "$dev" want.raw
	dmq_run dd if=/dev/urandom of=w.bin bs=64k count=1 status=none
	dmq_run dd if=w.bin of="$dev" bs=64k seek=3 oflag=direct conv=fsync status=none
	dmq_run dd if=w.bin of=want.raw bs=64k seek=3 conv=notrunc status=none
	dmq_remove ok || dmq_fail "dmsetup remove failed"
	dmq_check_images top.qcow2 base.qcow2
	dmq_run "$QEMU_IMG" compare -f qcow2 -F raw top.qcow2 want.raw
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

# dm core refuses a qcow2 target that does not start at sector 0 before
# its constructor runs ("Gap in table"): the constructor's own "Target
# must start at sector 0" check is a second line of defence.
case_start_not_zero() {
	mk_valid a.qcow2
	dmq_expect_ctr_error bad "Gap in table" -EINVAL \
		--start 8 --length $((SECTORS_16M - 8)) a.qcow2
}

# an empty file: nothing to read at sector 0
case_header_empty() {
	: >a.qcow2
	dmq_expect_ctr_error bad "Image header truncated" -EINVAL \
		--length "$SECTORS_16M" a.qcow2
}

# a v3 header cut at 100 bytes (the v2 part is there, v3 needs 104)
case_header_truncated_v3() {
	mk_valid full.qcow2
	[ "$(dmq_header full.qcow2 version)" = 3 ] || dmq_fail "not a v3 image"
	dmq_run dd if=full.qcow2 of=a.qcow2 bs=100 count=1 status=none
	dmq_expect_ctr_error bad "Image header truncated" -EINVAL \
		--length "$SECTORS_16M" a.qcow2
}

# v3 header_length below 104, not a multiple of 8, above the cluster size
case_header_length_short() {
	patched_error "Bad header length" -EINVAL header_length=100
}

case_header_length_unaligned() {
	patched_error "Bad header length" -EINVAL header_length=108
}

case_header_length_over_cluster() {
	patched_error "Bad header length" -EINVAL header_length=$((64 * 1024 + 8))
}

# 16 MiB need one L1 entry with 64k clusters
case_l1_too_small() {
	patched_error "L1 table too small for virtual size" -EINVAL l1_size=0
}

# 32 MiB of L1 entries at most (4 Mi entries)
case_l1_too_large() {
	patched_error "L1 table too large" -EINVAL l1_size=$((4 * 1024 * 1024 + 1))
}

case_refcount_order_7() {
	patched_error "Bad refcount order" -EINVAL refcount_order=7
}

# the refcount table may take 8 MiB at most (128 clusters of 64k)
case_refcount_table_too_large() {
	patched_error "Refcount table too large" -EINVAL \
		refcount_table_clusters=129
}

# a backing file name longer than 1023 bytes
case_bad_backing_name() {
	patched_error "Bad backing file name" -EINVAL \
		backing_file_offset=0x200 backing_file_size=1024
}

# extended L2 with 8k clusters: 256-byte subclusters (qemu-img makes
# extended L2 with 16k clusters at least: shrink one, with the 4 L1
# entries 8k clusters need for 16 MiB)
case_subcluster_size() {
	dmq_img_create a.qcow2 16M cluster_size=16k,extended_l2=on
	dmq_patch a.qcow2 cluster_bits=13 l1_size=4
	dmq_expect_ctr_error bad "Unsupported subcluster size" -EINVAL a.qcow2
}

# Lazy refcounts left dirty may be stale: refused for writing, fine for
# reading
case_dirty_lazy_refcounts() {
	mk_valid a.qcow2 cluster_size=64k,lazy_refcounts=on
	[ $(($(dmq_header a.qcow2 compatible_features) & 1)) = 1 ] ||
		dmq_fail "lazy_refcounts bit not set"
	dmq_patch a.qcow2 'incompatible_features|=1'
	dmq_expect_ctr_error bad \
		"Image is dirty: repair it with qemu-img check -r all" -EINVAL \
		--rw a.qcow2
	dmq_create ok a.qcow2 || dmq_fail "dirty image refused read-only"
	mapped_ok ok $((16 * MIB))
}

# -------------------------------------------- a file system of the case's own

# own_fs SECTOR: ext4 (4k blocks) on a dm-linear device over a loop device
# with SECTOR-byte logical blocks, mounted on ./mnt; removed when the case
# ends. own_fs_break makes parts of it unreadable.
OWN_LOOP=
OWN_SECTORS=0
own_fs_cleanup() {
	mountpoint -q mnt && umount mnt
	dmq_dev_exists lin && "$DMSETUP" remove --retry "$(dmq_full_name lin)"
	[ -n "$OWN_LOOP" ] && losetup -d "$OWN_LOOP"
}

own_fs() {
	local dev
	dmq_needs_kernel "a loop device and dm-linear/dm-error"
	dmq_run truncate -s 64M own.disk
	OWN_LOOP=$(losetup -f --show --sector-size "$1" own.disk) ||
		dmq_fail "losetup --sector-size $1 failed"
	trap own_fs_cleanup EXIT
	OWN_SECTORS=$(blockdev --getsz "$OWN_LOOP") || dmq_fail "blockdev $OWN_LOOP"
	dmq_run "$DMSETUP" create "$(dmq_full_name lin)" \
		--table "0 $OWN_SECTORS linear $OWN_LOOP 0"
	dev=$(dmq_dev lin) || dmq_fail "no device node for the linear device"
	dmq_run mkfs.ext4 -q -b 4096 "$dev"
	mkdir mnt && dmq_run mount -o noatime "$dev" mnt
}

# own_fs_break FILE OFF LEN: the device sectors under FILE's bytes
# [OFF, OFF + LEN) fail every I/O (a dm-error segment in the linear table)
own_fs_break() {
	local p s n
	p=$(dmq_py dmq_img phys "$1" "$2") ||
		dmq_fail "no extent under byte $2 of $1"
	s=$((p / 512))
	n=$(($3 / 512))
	printf '0 %d linear %s 0\n%d %d error\n%d %d linear %s %d\n' \
		"$s" "$OWN_LOOP" "$s" "$n" $((s + n)) $((OWN_SECTORS - s - n)) \
		"$OWN_LOOP" $((s + n)) >err.table
	dmq_run "$DMSETUP" reload "$(dmq_full_name lin)" err.table
	dmq_run "$DMSETUP" resume "$(dmq_full_name lin)"
	echo "sectors $s+$n under $1 bytes $2+$3 now fail"
}

# own_fs_heal: the linear table whole again (every sector reads)
own_fs_heal() {
	dmq_run "$DMSETUP" reload "$(dmq_full_name lin)" \
		--table "0 $OWN_SECTORS linear $OWN_LOOP 0"
	dmq_run "$DMSETUP" resume "$(dmq_full_name lin)"
	echo "every sector reads again"
}

# eio_setup KIND WHERE: ./mnt/a.qcow2 (16M, 64k clusters, 0..4M random
# data; its chain in before.raw) mapped writable as v (EIO_DEV), read once
# whole (the fast path knows every cluster), then the host's sectors under
# the metadata entry KIND WHERE's cluster (dmq_img entry) fail
EIO_DEV=
eio_setup() {
	local out off
	own_fs 512
	dmq_img_create mnt/a.qcow2 16M cluster_size=64k
	dmq_write mnt/a.qcow2 r:0:4M
	convert mnt/a.qcow2 before.raw
	out=$(dmq_py dmq_img entry mnt/a.qcow2 "$1" "$2") || dmq_fail "no $1 entry $2"
	off=$((${out#* } & 0xfffffffffe00))
	[ "$off" -gt 0 ] || dmq_fail "$1 entry $2 points nowhere"
	dmq_create v --rw mnt/a.qcow2 >/dev/null || dmq_fail "writable table refused"
	EIO_DEV=$(dmq_dev v) || dmq_fail "no device node"
	dmq_run dd if="$EIO_DEV" of=/dev/null bs=1M iflag=direct status=none
	own_fs_break mnt/a.qcow2 "$off" 65536
}

# eio_errors EXPECTED: get_errors of v is EXPECTED (three words)
eio_errors() {
	local out
	out=$("$DMSETUP" message "$(dmq_full_name v)" 0 get_errors) || dmq_fail "get_errors"
	echo "get_errors: ${out//$'\n'/ }"
	[ "${out//$'\n'/ }" = "$1" ] || dmq_fail "get_errors: expected $1"
}

# eio_dump CLUSTER...: the 64k clusters CLUSTER... of before.raw take
# w.bin; the device (in dev.raw) equals it
eio_dump() {
	local c
	for c in "$@"; do
		dmq_run dd if=w.bin of=before.raw bs=64k seek="$c" count=1 conv=notrunc status=none
	done
	dump "$EIO_DEV" dev.raw
	same before.raw dev.raw "the device after the errors"
}

# eio_finish: v removed, the image checks clean and QEMU reads dev.raw
eio_finish() {
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images mnt/a.qcow2
	convert mnt/a.qcow2 top.raw
	same dev.raw top.raw "qemu-img convert differs from the device"
	echo "qemu-img check clean; QEMU reads what the device did"
}

# The host's device fails the sectors under one data cluster of a live
# writable table (not the target's fault injection, which turns the fast
# path off: here the error comes up through ext4's direct I/O, on the fast
# path and on the locked one). Reads and writes of that cluster fail with
# EIO, the rest of the device works; nothing marks the image as needing a
# check (its metadata is fine); once the sectors read again the cluster
# holds its old data; then QEMU reads what the device did
case_host_eio() {
	local dev f0 f1
	eio_setup l2 1M
	dev=$EIO_DEV
	f0=$(fast_bios_of v)
	dmq_run dmq_py dmq_img badread "$dev" before.raw --bad 1M:64k
	f1=$(fast_bios_of v)
	echo "reads: only guest 1M+64k failed (fast_bios $f0 -> $f1)"
	[ "$f1" -gt "$f0" ] || dmq_fail "the reads did not take the fast path"
	random w.bin 64k
	dd if=w.bin of="$dev" bs=64k seek=16 count=1 oflag=direct conv=notrunc \
		status=none 2>/dev/null && dmq_fail "a write in place over failing sectors worked"
	dd if=w.bin of="$dev" bs=64k seek=16 count=1 oflag=direct,dsync \
		conv=notrunc status=none 2>/dev/null && dmq_fail "a FUA write over failing sectors worked"
	echo "writes into the failing cluster: EIO (plain and FUA)"
	# elsewhere: in place, a new cluster, a flush
	dmq_run dd if=w.bin of="$dev" bs=64k seek=32 count=1 oflag=direct conv=notrunc,fsync status=none
	dmq_run dd if=w.bin of="$dev" bs=64k seek=160 count=1 oflag=direct conv=notrunc,fsync status=none
	eio_errors "wants_check=0 md_writeback_error=0 truncate_error=0"
	own_fs_heal
	dmq_run dd if="$dev" of=got.bin bs=64k skip=16 count=1 iflag=direct status=none
	dmq_run dd if=before.raw of=old.bin bs=64k skip=16 count=1 status=none
	cmp got.bin old.bin || dmq_fail "the cluster at 1M changed"
	echo "the cluster at 1M holds its old data again"
	eio_dump 32 160
	eio_finish
}

# The host's device fails the sectors of the image's L2 table while a
# writable table runs: a first write (it updates the table) still
# completes, but the flush after it fails with EIO (the commit cannot write
# the table), md_writeback_error and wants_check are set; once the sectors
# work again the next flush commits what stayed dirty, and QEMU reads the
# write. The table may not run again (resume: EIO) before a check
case_host_eio_metadata() {
	local dev
	eio_setup l1 0
	dev=$EIO_DEV
	random w.bin 64k
	dmq_run dd if=w.bin of="$dev" bs=64k seek=128 count=1 oflag=direct conv=notrunc status=none
	dd if=w.bin of="$dev" bs=64k seek=129 count=1 oflag=direct conv=notrunc,fsync \
		status=none 2>/dev/null && dmq_fail "a flush worked while the L2 table could not be written"
	echo "the flush after first writes: EIO"
	eio_errors "wants_check=1 md_writeback_error=1 truncate_error=0"
	expect_bytes_of "$dev" $((8 * MIB)) w.bin
	own_fs_heal
	dmq_run dd if=w.bin of="$dev" bs=64k seek=130 count=1 oflag=direct conv=notrunc,fsync status=none
	echo "the sectors read again: the next flush commits"
	eio_dump 128 129 130
	dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
	"$DMSETUP" resume "$(dmq_full_name v)" 2>resume.err &&
		dmq_fail "resume worked with wants_check=1"
	echo "wants_check=1: resume refused ($(tr '\n' ' ' <resume.err))"
	dmq_dmesg_case | grep -F "image 0: metadata commit failed: EIO" ||
		dmq_fail "no dmesg line for the failed commit"
	eio_finish
}

# expect_bytes_of DEV OFF FILE: DEV holds FILE at OFF (O_DIRECT)
expect_bytes_of() {
	local n
	n=$(stat -c %s "$3")
	dmq_run dd if="$1" of=got.bin bs="$n" skip=$(($2 / n)) count=1 iflag=direct status=none
	cmp got.bin "$3" || dmq_fail "$1 at $2 does not hold $3"
}

# fast_bios_of NAME: the fast path's count in `dmsetup status` of NAME
fast_bios_of() {
	"$DMSETUP" status "$(dmq_full_name "$1")" | sed -n 's/.* fast_bios=\([0-9]*\).*/\1/p'
}

# the header's sector cannot be read
case_header_unreadable() {
	own_fs 512
	mk_valid mnt/a.qcow2
	own_fs_break mnt/a.qcow2 0 4096
	dmq_expect_ctr_error bad "Cannot read image header" -EIO \
		--length "$SECTORS_16M" mnt/a.qcow2
}

# the header reads, the L1 table does not
case_metadata_unreadable() {
	local l1
	own_fs 512
	mk_valid mnt/a.qcow2
	l1=$(dmq_header mnt/a.qcow2 l1_table_offset) || dmq_fail "header"
	own_fs_break mnt/a.qcow2 "$l1" 4096
	dmq_expect_ctr_error bad "Cannot read image metadata" -EIO \
		--length "$SECTORS_16M" mnt/a.qcow2
}

# O_DIRECT cannot address 2k subclusters (extended L2, 64k clusters) on
# a device with 4k logical blocks; 4k subclusters (128k clusters) are fine
case_subclusters_below_block() {
	own_fs 4096
	mk_valid mnt/a.qcow2 cluster_size=64k,extended_l2=on
	dmq_expect_ctr_error bad \
		"Subclusters smaller than the host's logical block size" \
		-EOPNOTSUPP mnt/a.qcow2
	mk_valid mnt/b.qcow2 cluster_size=128k,extended_l2=on
	dmq_create ok mnt/b.qcow2 ||
		dmq_fail "4k subclusters on 4k logical blocks refused"
	mapped_ok ok $((16 * MIB))
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
	dmq_dev_absent "$name" || dmq_fail "device still there after remove"
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

# Metadata whose refcount says free would be handed out by the allocator and
# overwritten (QEMU guards against this with its overlap checks): a writable
# table over such an image is refused with -EUCLEAN and a line naming the
# structure; read-only it still maps (nothing is allocated).
md_refcount0_case() {
	local what=$1 off out
	dmq_needs_kernel "the target's refcount checks"
	mk_valid a.qcow2 cluster_size=64k,refcount_bits=64
	case $what in
	"L2 table") out=$(dmq_py dmq_img entry a.qcow2 l1 0) ;;
	"L1 table") out="- $(dmq_header a.qcow2 l1_table_offset)" ;;
	"refcount block") out=$(dmq_py dmq_img entry a.qcow2 reft 0) ;;
	esac || dmq_fail "reading a.qcow2"
	off=$((${out#* } & 0xfffffffffe00))
	[ "$off" -gt 0 ] || dmq_fail "no $what in a.qcow2"
	dmq_run dmq_py dmq_img entry a.qcow2 refb $((off / 65536)) = 0
	dmq_expect_ctr_error bad \
		"Metadata cluster with refcount 0: repair with qemu-img check -r all" \
		-EUCLEAN --rw a.qcow2
	dmq_dmesg_case | grep -F "image 0: $what at $(printf '%#x' "$off") has refcount 0" ||
		dmq_fail "no dmesg line naming the $what at $(printf '%#x' "$off")"
	dmq_create ok a.qcow2 || dmq_fail "read-only table refused"
	mapped_ok ok $((16 * MIB))
}

case_l2_refcount0() { md_refcount0_case "L2 table"; }
case_l1_refcount0() { md_refcount0_case "L1 table"; }
case_refblock_refcount0() { md_refcount0_case "refcount block"; }

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
	fd_not_a_number
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
	refcount_table_move_crash
	start_not_zero
	header_empty
	header_truncated_v3
	header_length_short
	header_length_unaligned
	header_length_over_cluster
	l1_too_small
	l1_too_large
	refcount_order_7
	refcount_table_too_large
	bad_backing_name
	subcluster_size
	dirty_lazy_refcounts
	header_unreadable
	metadata_unreadable
	host_eio
	host_eio_metadata
	subclusters_below_block
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
	l2_refcount0
	l1_refcount0
	refblock_refcount0
	writable_chain
	writable_snapshot_cow
	writable_snapshot_base
)

# Cases whose kernel log has the target's error lines (expected there)
DMQ_FAULT_CASES="host_eio_metadata"
dmq_main "$@"
