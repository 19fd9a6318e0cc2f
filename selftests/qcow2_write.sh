#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 write path: build a base with qemu-img/qemu-io (text, random,
# pattern, compressed and zero ranges) under an empty overlay (or use a
# single image), map it writable and run fio random writes of 512 B to
# 192 KiB with crc32c verify, two jobs on the two halves of the device.
# Then read the whole device, remove it and check that:
#   - `qemu-img check` of the top finds no errors and no leaks;
#   - `qemu-img convert -O raw` of the top equals what the device returned;
#   - outside the ranges fio wrote (its write_iolog), the device still
#     returns what the chain held before (copy-on-write padding);
#   - the lower images are byte-for-byte unchanged and check clean.
# Plus in-place overwrites, buffered I/O, fsync/O_SYNC (FLUSH/FUA) and an
# ext4 file system written, then mounted read-only from a new table.
#
# usage: qcow2_write.sh [-l] [CASE...]
# DMQ_FIO_IO=SIZE overrides the bytes each fio job writes (default 10M).

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

FIO=${FIO:-fio}
DEV_SIZE=32M			# virtual size of the images the cases write
FIO_IO=${DMQ_FIO_IO:-10M}	# written by each of the two fio jobs
MINBS=${DMQ_SCRATCH_SECTOR:-512}	# smallest fio write: the scratch device's logical block
FIO_SEED=1			# --randseed of the first job (cases change it)
DEV=				# the mapped device (map_rw)

# base_specs CLUSTER: dmq_write specs for a DEV_SIZE base: aligned and
# unaligned text/random/pattern ranges, compressed clusters (ct/cr), zeroes
# over data (qemu-io write -z: zero clusters where aligned), a range across
# the middle of the device (where the second fio job starts), data at the end
base_specs() {
	local cs c1 c2
	cs=$(dmq_size "$1")
	c1=$((cs > 65536 ? cs : 65536))
	c2=$((2 * c1))
	echo "t:0:1M r:1M+512:300k P0x5a:3M+3k:5k ct:4M:$c2 r:8M:3M z:9M:1M" \
		"z:10M+4k:8k t:12M+100:1M r:16M-2k:4k cr:20M:$c1 t:24M+7:3M" \
		"P0xa5:30M:2M"
}

# mk_base IMG OPTS CLUSTER: DEV_SIZE image with the base_specs data
mk_base() {
	dmq_img_create "$1" "$DEV_SIZE" "$2"
	# shellcheck disable=SC2046	# the specs are words
	dmq_write "$1" $(base_specs "$3")
}

# map_rw SPEC...: writable table "v" (base first); its node in DEV
map_rw() {
	dmq_create v --rw "$@" || dmq_fail "dmsetup create --rw failed for $*"
	DEV=$(dmq_dev v) || dmq_fail "no device node"
	[ "$(blockdev --getro "$DEV")" = 0 ] || dmq_fail "$DEV is read-only"
}

# fio_write DEV [fio options]: two randwrite jobs with crc32c verify, one
# per half of DEV (most of each half, FIO_IO bytes each; fio's random map
# keeps a job's writes from overlapping). write_iolog goes to j0/j1.iolog.
fio_write() {
	local dev=$1 half size rc bad
	shift
	half=$(($(blockdev --getsize64 "$dev") / 2))
	size=$((half - half / 16))
	local args=(--output=fio.log --filename="$dev" --direct=1
		--ioengine=libaio --rw=randwrite --bsrange="$MINBS"-192k --iodepth=8
		--size="$size" --io_size="$FIO_IO" --verify=crc32c
		--verify_fatal=1 --randrepeat=1 "$@"
		--name=j0 --offset=0 --randseed="$FIO_SEED" --write_iolog=j0.iolog
		--name=j1 --offset="$half" --randseed=$((FIO_SEED + 1000))
		--write_iolog=j1.iolog)
	rm -f j0.iolog j1.iolog
	echo "+ $FIO ${args[*]}"
	"$FIO" "${args[@]}"
	rc=$?
	bad=$(grep -Ei 'verify|bad magic|bad header|crc32c|err= *[1-9]|error' fio.log)
	if [ "$rc" -ne 0 ] || [ -n "$bad" ]; then
		cat fio.log
		dmq_fail "fio failed (rc=$rc)"
	fi
	case " $* " in
	*" --verify_only "*) ;;
	*) grep -q 'write: IOPS=' fio.log ||
		{ cat fio.log; dmq_fail "fio did not write"; } ;;
	esac
	grep -q 'read: IOPS=' fio.log || { cat fio.log; dmq_fail "fio did not verify"; }
	grep -E '^ *(write|read): IOPS' fio.log | sed 's/^ */fio: /'
}


# lower_sums IMG...: remember the lower images' sha256 (lower.sha256)
lower_sums() {
	sha256sum "$@" >lower.sha256 || dmq_fail "sha256sum $*"
}

# check_lower: lower images unchanged and clean
check_lower() {
	local imgs
	[ -s lower.sha256 ] || return 0
	sha256sum -c --quiet lower.sha256 || dmq_fail "a lower image changed"
	imgs=$(awk '{print $2}' lower.sha256)
	# shellcheck disable=SC2086
	dmq_check_images $imgs
	echo "lower images unchanged: ${imgs//$'\n'/ }"
}

# check_top TOP: no errors, no leaks
check_top() {
	local out rc
	out=$("$QEMU_IMG" check -f qcow2 "$1" 2>&1)
	rc=$?
	if [ "$rc" -ne 0 ]; then
		printf '%s\n' "$out"
		dmq_fail "qemu-img check $1: rc=$rc (2: corruptions, 3: leaks)"
	fi
	printf '%s\n' "$out" | grep -E 'allocated|No errors' | sed "s|^|$1: |"
}

# finish DEV TOP BEFORE: read DEV, remove it, check TOP against the data
# and BEFORE (the chain's content before the writes) outside fio's writes
finish() {
	local dev=$1 top=$2 before=$3
	dmq_run dd if="$dev" of=dev.raw bs=1M iflag=direct status=none
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top "$top"
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw "$top" top.raw
	if ! cmp dev.raw top.raw; then
		cmp -l dev.raw top.raw | head -n 8
		echo "cmp -l: $(cmp -l dev.raw top.raw | wc -l) bytes differ"
		dmq_fail "qemu-img convert of $top differs from the device's data"
	fi
	check_unwritten "$before" dev.raw j0.iolog j1.iolog ||
		dmq_fail "data outside fio's writes changed"
	check_lower
	rm -f top.raw
}

# write_case OPTS CLUSTER chain|single [fio options]: base_specs data in
# base.qcow2 under an empty top.qcow2 (chain), or in a.qcow2 alone (single)
write_case() {
	local opts=$1 cluster=$2 kind=$3 imgs
	shift 3
	need "$FIO"
	if [ "$kind" = chain ]; then
		mk_base base.qcow2 "$opts" "$cluster"
		dmq_img_create top.qcow2 "$DEV_SIZE" "$opts" base.qcow2
		dmq_check_images base.qcow2
		lower_sums base.qcow2
		imgs=(base.qcow2 top.qcow2)
	else
		mk_base a.qcow2 "$opts" "$cluster"
		: >lower.sha256
		imgs=(a.qcow2)
	fi
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw "${imgs[-1]}" before.raw
	map_rw "${imgs[@]}"
	[ -z "${TAIL_READER:-}" ] || tail_reader_start "$DEV" before.raw
	fio_write "$DEV" "$@"
	[ -z "${TAIL_READER:-}" ] || tail_reader_stop
	finish "$DEV" "${imgs[-1]}" before.raw
}

# tail_reader_start DEV BEFORE: in the background until tail_reader_stop,
# random O_DIRECT reads of 4 KiB from the part of each half fio_write never
# writes (its last 16th), each compared with BEFORE there. Returns once the
# first read matched; a case that fails meanwhile stops it on exit.
tail_reader_start() {
	READER_STOP=$PWD/reader.stop
	rm -f "$READER_STOP" reader.started reader.log
	"$PYTHON" - "$@" "$READER_STOP" >reader.log 2>&1 <<-'EOF' &
	import mmap, os, random, sys
	dev, before, stop = sys.argv[1], open(sys.argv[2], "rb"), sys.argv[3]
	half = os.path.getsize(sys.argv[2]) // 2
	spans = [(h + half - half // 16, half // 16) for h in (0, half)]
	fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
	buf = mmap.mmap(-1, 4096)
	rnd, n = random.Random(5), 0
	while n == 0 or not os.path.exists(stop):
	    start, ln = rnd.choice(spans)
	    off = start + rnd.randrange(ln // 4096) * 4096
	    if os.preadv(fd, [buf], off) != 4096:
	        sys.exit("short read at %#x" % off)
	    before.seek(off)
	    if buf[:] != before.read(4096):
	        sys.exit("read at %#x differs from the chain's data" % off)
	    n += 1
	    if n == 1:
	        open("reader.started", "w").close()
	print("reader: %d reads of 4 KiB matched the chain's data" % n)
	EOF
	READER_PID=$!
	trap 'touch "$READER_STOP"; wait "$READER_PID"' EXIT
	local i
	for i in $(seq 100); do
		[ -e reader.started ] && return 0
		kill -0 "$READER_PID" 2>/dev/null || break
		sleep 0.1
	done
	cat reader.log
	dmq_fail "the reader did not start"
}

tail_reader_stop() {
	touch "$READER_STOP"
	wait "$READER_PID" || { cat reader.log; dmq_fail "the reader failed"; }
	trap - EXIT
	cat reader.log
}

# --------------------------------------------------------- configurations

# cow_gang: 4 KiB random writes at iodepth 32 into an empty top over a
# written base of 64 KiB clusters: most land in clusters the top does not
# own yet, several per worker batch, so their copy-on-write fills run
# together (drivers/io/cow.rs); the usual checks (bytes outside fio's
# writes are the base's, qemu-img reads what the device did, check clean).
case_cow_gang() {
	FIO_SEED=83
	write_case cluster_size=64k 64k chain --bsrange=4k-4k --iodepth=32
}

# cow_gang_reads: cow_gang with 4 KiB reads of clusters fio never writes
# (each half's last 16th, from the base) going on at the same time: reads
# of other clusters leave a gang be, so its fills still gather between
# them; each read's bytes are compared with the chain's.
case_cow_gang_reads() {
	FIO_SEED=85
	TAIL_READER=1 write_case cluster_size=64k 64k chain --bsrange=4k-4k --iodepth=32
}

# numjobs: one fio job section cloned into 4 processes (numjobs=4), each on
# its own quarter of the device (offset_increment), iodepth 16, with crc32c
# verify; then the usual checks but for the iolog-based one.
case_numjobs() {
	local q rc
	need "$FIO"
	mk_base base.qcow2 cluster_size=64k 64k
	dmq_img_create top.qcow2 "$DEV_SIZE" cluster_size=64k base.qcow2
	lower_sums base.qcow2
	map_rw base.qcow2 top.qcow2
	q=$(($(blockdev --getsize64 "$DEV") / 4))
	"$FIO" --output=fio.log --name=n --filename="$DEV" --direct=1 \
		--ioengine=libaio --rw=randwrite --bsrange="$MINBS"-128k --iodepth=16 \
		--numjobs=4 --offset_increment="$q" --size=$((q - q / 16)) \
		--io_size=4M --verify=crc32c --verify_fatal=1 --randrepeat=1 \
		--randseed=77 --group_reporting
	rc=$?
	if [ "$rc" -ne 0 ] || grep -Eqi 'verify|bad magic|crc32c|err= *[1-9]' fio.log; then
		cat fio.log
		dmq_fail "fio numjobs=4 failed (rc=$rc)"
	fi
	grep -E '^ *(write|read): IOPS' fio.log | sed 's/^ */fio: /'
	dmq_run dd if="$DEV" of=dev.raw bs=1M iflag=direct status=none
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 top.raw
	cmp dev.raw top.raw || dmq_fail "qemu-img convert of top.qcow2 differs from the device's data"
	check_lower
}

case_cluster_4k() {
	FIO_SEED=41
	write_case cluster_size=4k 4k chain
}

case_cluster_64k() {
	FIO_SEED=61
	write_case cluster_size=64k 64k chain
}

case_cluster_2m() {
	FIO_SEED=21
	write_case cluster_size=2M 2M chain
}

case_v2_64k() {
	FIO_SEED=22
	write_case cluster_size=64k,compat=0.10 64k chain
	[ "$(dmq_header top.qcow2 version)" = 2 ] || dmq_fail "not a v2 image"
}

case_v2_single() {
	FIO_SEED=23
	write_case cluster_size=64k,compat=0.10 64k single
	[ "$(dmq_header a.qcow2 version)" = 2 ] || dmq_fail "not a v2 image"
}

# (128k clusters on the 4 KiB-sector pass: dmq_extl2_cluster)
case_extl2_64k() {
	local c
	FIO_SEED=64
	c=$(dmq_extl2_cluster 64k)
	write_case "cluster_size=$c,extended_l2=on" "$c" chain
}

case_extl2_1m() {
	FIO_SEED=65
	write_case cluster_size=1M,extended_l2=on 1M chain
}

case_extl2_single() {
	local c
	FIO_SEED=66
	c=$(dmq_extl2_cluster 64k)
	write_case "cluster_size=$c,extended_l2=on" "$c" single
}

case_refcount1() {
	FIO_SEED=1
	write_case cluster_size=64k,refcount_bits=1 64k chain
	[ "$(dmq_header top.qcow2 refcount_order)" = 0 ] || dmq_fail "refcount_order"
}

# 4k clusters: the writes need new refcount blocks (2048 clusters each)
case_refcount16_single() {
	FIO_SEED=16
	write_case cluster_size=4k,refcount_bits=16 4k single
	[ "$(dmq_header a.qcow2 refcount_order)" = 4 ] || dmq_fail "refcount_order"
}

# 4k clusters, 64-bit refcounts: a refcount block covers 2 MiB
case_refcount64() {
	FIO_SEED=64
	write_case cluster_size=4k,refcount_bits=64 4k chain
	[ "$(dmq_header top.qcow2 refcount_order)" = 6 ] || dmq_fail "refcount_order"
}

# base < mid < top in size; writes reach the top only
case_chain3() {
	local o=cluster_size=64k
	need "$FIO"
	FIO_SEED=3
	dmq_img_create base.qcow2 20M "$o"
	dmq_write base.qcow2 t:0:2M r:5M+512:1M ct:8M:128k z:8M+64k:64k \
		P0x11:19M:1M
	dmq_img_create mid.qcow2 28M "$o" base.qcow2
	dmq_write mid.qcow2 r:1M:64k t:18M+3k:4M z:5M+64k:128k cr:12M:64k \
		P0x22:27M+512:512k
	dmq_img_create top.qcow2 "$DEV_SIZE" "$o" mid.qcow2
	dmq_check_images base.qcow2 mid.qcow2
	lower_sums base.qcow2 mid.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 before.raw
	map_rw base.qcow2 mid.qcow2 top.qcow2
	fio_write "$DEV"
	finish "$DEV" top.qcow2 before.raw
}

# an empty overlay over a base made by `qemu-img convert -c`
case_compressed_base() {
	local n
	need "$FIO"
	FIO_SEED=5
	dmq_run truncate -s "$DEV_SIZE" src.raw
	dmq_write_raw src.raw t:0:3M r:3M+512:1M P0x11:5M:1M t:8M:6M \
		r:16M-5k:10k t:20M+3:8M P0x3c:31M:1M
	dmq_run "$QEMU_IMG" convert -c -f raw -O qcow2 -o cluster_size=64k \
		src.raw base.qcow2
	n=$("$QEMU_IMG" map -f qcow2 --output=json base.qcow2 |
		"$PYTHON" -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin) if e.get("compressed")))') ||
		dmq_fail "qemu-img map"
	[ "$n" -gt 0 ] || dmq_fail "no compressed clusters in base.qcow2"
	echo "base.qcow2: $n compressed extents"
	dmq_img_create top.qcow2 "$DEV_SIZE" cluster_size=64k base.qcow2
	lower_sums base.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 before.raw
	map_rw base.qcow2 top.qcow2
	fio_write "$DEV"
	finish "$DEV" top.qcow2 before.raw
}

# allocated clusters of a qcow2 image (qemu-img check --output=json)
allocated_clusters() {
	"$QEMU_IMG" check -f qcow2 --output=json "$1" |
		"$PYTHON" -c 'import json,sys; print(json.load(sys.stdin).get("allocated-clusters", 0))'
}

# a fresh image without a backing file; the second pass repeats the same
# writes (same seeds), so it overwrites clusters the image owns, in place:
# nothing new may be allocated
case_single_inplace() {
	local n1 n2
	need "$FIO"
	FIO_SEED=7
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	: >lower.sha256
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 before.raw
	map_rw a.qcow2
	fio_write "$DEV"
	finish "$DEV" a.qcow2 before.raw
	n1=$(allocated_clusters a.qcow2) || dmq_fail "qemu-img check --output=json"
	mv dev.raw before.raw
	echo "pass 2: overwrite in place ($n1 clusters allocated)"
	map_rw a.qcow2
	fio_write "$DEV"
	finish "$DEV" a.qcow2 before.raw
	n2=$(allocated_clusters a.qcow2) || dmq_fail "qemu-img check --output=json"
	[ "$n2" = "$n1" ] ||
		dmq_fail "overwrites allocated clusters: $n1 before, $n2 after"
}

# in-place writes and verify reads submitted in batches (fio's libaio
# with 16 I/Os per io_submit, as QEMU's native AIO submits) over an image
# the format writer has just written through the host's page cache: the
# fast path's direct I/O must drop the cached pages it overwrites (a later
# buffered reader, qemu-img convert here, sees the new data). Every byte
# checked (fio's verify, the device against QEMU, nothing else changed)
case_batched_inplace() {
	local f0 f1
	need "$FIO"
	FIO_SEED=11
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	dmq_write a.qcow2 r:0:"$DEV_SIZE"
	: >lower.sha256
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 before.raw
	map_rw a.qcow2
	f0=$(fast_bios) || dmq_fail "dmsetup status"
	fio_write "$DEV" --iodepth=32 --iodepth_batch_submit=16 \
		--iodepth_batch_complete_max=16
	f1=$(fast_bios) || dmq_fail "dmsetup status"
	if dmq_counts_bios; then
		[ "$f1" -gt "$f0" ] || dmq_fail "no bio took the fast path (fast_bios $f0 -> $f1)"
	fi
	echo "fast_bios $f0 -> $f1"
	finish "$DEV" a.qcow2 before.raw
}

# a file system on the device doing its own direct I/O, synchronous and
# batched (its block plug finished under the file's i_rwsem), into blocks
# it allocated first: in-place writes of the image through the fast path,
# fio's verify, then fsck and the file's sum after a read-only remount
case_ext4_direct() {
	local mnt=$DMQ_CASE_DIR/mnt sum
	need "$FIO" mkfs.ext4 mount umount fsck.ext4
	grep -qw ext4 /proc/filesystems || modprobe ext4 2>/dev/null
	grep -qw ext4 /proc/filesystems || dmq_skip "no ext4 in this kernel"
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	mkdir -p "$mnt"
	trap 'umount "$DMQ_CASE_DIR/mnt" 2>/dev/null' EXIT
	map_rw a.qcow2
	dmq_run mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV"
	dmq_run mount -t ext4 "$DEV" "$mnt"
	# allocated first (sequential), then overwritten at random in place
	dmq_run "$FIO" --output=fio1.log --name=fill --filename="$mnt/f" --size=16M \
		--rw=write --bs=1M --direct=1 --ioengine=psync
	dmq_run "$FIO" --output=fio2.log --name=sync --filename="$mnt/f" --size=16M \
		--rw=randwrite --bs=4k --io_size=4M --direct=1 --ioengine=psync \
		--verify=crc32c --verify_fatal=1
	dmq_run "$FIO" --output=fio3.log --name=batch --filename="$mnt/f" --size=16M \
		--rw=randwrite --bs=4k --io_size=8M --direct=1 --ioengine=libaio \
		--iodepth=32 --iodepth_batch_submit=16 --iodepth_batch_complete_max=16 \
		--verify=crc32c --verify_fatal=1
	if grep -Ei 'verify|bad magic|bad header|err= *[1-9]' fio2.log fio3.log; then
		dmq_fail "fio's verify failed"
	fi
	sum=$(sha256sum <"$mnt/f") || dmq_fail "sha256sum"
	dmq_run umount "$mnt"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top a.qcow2
	dmq_create v a.qcow2 >/dev/null || dmq_fail "read-only table refused"
	DEV=$(dmq_dev v) || dmq_fail "no device node"
	dmq_run fsck.ext4 -fn "$DEV"
	dmq_run mount -t ext4 -o ro "$DEV" "$mnt"
	[ "$(sha256sum <"$mnt/f")" = "$sum" ] || dmq_fail "the file differs after a remount"
	echo "ext4: the file holds fio's verified writes after a remount"
	dmq_run umount "$mnt"
	dmq_remove v || dmq_fail "dmsetup remove failed"
}

# writes over several clusters the image owns, through the worker (FUA
# writes never take the fast path; a fresh table knows few clusters): the
# worker starts one direct I/O per run of in-place pieces that follow one
# another in the file. The image's host clusters for guest 4M..8M come
# before those of 0..4M, and the cluster at 2M is a zero cluster, so runs
# break in the file (at 4M) and at a piece that allocates (2M). A FUA
# pass of 768 KiB writes, then a plain pass of 1 MiB writes on a new
# table; every byte checked through the device and QEMU; the file grows by
# one cluster at most (2M's: every other write went in place)
case_inplace_runs() {
	local s0 s1 f0 f1
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	dmq_write a.qcow2 r:4M:4M r:0:4M zu:2M:64k
	s0=$(stat -c %s a.qcow2) || dmq_fail "stat"
	convert a.qcow2 exp.raw
	dmq_run dd if=/dev/urandom of=w1.bin bs=768k count=10 status=none
	dmq_run dd if=/dev/urandom of=w2.bin bs=1M count=8 status=none
	map_rw a.qcow2
	write_both w1.bin 768k 10 direct,dsync "FUA writes"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	map_rw a.qcow2
	f0=$(fast_bios) || dmq_fail "dmsetup status"
	write_both w2.bin 1M 8 direct "1 MiB writes"
	f1=$(fast_bios) || dmq_fail "dmsetup status"
	echo "(fast_bios $f0 -> $f1: udev's reads, or a MiB they made known)"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top a.qcow2
	convert a.qcow2 top.raw
	same exp.raw top.raw "qemu-img convert differs from the writes"
	s1=$(stat -c %s a.qcow2) || dmq_fail "stat"
	[ "$s1" -le $((s0 + 65536)) ] ||
		dmq_fail "in-place writes grew the image file: $s0 bytes before, $s1 after"
	echo "image file: $s0 bytes before, $s1 after"
}

# write_both FILE BS COUNT OFLAG WHAT: FILE written to the device (dd
# oflag=OFLAG) and to exp.raw; the device read back equals exp.raw
write_both() {
	dmq_run dd if="$1" of="$DEV" bs="$2" count="$3" oflag="$4" conv=notrunc status=none
	dmq_run dd if="$1" of=exp.raw bs="$2" count="$3" conv=notrunc status=none
	dump "$DEV" dev.raw
	same exp.raw dev.raw "the device after $5 over in-place runs"
	echo "$5: the device holds the writes"
}

# fast_bios: the fast path's count in `dmsetup status` of v
fast_bios() {
	"$DMSETUP" status "$(dmq_full_name v)" | sed -n 's/.* fast_bios=\([0-9]*\).*/\1/p'
}

# first writes of 4 KiB into fresh clusters of an image without a backing
# file go straight to the new host cluster, with no 60 KiB zero fill (the
# cluster was never written: it reads as zeroes): the image file grows by
# about what was written. Then the data, through the device and QEMU.
case_first_write_nofill() {
	local before after i grown
	dmq_needs_kernel "the image file as the target writes it"
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	dmq_run dd if=/dev/urandom of=w.bin bs=4k count=17 status=none
	dmq_run truncate -s "$DEV_SIZE" exp.raw
	map_rw a.qcow2
	# the first write makes the L2 table (and fills its own cluster's
	# allocation); the image's size in blocks is taken after it
	dmq_run dd if=w.bin of="$DEV" bs=4k count=1 oflag=direct conv=fsync status=none
	dmq_run dd if=w.bin of=exp.raw bs=4k count=1 conv=notrunc status=none
	before=$(stat -c %b a.qcow2) || dmq_fail "stat"
	# 16 writes of 4 KiB, 4 KiB into clusters 1..16
	for i in $(seq 1 16); do
		dmq_run dd if=w.bin of="$DEV" bs=4k skip="$i" seek=$((i * 16 + 1)) count=1 \
			oflag=direct status=none
		dmq_run dd if=w.bin of=exp.raw bs=4k skip="$i" seek=$((i * 16 + 1)) count=1 \
			conv=notrunc status=none
	done
	dmq_run blockdev --flushbufs "$DEV"
	after=$(stat -c %b a.qcow2) || dmq_fail "stat"
	grown=$(((after - before) * 512))
	echo "image grew by $grown bytes for 16 first writes of 4 KiB"
	# 64 KiB written; with a fill it would be 1 MiB
	[ "$grown" -le $((256 * 1024)) ] ||
		dmq_fail "first writes filled their clusters: the image grew by $grown bytes"
	dmq_run dd if="$DEV" of=dev.raw bs=1M iflag=direct status=none
	dmq_remove v || dmq_fail "dmsetup remove failed"
	cmp dev.raw exp.raw || dmq_fail "the device does not hold the writes"
	check_top a.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 top.raw
	cmp top.raw exp.raw || dmq_fail "QEMU does not read the writes"
}

# writes with no flush after them are committed by the periodic commit
# (every five seconds): QEMU sees them in the live image (-U) a few seconds
# later, before any flush or suspend
case_commit_period() {
	local map
	dmq_needs_kernel "the image file as the target writes it"
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	dmq_run dd if=/dev/urandom of=w.bin bs=64k count=2 status=none
	map_rw a.qcow2
	dmq_run dd if=w.bin of="$DEV" bs=64k seek=10 count=1 oflag=direct status=none
	dmq_run dd if=w.bin of="$DEV" bs=4k skip=16 seek=$((20 * 16 + 3)) count=1 \
		oflag=direct status=none
	sleep 9
	map=$("$QEMU_IMG" map -U -f qcow2 --output=json a.qcow2) || dmq_fail "qemu-img map -U"
	printf '%s\n' "$map" | "$PYTHON" -c '
import json, sys
m = json.load(sys.stdin)
for off in (10 << 16, 20 << 16):
    e = [x for x in m if x["start"] <= off < x["start"] + x["length"]]
    if not e or not e[0]["data"]:
        sys.exit("cluster at %#x not mapped in the live image: %s" % (off, e))
print("both clusters mapped in the live image")
' || dmq_fail "the periodic commit did not write the mapping out"
	dmq_run dd if="$DEV" of=got.bin bs=64k skip=10 count=1 iflag=direct status=none
	cmp got.bin <(head -c 65536 w.bin) || dmq_fail "the device does not hold the write"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top a.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 top.raw
	cmp <(dd if=top.raw bs=64k skip=10 count=1 status=none) <(head -c 65536 w.bin) ||
		dmq_fail "QEMU does not read the write"
	cmp <(dd if=top.raw bs=4k skip=$((20 * 16 + 3)) count=1 status=none) \
		<(dd if=w.bin bs=4k skip=16 count=1 status=none) || dmq_fail "QEMU does not read the 4k write"
}

# buffered writes (page cache, writeback); then drop the cache and verify
# again with O_DIRECT (fio --verify_only) so the data comes from the target
case_buffered() {
	need "$FIO"
	FIO_SEED=9
	mk_base base.qcow2 cluster_size=64k 64k
	dmq_img_create top.qcow2 "$DEV_SIZE" cluster_size=64k base.qcow2
	lower_sums base.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 before.raw
	map_rw base.qcow2 top.qcow2
	fio_write "$DEV" --direct=0 --fsync_on_close=1
	dmq_run blockdev --flushbufs "$DEV"
	echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
	{ cp j0.iolog j0.iolog.w && cp j1.iolog j1.iolog.w; } || dmq_fail "cp"
	echo "verify again with O_DIRECT after dropping the page cache"
	fio_write "$DEV" --direct=1 --verify_only
	{ mv j0.iolog.w j0.iolog && mv j1.iolog.w j1.iolog; } || dmq_fail "mv"
	finish "$DEV" top.qcow2 before.raw
}

# every write with a REQ_PREFLUSH after it (fdatasync)
case_flush_fsync() {
	FIO_SEED=11
	FIO_IO=${DMQ_FIO_IO:-4M}
	write_case cluster_size=64k 64k chain --fsync=1
}

# O_DIRECT|O_SYNC: FUA writes
case_fua_osync() {
	FIO_SEED=12
	FIO_IO=${DMQ_FIO_IO:-4M}
	write_case cluster_size=64k 64k chain --sync=1
}

# ext4 on the writable device, files with their sha256; then a read-only
# table over the same images must mount and give the same files back
case_ext4() {
	local i mnt=$DMQ_CASE_DIR/mnt
	need mkfs.ext4 mount umount fsck.ext4
	grep -qw ext4 /proc/filesystems || modprobe ext4 2>/dev/null
	grep -qw ext4 /proc/filesystems || dmq_skip "no ext4 in this kernel"
	mk_base base.qcow2 cluster_size=64k 64k
	dmq_img_create top.qcow2 "$DEV_SIZE" cluster_size=64k base.qcow2
	lower_sums base.qcow2
	mkdir -p "$mnt" files
	for i in 1 2 3; do
		dmq_run dd if=/dev/urandom of="files/f$i" bs=1M count=$i status=none
	done
	dmq_run dd if=/dev/urandom of=files/odd bs=4097 count=3 status=none
	seq 1 20000 >files/text
	(cd files && sha256sum -- *) >files.sha256 || dmq_fail "sha256sum"
	trap 'umount "$DMQ_CASE_DIR/mnt" 2>/dev/null' EXIT
	map_rw base.qcow2 top.qcow2
	# a default mkfs discards the whole device first (zero clusters over
	# the base's data); no lazy init thread after mount
	dmq_run mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV"
	dmq_run mount -t ext4 "$DEV" "$mnt"
	dmq_run cp -r files "$mnt/"
	dmq_run mkdir "$mnt/d"
	dmq_run cp files/f2 "$mnt/d/f2"
	dmq_run sync -f "$mnt"
	dmq_run umount "$mnt"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	check_lower

	dmq_create v base.qcow2 top.qcow2 >/dev/null || dmq_fail "read-only table refused"
	DEV=$(dmq_dev v) || dmq_fail "no device node"
	dmq_run fsck.ext4 -fn "$DEV"
	dmq_run mount -t ext4 -o ro "$DEV" "$mnt"
	(cd "$mnt/files" && sha256sum -c --quiet "$DMQ_CASE_DIR/files.sha256") ||
		dmq_fail "files differ after the remount"
	cmp files/f2 "$mnt/d/f2" || dmq_fail "d/f2 differs"
	echo "ext4: $(wc -l <files.sha256) files verified after a read-only remount"
	dmq_run umount "$mnt"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
}

# ---------------------------------------------- discard and write-zeroes

# expect_bytes DEV OFF LEN BYTE: the device reads LEN bytes of BYTE at OFF
expect_bytes() {
	"$PYTHON" - "$@" <<-'EOF' || dmq_fail "unexpected data at $2+$3"
	import os, sys
	dev, off, ln, val = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4], 0)
	fd = os.open(dev, os.O_RDONLY)
	os.lseek(fd, off, 0)
	b = os.read(fd, ln)
	if b != bytes([val]) * ln:
	    i = next((i for i, x in enumerate(b) if x != val), len(b))
	    print("at %#x: %r, expected %#x" % (off + i, b[i:i + 8], val))
	    sys.exit(1)
	EOF
}

# discard_case OPTS: lower data everywhere, some clusters owned by the top;
# discards and write-zeroes must make both read as zeroes (the C target lets
# lower data show through), free the top's clusters, leave no leaks. On v2
# (no zero flag; OPTS with compat=0.10) a discard over lower data is
# ignored: the data stays. CL: the cluster size OPTS give (64k if not
# given).
discard_case() {
	local opts=$1 cl=${2:-65536} top_z=0 low_z=0
	need blkdiscard
	dmq_img_create base.qcow2 16M "$opts"
	dmq_write base.qcow2 P0xaa:0:16M
	dmq_img_create top.qcow2 16M "$opts" base.qcow2
	dmq_write top.qcow2 P0x5c:1M:1M
	lower_sums base.qcow2
	map_rw base.qcow2 top.qcow2
	# whole clusters: owned by the top (1M..), lower only (4M..)
	dmq_run blkdiscard -o $((1024 * 1024)) -l $((4 * cl)) "$DEV"
	dmq_run blkdiscard -o $((4 * 1024 * 1024)) -l $((2 * cl)) "$DEV"
	# write-zeroes, keeping the allocation, and an unaligned one
	dmq_run blkdiscard -z -o $((1024 * 1024 + 5 * cl)) -l "$cl" "$DEV"
	dmq_run blkdiscard -z -o $((6 * 1024 * 1024 + 4096)) -l 12288 "$DEV"
	case $opts in *compat=0.10*) top_z=0x5c low_z=0xaa ;; esac
	expect_bytes "$DEV" $((1024 * 1024)) "$cl" "$top_z"
	expect_bytes "$DEV" $((1024 * 1024 + cl)) $((3 * cl)) "$top_z"
	expect_bytes "$DEV" $((1024 * 1024 + 5 * cl)) "$cl" 0
	expect_bytes "$DEV" $((4 * 1024 * 1024)) $((2 * cl)) "$low_z"
	expect_bytes "$DEV" $((1024 * 1024 + 5 * cl)) "$cl" 0
	expect_bytes "$DEV" $((6 * 1024 * 1024 + 4096)) 12288 0
	expect_bytes "$DEV" $((6 * 1024 * 1024)) 4096 0xaa
	expect_bytes "$DEV" $((1024 * 1024 + 4 * cl)) "$cl" 0x5c
	expect_bytes "$DEV" 0 "$cl" 0xaa
	dmq_run dd if="$DEV" of=dev.raw bs=1M iflag=direct status=none
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 top.raw
	cmp dev.raw top.raw || dmq_fail "qemu-img convert differs from the device"
	check_lower
}

case_discard_v3() { discard_case cluster_size=64k; }
case_discard_v2() {
	dmq_needs_kernel "v2 discard semantics"
	discard_case cluster_size=64k,compat=0.10
}

# v2 without lower data: a whole-cluster discard deallocates (the cluster
# reads zeroes from below), a partial one changes nothing; a default mkfs
# (it discards the whole device first) must not fill the image.
case_discard_v2_dealloc() {
	local cl=65536 before after
	dmq_needs_kernel "v2 discard semantics"
	need blkdiscard mkfs.ext4
	dmq_img_create top.qcow2 64M cluster_size=64k,compat=0.10
	dmq_write top.qcow2 P0x5c:1M:1M P0x33:8M:64k
	map_rw top.qcow2
	dmq_run blkdiscard -o $((1024 * 1024)) -l $((2 * cl)) "$DEV"
	dmq_run blkdiscard -o $((8 * 1024 * 1024 + 4096)) -l 4096 "$DEV"
	expect_bytes "$DEV" $((1024 * 1024)) $((2 * cl)) 0
	expect_bytes "$DEV" $((1024 * 1024 + 2 * cl)) $((14 * cl)) 0x5c
	expect_bytes "$DEV" $((8 * 1024 * 1024)) "$cl" 0x33
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	before=$(allocated_clusters top.qcow2) || dmq_fail "qemu-img check"
	[ "$before" = 15 ] || dmq_fail "$before data clusters after the discard, expected 15"
	map_rw top.qcow2
	dmq_run mkfs.ext4 -q -F "$DEV"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	after=$(allocated_clusters top.qcow2) || dmq_fail "qemu-img check"
	echo "v2, 64 MiB: $after data clusters after a default mkfs.ext4"
	[ "$after" -lt 512 ] || dmq_fail "a default mkfs filled the v2 image ($after of 1024 clusters)"
}
# v3, 1 GiB (two L2 tables' worth with 64k clusters), data in the first
# 512 MiB only: a whole-device discard (what a default mkfs sends) frees
# that data and allocates nothing: clusters that read zeroes already stay
# as they are, and the second range (no L2 table) gets none. Over a base
# with data there, the same discard gives the top zero clusters (it must
# hide the base's data), L2 table included.
# A discard gives the host file system its space back: the clusters it
# frees are deallocated in the image file (holes, as the C target and QEMU
# do), and later writes reuse them with the right contents.
case_discard_punch() {
	local before after freed size
	dmq_needs_kernel "holes for freed clusters"
	need blkdiscard
	dmq_img_create top.qcow2 64M cluster_size=64k
	dmq_write top.qcow2 P0x5c:8M:32M
	"$PYTHON" -c 'import sys; sys.stdout.buffer.write(b"\x77" * (4 << 20))' >w.bin ||
		dmq_fail "cannot write w.bin"
	before=$(stat -c %b top.qcow2) || dmq_fail "stat"
	map_rw top.qcow2
	dmq_run blkdiscard -o $((8 << 20)) -l $((16 << 20)) "$DEV"
	# suspend (dmsetup remove) commits and applies the frees
	dmq_remove v || dmq_fail "dmsetup remove failed"
	after=$(stat -c %b top.qcow2) || dmq_fail "stat"
	freed=$(((before - after) * 512))
	echo "the image file gave back $((freed >> 20)) MiB after a 16 MiB discard"
	[ "$freed" -ge $((15 << 20)) ] || dmq_fail "only $freed bytes deallocated in the file"
	check_top top.qcow2
	dmq_run "$QEMU_IO" -f qcow2 -c "read -P 0 8M 16M" -c "read -P 0x5c 24M 16M" top.qcow2 ||
		dmq_fail "qemu-io does not read the discard"
	size=$(stat -c %s top.qcow2) || dmq_fail "stat"
	# new data goes into the freed clusters (allocation starts at the
	# lowest free one): it must read back whole, from us and from QEMU
	map_rw top.qcow2
	dmq_run dd if=w.bin of="$DEV" bs=1M seek=44 oflag=direct conv=fsync status=none
	dmq_run dd if=w.bin of="$DEV" bs=4k count=1 seek=$((12 << 8)) oflag=direct conv=fsync \
		status=none
	expect_bytes "$DEV" $((44 << 20)) $((4 << 20)) 0x77
	expect_bytes "$DEV" $((12 << 20)) 4096 0x77
	expect_bytes "$DEV" $(((12 << 20) + 4096)) $(((64 << 10) - 4096)) 0
	expect_bytes "$DEV" $((8 << 20)) $((4 << 20)) 0
	expect_bytes "$DEV" $((24 << 20)) $((16 << 20)) 0x5c
	dmq_remove v || dmq_fail "dmsetup remove failed"
	[ "$(stat -c %s top.qcow2)" = "$size" ] ||
		dmq_fail "the image grew: the writes did not reuse the freed clusters"
	check_top top.qcow2
	dmq_run "$QEMU_IO" -f qcow2 -c "read -P 0x77 44M 4M" -c "read -P 0x77 12M 4k" \
		-c "read -P 0 8M 4M" -c "read -P 0 $(((12 << 20) + 4096)) $(((64 << 10) - 4096))" \
		-c "read -P 0x5c 24M 16M" top.qcow2 || dmq_fail "qemu-io does not read the writes"
}

case_discard_unwritten() {
	local l1
	dmq_needs_kernel "discard deallocation"
	need blkdiscard
	dmq_img_create top.qcow2 1G cluster_size=64k
	dmq_write top.qcow2 P0x5c:1M:1M P0x33:300M:64k
	map_rw top.qcow2
	dmq_run blkdiscard "$DEV"
	expect_bytes "$DEV" $((1024 * 1024)) $((1024 * 1024)) 0
	expect_bytes "$DEV" $((300 * 1024 * 1024)) 65536 0
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	[ "$(allocated_clusters top.qcow2)" = 0 ] || dmq_fail "data clusters left after the discard"
	l1=$(dmq_py dmq_img entry top.qcow2 l1 1) || dmq_fail "cannot read L1 entry 1"
	echo "L1 entry 1 after the discard: $l1"
	[ $((${l1#* })) -eq 0 ] || dmq_fail "the discard allocated an L2 table for the unwritten half ($l1)"
	dmq_img_create base.qcow2 1G cluster_size=64k
	dmq_write base.qcow2 P0xaa:700M:128k
	dmq_img_create top.qcow2 1G cluster_size=64k base.qcow2
	map_rw base.qcow2 top.qcow2
	dmq_run blkdiscard "$DEV"
	expect_bytes "$DEV" $((700 * 1024 * 1024)) 131072 0
	expect_bytes "$DEV" 0 65536 0
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	l1=$(dmq_py dmq_img entry top.qcow2 l1 1) || dmq_fail "cannot read L1 entry 1"
	[ $((${l1#* })) -ne 0 ] || dmq_fail "no L2 table for the zero clusters over the base's data ($l1)"
	dmq_run "$QEMU_IO" -f qcow2 -c "read -P 0 700M 128k" top.qcow2 || dmq_fail "qemu-io does not read zeroes over the base's data"
}
case_discard_extl2() {
	local c
	c=$(dmq_extl2_cluster 64k)
	discard_case "cluster_size=$c,extended_l2=on" "$c"
}

# -------------------------------------------------- fast path vs. discard

# Overwrites and reads of clusters the top owns take the fast path (no
# state mutex) while discards of the same clusters free them and new
# writes elsewhere allocate (and may reuse them): a late overwrite must
# never land in a cluster handed out again. One job writes with crc32c
# verify into the empty first half; in the second half, filled and read
# first, two jobs overwrite and read, one discards. Then the usual checks.
case_fast_vs_discard() {
	local half rc fast trim=()
	need "$FIO" blkdiscard
	dmq_img_create a.qcow2 "$DEV_SIZE" cluster_size=64k
	map_rw a.qcow2
	half=$(($(blockdev --getsize64 "$DEV") / 2))
	dmq_run dd if=/dev/urandom of="$DEV" bs=1M seek=$((half >> 20)) count=$((half >> 20)) oflag=direct status=none
	dmq_run dd if="$DEV" of=/dev/null bs=64k skip=$((half >> 16)) iflag=direct status=none
	# (fio discards block devices only: not the host-side fake's files)
	[ -b "$DEV" ] && trim=(--name=trim --offset="$half" --size="$half"
		--rw=randtrim --bs=64k --iodepth=4 --io_size=12M --randseed=13)
	"$FIO" --output=fio.log --filename="$DEV" --direct=1 --ioengine=libaio \
		--randrepeat=1 \
		--name=alloc --offset=0 --size="$half" --rw=randwrite \
		--bsrange=4k-128k --iodepth=8 --io_size=12M --verify=crc32c \
		--verify_fatal=1 --randseed=11 \
		--name=over --offset="$half" --size="$half" --rw=randrw \
		--bs=4k --iodepth=16 --io_size=16M --randseed=12 "${trim[@]}"
	rc=$?
	if [ "$rc" -ne 0 ] || grep -Eqi 'verify|bad magic|crc32c|err= *[1-9]' fio.log; then
		cat fio.log
		dmq_fail "fio failed (rc=$rc)"
	fi
	grep -E '^ *(write|read|trim): IOPS' fio.log | sed 's/^ */fio: /'
	if dmq_counts_bios; then
		fast=$(fast_bios)
		echo "status: fast_bios=$fast"
		[ "$fast" -gt 0 ] 2>/dev/null || dmq_fail "no bio took the fast path (fast_bios=$fast)"
	fi
	dmq_run dd if="$DEV" of=dev.raw bs=1M iflag=direct status=none
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top a.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw a.qcow2 top.raw
	cmp dev.raw top.raw || dmq_fail "qemu-img convert of a.qcow2 differs from the device's data"
	rm -f top.raw
}

# ------------------------------------------------- refcount table growth

# ------------------------------------------------- metadata cache eviction

# More than one L2 table: 640 MiB with 64k clusters (one L2 table maps
# 512 MiB), sparse data in a base under an empty top, fio over both halves
# (the second crosses 512 MiB), and md_cache_pages=16: L2 and refcount
# pages are evicted and read back all the time.
sparse_640m() {
	need "$FIO"
	FIO_SEED=640
	DEV_SIZE=640M
	dmq_img_create base.qcow2 640M cluster_size=64k
	dmq_write base.qcow2 t:0:1M r:511M+512:2M ct:600M:128k t:639M+3:1M-3
	dmq_img_create top.qcow2 640M cluster_size=64k base.qcow2
	lower_sums base.qcow2
	dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 before.raw
	map_rw base.qcow2 top.qcow2
	FIO_IO=6M fio_write "$DEV"
	finish "$DEV" top.qcow2 before.raw
	local e0 e1
	e0=$(dmq_py dmq_img entry top.qcow2 l1 0) || dmq_fail "L1[0]"
	e1=$(dmq_py dmq_img entry top.qcow2 l1 1) || dmq_fail "L1[1]"
	[ "${e0#* }" != 0x0 ] && [ "${e1#* }" != 0x0 ] ||
		dmq_fail "top.qcow2 does not use two L2 tables: L1 $e0, $e1"
	echo "top.qcow2: L1[0] $e0, L1[1] $e1"
	rm -f ./*.raw
}

case_sparse_640m() {
	dmq_with_md_cache 16 sparse_640m
}

# write cases again with md_cache_pages=16 (DMQ_MD_CACHE_PAGES=16 runs
# them all so): 4k clusters (16 L2 tables, refcount blocks), extended L2
case_md16_cluster_4k() {
	dmq_with_md_cache 16 case_cluster_4k
}

case_md16_extl2_64k() {
	dmq_with_md_cache 16 case_extl2_64k
}

# 4K clusters with 64-bit refcounts: one refcount-table cluster covers
# 1 GiB. A metadata-preallocated image just under 2 GiB, snapshotted, gets
# copy-on-write allocations past what its table describes: the table must
# move and grow, the snapshot must stay intact, no errors, no leaks.
case_refcount_growth() {
	local before after
	need "$FIO"
	dmq_run "$QEMU_IMG" create -q -f qcow2 \
		-o cluster_size=4k,refcount_bits=64,preallocation=metadata top.qcow2 1990M
	dmq_write top.qcow2 P0x11:0:4M
	dmq_run "$QEMU_IMG" snapshot -c s1 top.qcow2
	dmq_run "$QEMU_IMG" convert -O raw -l snapshot.name=s1 top.qcow2 snap0.raw
	before=$(dmq_header top.qcow2 refcount_table_offset)
	map_rw top.qcow2
	"$FIO" --output=fio.log --name=g --filename="$DEV" --direct=1 \
		--ioengine=libaio --rw=randwrite --bsrange=4k-256k --iodepth=8 \
		--size=1900M --io_size=96M --verify=crc32c --verify_fatal=1 \
		--randrepeat=1 || { cat fio.log; dmq_fail "fio failed"; }
	sha256sum <"$DEV" >dev.sha
	dmq_remove v || dmq_fail "dmsetup remove failed"
	after=$(dmq_header top.qcow2 refcount_table_offset)
	echo "refcount table: $before -> $after"
	[ "$before" != "$after" ] || dmq_fail "the refcount table did not move"
	check_top top.qcow2
	dmq_run "$QEMU_IMG" convert -O raw top.qcow2 top.raw
	sha256sum <top.raw | cmp - dev.sha || dmq_fail "qemu-img convert differs from the device"
	rm -f top.raw
	dmq_run "$QEMU_IMG" convert -O raw -l snapshot.name=s1 top.qcow2 snap1.raw
	cmp snap0.raw snap1.raw || dmq_fail "the snapshot changed"
}

# O_APPEND set on the table's open files after the table was created (as
# fcntl can through an fd from get_img_fd): the metadata writes that
# follow (new L2 tables, L2 entries, refcount blocks, refcounts) must still
# land where they belong, not at the end of the file. Our I/O uses kiocbs
# with flags of its own, not the file's.
case_append_set_later() {
	local i off end pid
	dmq_img_create base.qcow2 "$DEV_SIZE" cluster_size=4k
	dmq_write base.qcow2 r:0:"$DEV_SIZE"
	dmq_img_create top.qcow2 "$DEV_SIZE" cluster_size=4k base.qcow2
	dmq_run "$QEMU_IMG" convert -O raw top.qcow2 want.raw
	"$PYTHON" -c 'import os, sys; sys.stdout.buffer.write(os.urandom(12288))' >w.bin ||
		dmq_fail "python"
	# the helper keeps the fds (with O_APPEND set on them) until "done"
	trap 'touch "$DMQ_CASE_DIR/done"' EXIT
	dmq_create v --rw --append-after \
		--then 'touch appended; while [ ! -e done ]; do sleep 0.1; done' \
		base.qcow2 top.qcow2 &
	pid=$!
	end=$((SECONDS + 30))
	until [ -e appended ]; do
		kill -0 "$pid" 2>/dev/null || dmq_fail "dmq_open.py ended early"
		[ "$SECONDS" -lt "$end" ] || dmq_fail "O_APPEND was not set"
		sleep 0.1
	done
	DEV=$(dmq_dev v) || dmq_fail "no device node"
	# 12k copied on write every 1M + 20k (a new L2 table every 2M, new
	# refcount blocks as the file grows), then overwritten in place
	for i in $(seq 0 30); do
		off=$((i * (1048576 + 20480)))
		dmq_run dd if=w.bin of="$DEV" bs=4k seek=$((off / 4096)) oflag=direct \
			conv=notrunc status=none
		dmq_run dd if=w.bin of=want.raw bs=4k seek=$((off / 4096)) \
			conv=notrunc status=none
	done
	dmq_run dd if=w.bin of="$DEV" bs=4k seek=0 oflag=direct conv=notrunc,fsync status=none
	touch done
	wait "$pid" || dmq_fail "dmq_open.py failed"
	dmq_run dd if="$DEV" of=dev.raw bs=1M iflag=direct status=none
	cmp want.raw dev.raw || dmq_fail "the device does not hold the writes"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top top.qcow2
	dmq_run "$QEMU_IMG" convert -O raw top.qcow2 top.raw
	cmp want.raw top.raw || dmq_fail "qemu-img convert of top.qcow2 differs (metadata went astray)"
	echo "31 copy-on-write writes after O_APPEND was set: all where they belong"
}

# ovl_cleanup: undo case_overlayfs_freeze's mounts (lazily: a freeze that
# hung must not hang the script as well)
ovl_cleanup() {
	local d=$DMQ_CASE_DIR
	"$DMSETUP" remove --retry "$(dmq_full_name v)" >/dev/null 2>&1
	if [ -n "${FREEZE_PID:-}" ] && ! kill -0 "$FREEZE_PID" 2>/dev/null; then
		fsfreeze -u "$d/up" 2>/dev/null
	fi
	umount -l "$d/ovl" 2>/dev/null
	umount -l "$d/up" 2>/dev/null
}

# An image on overlayfs over ext4: the target's asynchronous direct writes
# go through overlayfs to ext4, which takes freeze protection (sb_writers)
# for each and must drop it when the write completes. fsfreeze of the ext4
# below then completes (it used to hang: the writes lacked IOCB_WRITE, so
# overlayfs never ended the protection it took on ext4), and the data is
# there.
case_overlayfs_freeze() {
	local i end
	need fsfreeze mkfs.ext4
	FREEZE_PID=
	trap ovl_cleanup EXIT
	mkdir -p up ovl lower || dmq_fail "mkdir"
	dmq_run truncate -s 256M up.ext4
	dmq_run mkfs.ext4 -q -F up.ext4
	mount -o loop up.ext4 up || dmq_skip "cannot mount ext4 on a loop device"
	mkdir -p up/upper up/work || dmq_fail "mkdir"
	mount -t overlay dmq-ovl -o lowerdir=lower,upperdir=up/upper,workdir=up/work ovl ||
		dmq_skip "cannot mount overlayfs"
	dmq_img_create ovl/a.qcow2 16M cluster_size=64k
	map_rw ovl/a.qcow2
	"$PYTHON" -c 'import os, sys; sys.stdout.buffer.write(os.urandom(2 << 20))' >w.bin ||
		dmq_fail "python"
	# allocate, then overwrite in place (queued async direct writes, slow
	# and fast path) several times
	for i in 1 2 3 4; do
		dmq_run dd if=w.bin of="$DEV" bs=64k oflag=direct conv=notrunc status=none
		dmq_run dd if=w.bin of="$DEV" bs=4k seek=1024 oflag=direct conv=notrunc status=none
	done
	dmq_run dd if="$DEV" of=/dev/null bs=1M iflag=direct status=none
	fsfreeze -f up &
	FREEZE_PID=$!
	end=$((SECONDS + 30))
	while kill -0 "$FREEZE_PID" 2>/dev/null; do
		[ "$SECONDS" -lt "$end" ] ||
			dmq_fail "fsfreeze of the ext4 under overlayfs hangs: sb_writers references leaked"
		sleep 0.2
	done
	wait "$FREEZE_PID" || dmq_fail "fsfreeze -f failed"
	dmq_run fsfreeze -u up
	FREEZE_PID=
	echo "fsfreeze of the ext4 below the image completed"
	dmq_run dd if="$DEV" of=got.bin bs=64k count=32 iflag=direct status=none
	cmp got.bin w.bin || dmq_fail "the device does not hold the writes"
	dmq_run dd if="$DEV" of=got.bin bs=4k skip=1024 count=512 iflag=direct status=none
	cmp got.bin w.bin || dmq_fail "the device does not hold the writes at 4M"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_top ovl/a.qcow2
}

DMQ_CASES=(
	cluster_4k
	cluster_64k
	cow_gang
	cow_gang_reads
	cluster_2m
	v2_64k
	v2_single
	extl2_64k
	extl2_1m
	extl2_single
	refcount1
	refcount16_single
	refcount64
	sparse_640m
	md16_cluster_4k
	md16_extl2_64k
	chain3
	compressed_base
	single_inplace
	batched_inplace
	ext4_direct
	first_write_nofill
	commit_period
	buffered
	flush_fsync
	fua_osync
	inplace_runs
	ext4
	discard_v3
	discard_v2
	discard_v2_dealloc
	discard_extl2
	discard_unwritten
	discard_punch
	fast_vs_discard
	refcount_growth
	numjobs
	append_set_later
	overlayfs_freeze
)
# Long cases (`make check-full`): the 640 MiB sparse image, md_cache_pages=16
# with 4k clusters (md16_extl2_64k stays), the single-image v2 and
# extended-L2 variants (v2_64k, extl2_64k and extl2_1m stay), the 2 GiB
# refcount-table growth (~10 min in the VM; qcow2_crash.sh's workload moves
# the refcount table too).
DMQ_LONG_CASES=(sparse_640m md16_cluster_4k v2_single extl2_single refcount_growth)

dmq_md_cache_env
dmq_main "$@"
