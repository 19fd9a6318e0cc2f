#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 crash safety: power cuts modelled with dm-log-writes.
#
# The images live on a file system (ext4, default mkfs; xfs too when
# mkfs.xfs is installed) on a log-writes device over two loop devices on
# the scratch tmpfs, so every write the host file system sends to its disk
# is logged with FLUSH/FUA flags. On it: a chain base<-mid<-top (64k
# clusters, data in base and mid) and grow.qcow2 (4k clusters, 64-bit
# refcounts, metadata preallocated to just under what one refcount-table
# cluster covers, 4M of data, internal snapshot s1). dmq_crash.py maps both
# writable and runs epochs of concurrent O_DIRECT writes (copy-on-write from
# the backing files and from the snapshot, allocating, overwriting; some
# FUA, through Linux AIO (REQ_FUA and no flush), each with a log mark once
# it completed: durable from there),
# write-zeroes and discards, and a file added to an ext4 (default mkfs) on
# fs.qcow2 and fsync'ed (journal commits: REQ_PREFLUSH|REQ_FUA writes),
# each epoch ended by an fsync of the devices and a log mark, every sixth
# by a sync run (40 operations at queue depth 1, each followed by
# fdatasync, an empty flush at an idle table, or half the writes FUA, and
# a mark: the workload fails unless some of those flushes were committed
# by an express lane and some FUA writes took the fast path, status
# express_flushes and fast_fua); it merges mid into base (merge_backward at depth 1; mid
# opened read-write, so its clusters move) while writing, grows grow.qcow2's refcount table, takes a snapshot by reload
# (new overlay over.qcow2) and writes on. Every completed operation is
# recorded with its data's seed and sha256.
#
# Then the log is replayed (dmq_replay.py) to crash states: the prefix at
# every FLUSH/FUA entry and every mark (sampled evenly when they are more
# than half the budget) and random entries with a seeded random subset of
# the writes since the last FLUSH/FUA (a disk cache may persist any subset).
# In each state: mount (journal replay), umount, fsck -fn clean; mounted
# read-only, `qemu-img check` of every image without corruption (leaks
# allowed: rc 3); fresh read-only tables read, per 512-byte sector, what
# was fsync'ed before the last mark (and the FUA writes marked before the
# state), or the data of an operation issued
# before the next mark, or what was there before; mid.qcow2 and base.qcow2
# unchanged until the merge started and base<-mid reading as before the
# merge from then on (every byte in one of the two); top.qcow2 unchanged after the reload; the internal
# snapshot s1 intact; the ext4 of fs.qcow2, through fresh tables over an
# overlay, mounts (journal replay), holds every file fsync'ed before the
# last mark, and fscks clean.
#
# usage: qcow2_crash.sh [-l] [CASE...]
# DMQ_CRASH_STATES=N  crash states per file system, read through the target
#                     (default 30; the host checks 200 more of the same
#                     log natively in make check: tools/check.sh)
# DMQ_CRASH_SEED=S    seed of the workload and of the states (default:
#                     from the clock; printed)
# DMQ_CRASH_EPOCHS=N  workload epochs before the merge (default 12)
# DMQ_CRASH_EXPORT=D  copy the log and the workload's record to D/FS/ for
#                     a host-side check (dmq_crash.py check --reader qemu)

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

CRASH_STATES=${DMQ_CRASH_STATES:-30}
CRASH_SEED=${DMQ_CRASH_SEED:-$(($(date +%s%N) / 1000 % 1000000))}
CRASH_EPOCHS=${DMQ_CRASH_EPOCHS:-12}
DATA_SIZE=600M		# the file system's disk (sparse, on the tmpfs)
LOG_SIZE=1536M		# the log (sparse)
LOOPS=()		# loop devices of the current case
MNT=			# the file system under test, while the workload runs
LW=			# the log-writes device
WORK=			# disk, log and crash states (on a tmpfs)
DMQ_CASE_OK=0

# the qcow2 tables hold files on the mount, the mount holds the log-writes
# device, which holds the loop devices
crash_detach() {
	local l n
	"$DMSETUP" ls 2>/dev/null | while read -r n _; do
		case "$n" in
		"$LW") ;;
		"$DMQ_PREFIX"*) "$DMSETUP" remove --retry "$n" >/dev/null 2>&1 ;;
		esac
	done
	[ -n "$MNT" ] && umount "$MNT" 2>/dev/null
	[ -n "$LW" ] && "$DMSETUP" remove --retry "$LW" >/dev/null 2>&1
	for l in "${LOOPS[@]}"; do
		losetup -d "$l" 2>/dev/null
	done
	LOOPS=()
}

crash_cleanup() {
	crash_detach
	if [ -n "$WORK" ] && { [ "${DMQ_KEEP:-0}" != 1 ] || [ "$DMQ_CASE_OK" = 1 ]; }; then
		rm -rf "$WORK"
	fi
}

# crash_case FS: the whole test on file system FS (ext4|xfs)
crash_case() {
	local fs=$1 data logdev m i rc t
	need losetup mount umount mkfs.ext4 fsck.ext4
	case $fs in
	ext4) need mkfs.ext4 fsck.ext4 ;;
	xfs) need mkfs.xfs xfs_repair ;;
	esac
	grep -qw "$fs" /proc/filesystems || modprobe "$fs" 2>/dev/null
	grep -qw "$fs" /proc/filesystems || dmq_skip "no $fs in this kernel"
	t=$("$DMSETUP" targets 2>/dev/null)
	grep -q '^log-writes' <<<"$t" || modprobe dm-log-writes 2>/dev/null
	t=$("$DMSETUP" targets 2>/dev/null)
	grep -q '^log-writes' <<<"$t" || dmq_skip "no log-writes target"
	echo "seed $CRASH_SEED (DMQ_CRASH_SEED), $CRASH_STATES crash states (DMQ_CRASH_STATES)"
	trap crash_cleanup EXIT
	MNT=$DMQ_CASE_DIR/mnt
	mkdir -p "$MNT"
	# the disk, the log and the crash states on the tmpfs under the
	# scratch file system (lib.sh), not on it
	WORK=${DMQ_BACKING:-$DMQ_CASE_DIR}/crash-$fs
	mkdir -p "$WORK" || dmq_fail "mkdir $WORK"
	dmq_run truncate -s "$DATA_SIZE" "$WORK/data.img"
	dmq_run truncate -s "$LOG_SIZE" "$WORK/log.img"
	data=$(losetup -f --show "$WORK/data.img") || dmq_fail "losetup data.img"
	LOOPS+=("$data")
	logdev=$(losetup -f --show "$WORK/log.img") || dmq_fail "losetup log.img"
	LOOPS+=("$logdev")
	LW=$(dmq_full_name lw)
	dmq_run "$DMSETUP" create "$LW" --table \
		"0 $(blockdev --getsz "$data") log-writes $data $logdev"
	i=0
	until [ -b "/dev/mapper/$LW" ] || [ $i -ge 20 ]; do
		"$DMSETUP" mknodes "$LW" >/dev/null 2>&1
		sleep 0.1
		i=$((i + 1))
	done
	# a default mkfs (it discards the whole device first)
	case $fs in
	ext4) dmq_run mkfs.ext4 -q -F "/dev/mapper/$LW" ;;
	xfs) dmq_run mkfs.xfs -q -f "/dev/mapper/$LW" ;;
	esac
	dmq_run "$DMSETUP" message "$LW" 0 mark dmq-mkfs
	echo "$(date +%T) mkfs.$fs done"
	dmq_run mount -t "$fs" "/dev/mapper/$LW" "$MNT"
	# the images are made on the tmpfs (qemu-img's many small writes are
	# slow through the log), then copied onto the file system
	mkdir -p src
	(
		cd src || exit 1
		dmq_img_create base.qcow2 32M cluster_size=64k
		dmq_write base.qcow2 t:0:4M r:4M+512:3M P0x5a:9M+3k:100k \
			ct:12M:256k r:16M:6M z:18M:1M t:24M+100:5M P0xa5:30M:2M
		dmq_img_create mid.qcow2 32M cluster_size=64k base.qcow2
		dmq_write mid.qcow2 r:2M:1M t:8M+3k:2M z:17M:256k P0x33:20M:2M \
			r:29M+512:1M
		dmq_img_create top.qcow2 32M cluster_size=64k mid.qcow2
		# the preallocated file ends just under 1 GiB, what one
		# refcount-table cluster covers with 4k clusters and 64-bit
		# refcounts: the copy-on-write allocations away from the
		# snapshot move the table
		dmq_run "$QEMU_IMG" create -q -f qcow2 \
			-o cluster_size=4k,refcount_bits=64,preallocation=metadata \
			grow.qcow2 1018M
		dmq_write grow.qcow2 P0x11:0:4M
		dmq_run "$QEMU_IMG" snapshot -c s1 grow.qcow2
		dmq_img_create fs.qcow2 64M cluster_size=64k
		dmq_check_images base.qcow2 mid.qcow2 top.qcow2 grow.qcow2
		dmq_run "$QEMU_IMG" convert -f qcow2 -O raw top.qcow2 ../c0.raw
		dmq_run "$QEMU_IMG" convert -f qcow2 -O raw mid.qcow2 ../mid0.raw
	) || exit
	echo "$(date +%T) images made"
	m=$MNT
	dmq_run cp --sparse=always src/base.qcow2 src/mid.qcow2 src/top.qcow2 \
		src/grow.qcow2 src/fs.qcow2 "$m/"
	dmq_run sync -f "$m"
	rm -rf src
	echo "$(date +%T) images copied onto $fs"
	"$PYTHON" "$DMQ_DIR/dmq_crash.py" workload state.json --mnt "$m" \
		--lw "$LW" --prefix "$DMQ_PREFIX" --workdir "$DMQ_CASE_DIR" \
		--c-initial c0.raw --mid-view mid0.raw --seed "$CRASH_SEED" \
		--epochs "$CRASH_EPOCHS" --verbose || dmq_fail "the workload failed"
	echo "$(date +%T) workload done"
	dmq_run umount "$MNT"
	dmq_run "$DMSETUP" remove --retry "$LW"
	LW=
	crash_detach
	echo "log: $(du -h "$WORK/log.img" | cut -f1), disk: $(du -h "$WORK/data.img" | cut -f1)"
	rm -f "$WORK/data.img"
	# the host checks many more states natively (tools/check.sh, qemu-img
	# as the reader): hand it the log and the workload's record
	if [ -n "${DMQ_CRASH_EXPORT:-}" ]; then
		local x=$DMQ_CRASH_EXPORT/$fs
		mkdir -p "$x" &&
			cp state.json c0.raw mid0.raw "$x/" &&
			cp --sparse=always "$WORK/log.img" "$x/" &&
			echo "$CRASH_SEED" >"$x/seed" &&
			dmq_size "$DATA_SIZE" >"$x/dev-size" ||
			dmq_fail "exporting the log to $x"
	fi
	"$PYTHON" "$DMQ_DIR/dmq_crash.py" check state.json "$WORK/log.img" \
		--work "$WORK" --prefix "$DMQ_PREFIX" \
		--dev-size "$(dmq_size "$DATA_SIZE")" --fs "$fs" \
		--states "$CRASH_STATES" --seed "$CRASH_SEED"
	rc=$?
	[ "$rc" -eq 0 ] || dmq_fail "crash states failed (seed $CRASH_SEED)"
	DMQ_CASE_OK=1
}

case_ext4() { crash_case ext4; }
case_xfs() { crash_case xfs; }

# xfs runs where xfsprogs is installed (a skipped case fails CI)
DMQ_CASES=(ext4)
command -v mkfs.xfs >/dev/null 2>&1 && DMQ_CASES+=(xfs)

dmq_main "$@"
