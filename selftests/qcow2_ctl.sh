#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 control plane: the messages (get_img_name/get_img_id/
# get_img_fd, get_errors, get_event, set_fault_injection, their argument
# errors, CAP_SYS_ADMIN, EBUSY while suspended), the `dmsetup status` line
# (and its per-delta cluster counts), fault injection (reads and writes
# fail, acknowledged data survives, random faults leave no corruption),
# ENOSPC on the host file system (writes wait, an event is raised, they
# complete once there is space), suspend/resume under fio, and a snapshot
# taken by suspending, adding an overlay with qemu-img and reloading the
# table.
#
# usage: qcow2_ctl.sh [-l] [CASE...]

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

FIO=${FIO:-fio}
MIB=$((1 << 20))
DEV=				# the mapped device (map_rw)
MSG_OUT=			# output of the last msg_ok
BG_PIDS=()			# background jobs stopped when the case ends
UDEV_QUIET=			# fast_count's udev rule is in place
UDEV_RULE=/run/udev/rules.d/59-dmq-selftest-nowatch-$$.rules # udev_quiet's

# ------------------------------------------------------------ messages

# expect_output NAME TEXT WORD...: the message prints exactly TEXT
# ('' for nothing at all)
expect_output() {
	local name=$1 text=$2
	shift 2
	msg "$name" "$@" >msg.out || { cat msg.err; dmq_fail "message '$*' failed"; }
	if ! printf "%s" "$text" | cmp -s - msg.out; then
		echo "got:"
		od -c msg.out | head -n 8
		dmq_fail "message '$*': expected '$text'"
	fi
}

ERRORS_OK=$'wants_check=0\nmd_writeback_error=0\ntruncate_error=0\n'


# merge_idle NAME: merge_backward progress says nothing is running
merge_idle() {
	msg_ok "$1" merge_backward progress
	[[ $MSG_OUT =~ ^merge=none\ (depth=[0-9]+\ )?stage=none($|\ ) ]] ||
		dmq_fail "merge_backward progress: '$MSG_OUT'"
}

# expect_chain NAME IMG...: the table has these images, base first
expect_chain() {
	local name=$1 i=0 img n
	shift
	n=$(chain_len "$name") || dmq_fail "dmsetup table $name"
	[ "$n" = $# ] || dmq_fail "dmsetup table: $n images, expected $#"
	for img in "$@"; do
		expect_output "$name" "$(readlink -f "$img")"$'\n' get_img_name "$i"
		i=$((i + 1))
	done
	expect_output "$name" '' get_img_name "$i"
	echo "chain ($n): $*"
}

# ------------------------------------------------------------- devices

# map_rw SPEC...: writable table "v"; its node in DEV
map_rw() {
	dmq_create v --rw "$@" || dmq_fail "dmsetup create --rw failed for $*"
	DEV=$(dmq_dev v) || dmq_fail "no device node"
	[ "$(blockdev --getro "$DEV")" = 0 ] || dmq_fail "$DEV is read-only"
}

# expect_at DEV OFFSET FILE: DEV holds FILE at OFFSET (O_DIRECT read)
expect_at() {
	local n
	n=$(stat -c %s "$3")
	dd if="$1" of=got.bin bs=4k skip=$(($2 / 4096)) count=$((n / 4096)) \
		iflag=direct status=none || dmq_fail "read of $1 at $2 failed"
	cmp got.bin "$3" || dmq_fail "$1 at $2 does not hold $3"
	rm -f got.bin
}

# patch_into FILE OFFSET DATA: write DATA into FILE at OFFSET
patch_into() {
	dmq_run dd if="$3" of="$1" bs=4k seek=$(($2 / 4096)) conv=notrunc status=none
}

# on_exit: resume the device (a failed case may leave it suspended, with
# I/O queued) and stop the background jobs
on_exit() {
	local p
	"$DMSETUP" resume "$(dmq_full_name v)" >/dev/null 2>&1
	for p in "${BG_PIDS[@]}"; do
		kill "$p" 2>/dev/null
		wait "$p" 2>/dev/null
	done
}

# mk_chain3: base.qcow2 < mid.qcow2 < top.qcow2, 16 MiB, 64k clusters
mk_chain3() {
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:2M r:4M+512:1M P0x11:8M:1M
	dmq_img_create mid.qcow2 16M cluster_size=64k base.qcow2
	dmq_write mid.qcow2 r:1M:256k z:8M+64k:64k t:12M:1M
	dmq_img_create top.qcow2 16M cluster_size=64k mid.qcow2
	dmq_write top.qcow2 P0x22:64k:64k t:3M+3k:5k
}

# mk_chain2: base.qcow2 < top.qcow2, 16 MiB, 64k clusters
mk_chain2() {
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:4M r:4M:4M
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 P0x22:64k:64k r:12M+512:8k
}

# -------------------------------------------------------------- messages

case_messages() {
	local i img cmd
	mk_chain3
	dmq_check_images base.qcow2 mid.qcow2 top.qcow2
	convert top.qcow2 before.raw
	map_rw base.qcow2 mid.qcow2 top.qcow2
	expect_chain v base.qcow2 mid.qcow2 top.qcow2
	i=0
	for img in base.qcow2 mid.qcow2 top.qcow2; do
		expect_output v "$(readlink -f "$img")"$'\n' get_img_id "$i"
		msg_ok v get_img_fd "$i"
		[[ $MSG_OUT =~ ^[0-9]+$ ]] || dmq_fail "get_img_fd $i: '$MSG_OUT'"
		echo "get_img_fd $i: $MSG_OUT"
		i=$((i + 1))
	done
	for cmd in get_img_name get_img_id; do
		expect_output v '' "$cmd" 3
		expect_output v '' "$cmd" 99
		expect_msg_err v EINVAL "$cmd" abc
		expect_msg_err v EINVAL "$cmd" 1x
		expect_msg_err v EINVAL "$cmd"
	done
	# an unknown id: empty output and success (the C target)
	expect_output v '' get_img_fd 3
	expect_output v '' get_img_fd 99

	expect_output v "$ERRORS_OK" get_errors
	expect_output v '' get_event

	expect_msg_err v EINVAL set_fault_injection 2 100001
	expect_msg_err v EINVAL set_fault_injection 2 abc
	expect_msg_err v EINVAL set_fault_injection 2 -1
	expect_msg_err v ENOENT set_fault_injection 9 0
	expect_msg_err v ENOENT set_fault_injection 3 0
	msg_ok v set_fault_injection 2 0
	msg_ok v set_fault_injection 0 100000
	msg_ok v set_fault_injection 0 0

	expect_msg_err v ENOTTY foo
	expect_msg_err v ENOTTY get_img_names 0
	expect_msg_err v ENOTTY GET_ERRORS
	# dmsetup says "No message supplied." and sends an empty one
	expect_msg_err v EINVAL
	merge_idle v

	dump "$DEV" dev.raw
	same before.raw dev.raw "the device does not read like the chain"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 mid.qcow2 top.qcow2
}

# Hostile arguments: numbers outside every type's range, negative where
# unsigned, signs, extra words. Each message is refused cleanly (an
# overflowing depth used to panic with the state mutex held; dmq_run_case
# fails the case on any oops), nothing changes, and the device, its
# messages and a merge still work afterwards.
case_message_args() {
	local w argv
	mk_chain2
	convert top.qcow2 before.raw
	trap on_exit EXIT
	map_rw rw:base.qcow2 top.qcow2
	# depths that are numbers but have no delta below (above): ENOENT,
	# as the C target
	for w in "merge_backward start -1 18446744073709551615" \
		"merge_backward start -1 18446744073709551614" \
		"merge_backward start -1 9223372036854775808" \
		"merge_backward start -1 +18446744073709551615" \
		"merge_backward start -1 1" \
		"merge_forward start -1 18446744073709551615" \
		"merge_forward start -1 9223372036854775807" \
		"merge_forward start -1 2"; do
		read -ra argv <<<"$w"
		expect_msg_err v ENOENT "${argv[@]}"
	done
	for w in "merge_backward start -1 18446744073709551616" \
		"merge_backward start -1 99999999999999999999999999" \
		"merge_backward start -1 -1" \
		"merge_backward start -1 -18446744073709551615" \
		"merge_forward start -1 -1" \
		"merge_backward start 2147483648 0" \
		"merge_backward start -2147483649 0" \
		"merge_backward start 99999999999999999999 0" \
		"merge_backward start -1 0 0" \
		"merge_backward progress 0" \
		"merge_backward complete 18446744073709551615" \
		"merge_forward cancel x" \
		"set_fault_injection 18446744073709551616 0" \
		"set_fault_injection 0 4294967296" \
		"set_fault_injection 0 4294967295" \
		"set_fault_injection 0 18446744073709551615" \
		"set_fault_injection 0 -100000" \
		"set_fault_injection -1 0" \
		"set_fault_injection 0 0 0" \
		"set_fault_injection 0" \
		"get_img_name 18446744073709551616" \
		"get_img_name -1" \
		"get_img_name 0 0" \
		"get_img_fd 18446744073709551616" \
		"get_img_fd -1" \
		"get_errors 0" \
		"get_event x"; do
		read -ra argv <<<"$w"
		expect_msg_err v EINVAL "${argv[@]}"
	done
	# in range for their type but naming nothing
	expect_msg_err v EBADF merge_backward start 2147483647 0
	expect_msg_err v EBADF merge_backward start -2147483648 0
	expect_msg_err v ENOENT set_fault_injection 18446744073709551615 0
	expect_output v '' get_img_fd 18446744073709551615
	expect_output v '' get_img_name 18446744073709551615
	merge_idle v
	expect_output v "$ERRORS_OK" get_errors
	msg_ok v set_fault_injection 1 0

	# the device still works: reads, a copy-on-write, a merge
	dump "$DEV" dev.raw
	same before.raw dev.raw "the device changed"
	random w.bin 4k
	put w.bin "$DEV" $((4 * MIB + 8192))
	expect_at "$DEV" $((4 * MIB + 8192)) w.bin
	msg_ok v merge_backward start -1 0
	dmq_wait_ready v merge_backward
	msg_ok v merge_backward complete
	expect_chain v base.qcow2
	expect_at "$DEV" $((4 * MIB + 8192)) w.bin
	dump "$DEV" dev.raw
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2
	convert base.qcow2 base.raw
	same dev.raw base.raw "qemu-img convert of base.qcow2 differs from the device"
}

# A message through a DM_TARGET_MSG ioctl whose buffer is 8 MiB (dm-ioctl
# takes up to 1 GiB): the target's own output buffer is as large, and a
# kmalloc of it warned (order above MAX_PAGE_ORDER); the answer must come
# back whole, and the kernel log stays clean (the runner checks).
case_message_big_buffer() {
	local want got
	mk_chain2
	trap on_exit EXIT
	map_rw base.qcow2 top.qcow2
	want=$(readlink -f base.qcow2)
	got=$(python3 - "$(dmq_full_name v)" <<'PY'
import fcntl, os, struct, sys
HDR = 312                                   # struct dm_ioctl
SIZE = HDR + (8 << 20)
TARGET_MSG = (3 << 30) | (HDR << 16) | (0xfd << 8) | 14
DATA_OUT = 1 << 16
buf = bytearray(SIZE)
# version 4.0.0, data_size, data_start; name at 48; then struct
# dm_target_msg: sector 0 (the zeroed buffer's), the message
struct.pack_into("=3III", buf, 0, 4, 0, 0, SIZE, HDR)
buf[48:48 + len(sys.argv[1])] = sys.argv[1].encode()
msg = b"get_img_id 0\0"
buf[HDR + 8:HDR + 8 + len(msg)] = msg
fd = os.open("/dev/mapper/control", os.O_RDWR)
fcntl.ioctl(fd, TARGET_MSG, buf)
flags, start = struct.unpack_from("=I", buf, 28)[0], struct.unpack_from("=I", buf, 16)[0]
if not flags & DATA_OUT:
    sys.exit("no output flagged")
print(buf[start:buf.index(b"\0", start)].decode(), end="")
PY
	) || dmq_fail "the DM_TARGET_MSG ioctl failed"
	[ "$got" = "$want" ] || dmq_fail "get_img_id 0 through an 8 MiB buffer: '$got', want '$want'"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
}

# Every message without CAP_SYS_ADMIN: as nobody, and as root without
# capabilities. Device-mapper refuses the ioctl (EACCES) before the target
# could (EPERM); either way nothing may happen.
case_nonroot() {
	local who words w a argv out rc n=0
	need setpriv
	mk_chain2
	convert top.qcow2 before.raw
	map_rw rw:base.qcow2 top.qcow2
	words=("get_img_name 0" "get_img_id 1" "get_img_fd 0" "get_errors"
		"get_event" "set_fault_injection 1 100000"
		"set_fault_injection 0 100000" "merge_backward start -1 0"
		"merge_backward progress" "merge_backward complete"
		"merge_backward cancel" "merge_forward start -1 1" "foo")
	for who in nobody nocaps; do
		if [ "$who" = nobody ]; then
			a=(--reuid=65534 --regid=65534 --clear-groups --inh-caps=-all)
		else
			a=(--inh-caps=-all --bounding-set=-all)
		fi
		for w in "${words[@]}"; do
			read -ra argv <<<"$w"
			out=$(setpriv "${a[@]}" "$DMSETUP" message "$(dmq_full_name v)" 0 \
				-- "${argv[@]}" 2>msg.err)
			rc=$?
			[ "$rc" -ne 0 ] || dmq_fail "$who: message '$w' succeeded"
			[ -z "$out" ] || dmq_fail "$who: message '$w' printed '$out'"
			if ! grep -qE 'Operation not permitted|Permission denied' msg.err; then
				cat msg.err
				dmq_fail "$who: message '$w': no EPERM/EACCES"
			fi
			n=$((n + 1))
		done
		echo "$who: ${#words[@]} messages refused ($(grep -oE 'Operation not permitted|Permission denied' msg.err | head -n 1))"
	done
	merge_idle v
	expect_output v "$ERRORS_OK" get_errors
	# no fault injection got through: every read works
	dump "$DEV" dev.raw
	same before.raw dev.raw "the device changed"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	echo "$n refused messages had no effect"
}

# set_fault_injection and merge start/complete are EBUSY while suspended;
# the other messages answer
case_suspended_busy() {
	mk_chain2
	convert top.qcow2 before.raw
	trap on_exit EXIT
	map_rw rw:base.qcow2 top.qcow2
	dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
	expect_msg_err v EBUSY merge_backward start -1 0
	expect_msg_err v EBUSY merge_forward start -1 1
	expect_msg_err v EBUSY merge_backward complete
	expect_msg_err v EBUSY merge_forward complete
	# unknown messages are EBUSY while suspended; get_img_name and
	# set_fault_injection work (the C target)
	expect_msg_err v EBUSY foo
	expect_msg_err v EBUSY get_img_names 0
	msg_ok v set_fault_injection 1 0
	msg_ok v set_fault_injection 0 0
	merge_idle v
	expect_output v "$(readlink -f top.qcow2)"$'\n' get_img_name 1
	expect_output v "$ERRORS_OK" get_errors
	dmq_run "$DMSETUP" resume "$(dmq_full_name v)"
	echo "resumed: a merge starts now"
	msg_ok v merge_backward start -1 0
	dmq_wait_ready v merge_backward
	msg_ok v merge_backward cancel
	merge_idle v
	msg_ok v set_fault_injection 1 0
	expect_chain v base.qcow2 top.qcow2
	dump "$DEV" dev.raw
	same before.raw dev.raw "the device changed"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
}

# ----------------------------------------------------------------- status

# status NAME: `dmsetup status` in STATUS, checked against
#   0 <len> qcow2 images=<n> wants_check=<0|1> md_writeback_error=<errno>
#   truncate_error=<errno> enospc=<n> merge=<kind> stage=<stage>
#   progress=<pct> clusters=<c0>,...,<cn-1> fast_bios=<n> express_flushes=<n>
#   fast_fua=<n>
# (also accepted: "depth=<d>" before stage= and "error=<errno>" after
# progress=, the fields of "merge_* progress"); the fields in ST_IMAGES
# ST_ENOSPC ST_MERGE ST_STAGE ST_PCT ST_CLUSTERS ST_FAST ST_FUA, STATUS_STD is the
# line without "0 <len> qcow2 ", depth=, error=, fast_bios=,
# express_flushes= and fast_fua=
status() {
	local full re sectors c
	full=$(dmq_full_name "$1")
	STATUS=$("$DMSETUP" status "$full") || dmq_fail "dmsetup status $full"
	re='^0 ([0-9]+) qcow2 images=([0-9]+) wants_check=([01]) md_writeback_error=(-?[0-9]+) truncate_error=(-?[0-9]+) enospc=([0-9]+) merge=(none|backward|forward) (depth=[0-9]+ )?stage=(none|copying|ready|failed) progress=([0-9]+)( error=[0-9]+)? clusters=([0-9]+(,[0-9]+)*) fast_bios=([0-9]+) express_flushes=([0-9]+) fast_fua=([0-9]+)$'
	[[ $STATUS =~ $re ]] || dmq_fail "bad status line '$STATUS'"
	sectors=${BASH_REMATCH[1]}
	ST_IMAGES=${BASH_REMATCH[2]}
	ST_ENOSPC=${BASH_REMATCH[6]}
	ST_MERGE=${BASH_REMATCH[7]}
	ST_STAGE=${BASH_REMATCH[9]}
	ST_PCT=${BASH_REMATCH[10]}
	ST_CLUSTERS=${BASH_REMATCH[12]}
	ST_FAST=${BASH_REMATCH[14]}
	ST_FUA=${BASH_REMATCH[16]}
	STATUS_STD="images=$ST_IMAGES wants_check=${BASH_REMATCH[3]} md_writeback_error=${BASH_REMATCH[4]} truncate_error=${BASH_REMATCH[5]} enospc=$ST_ENOSPC merge=$ST_MERGE stage=$ST_STAGE progress=$ST_PCT clusters=$ST_CLUSTERS"
	[ "$sectors" = $(($(blockdev --getsize64 "$DEV") / 512)) ] ||
		dmq_fail "status length $sectors is not the device's"
	[ "$ST_PCT" -le 100 ] || dmq_fail "progress above 100: '$STATUS'"
	c=${ST_CLUSTERS//[0-9]/}
	[ $((${#c} + 1)) = "$ST_IMAGES" ] ||
		dmq_fail "clusters= has not $ST_IMAGES counts: '$STATUS'"
	[ "$ST_IMAGES" = "$(chain_len "${1}")" ] ||
		dmq_fail "images=$ST_IMAGES, dmsetup table says otherwise"
}

# expect_status NAME WANT: the status line without "0 <len> qcow2 " and
# without progress=<pct> is WANT
expect_status() {
	local got
	status "$1"
	got=${STATUS_STD/ progress=$ST_PCT / }
	[ "$got" = "$2" ] || dmq_fail "status '$STATUS', expected '$2'"
	echo "status: $2"
}

# data clusters IMG itself maps (qemu-img map, depth 0)
map_clusters() {
	"$QEMU_IMG" map -U -f qcow2 --output=json "$1" | "$PYTHON" -c '
import json, sys
cs = int(sys.argv[1])
c = set()
for e in json.load(sys.stdin):
    if e.get("depth") == 0 and e.get("data"):
        c.update(range(e["start"] // cs, (e["start"] + e["length"] - 1) // cs + 1))
print(len(c))' 65536
}

# udev_quiet: no udev probe of this run's devices after a write. udevd
# watches a device-mapper device for a close after writing (the inotify
# watch of 60-persistent-storage-dm.rules) and then probes it (blkid reads
# its first and last blocks), which fast_count must not count as its CMD's;
# a rule after 55-dm.rules (which names the device) turns the watch off
# for good (":="). Holding udev's exec queue (--stop-exec-queue) instead
# once left the queue stopped: every later dmsetup create and remove of the
# VM waited for ever for udev's answer (the hang report: udevd answering
# pings, no worker, the cookies never completed).
udev_quiet() {
	[ -n "$UDEV_QUIET" ] && return 0
	mkdir -p "${UDEV_RULE%/*}" &&
		echo "SUBSYSTEM==\"block\", ENV{DM_NAME}==\"$DMQ_PREFIX*\", OPTIONS:=\"nowatch\"" \
			>"$UDEV_RULE" &&
		udevadm control --reload 2>/dev/null && UDEV_QUIET=1
}

# dmq_script_cleanup (run by lib.sh when the script ends): the rule goes
# (cases run in subshells: it outlives the case that wrote it)
dmq_script_cleanup() {
	[ -f "$UDEV_RULE" ] || return 0
	rm -f "$UDEV_RULE"
	udevadm control --reload 2>/dev/null
	return 0
}

# fast_count NAME up|same WHAT CMD...: runs CMD; the target's fast_bios must
# go up, or stay the same (without counters, CMD only)
fast_count() {
	local name=$1 want=$2 what=$3 f0
	shift 3
	if ! dmq_counts_bios; then
		"$@"
		return 0
	fi
	# udev's probes (of the device's creation, or after a write: see
	# udev_quiet) must not count as CMD's
	udev_quiet
	udevadm settle 2>/dev/null
	status "$name"
	f0=$ST_FAST
	"$@"
	status "$name"
	case $want in
	up) [ "$ST_FAST" -gt "$f0" ] || dmq_fail "fast_bios $f0 -> $ST_FAST: $what did not take the fast path" ;;
	same) [ "$ST_FAST" = "$f0" ] || dmq_fail "fast_bios $f0 -> $ST_FAST: $what took the fast path" ;;
	esac
	echo "fast_bios $f0 -> $ST_FAST after $what"
}

# two 4k direct reads at OFFSET (the first may fill the table), then one
read_twice() {
	dmq_run dd if="$DEV" of=/dev/null bs=4k count=2 skip="$1" iflag=direct,skip_bytes status=none
	dmq_run dd if="$DEV" of=/dev/null bs=4k count=1 skip="$1" iflag=direct,skip_bytes status=none
}

# fio reading the device at random, 4k at queue depth 32 in two jobs, and
# checking every block is zeroes (zero_stream, bg_zero_start)
ZERO_READS=(--direct=1 --ioengine=libaio --rw=randwrite --verify_only=1 --verify=pattern
	--verify_pattern=0 --bs=4k --iodepth=32 --numjobs=2 --name=z)

# zero_stream OFFSET SIZE: SIZE bytes at OFFSET read (ZERO_READS) once
zero_stream() {
	"$FIO" --output=fio-z.log --filename="$DEV" --offset="$1" --size="$2" "${ZERO_READS[@]}" ||
		{ cat fio-z.log; dmq_fail "a read of a hole is not zeroes"; }
}

# dump4k DEV FILE: DEV into FILE, 4k direct reads (one cluster each)
dump4k() {
	dmq_run dd if="$1" of="$2" bs=4k iflag=direct status=none
}

# fast_reads NAME OFFSET up|same: reads at OFFSET (read_twice)
fast_reads() { fast_count "$1" "$3" "reads at $2" read_twice "$2"; }

# fast_write NAME FILE OFFSET up|same: FILE written at OFFSET (put)
fast_write() { fast_count "$1" "$4" "a write at $3" put "$2" "$DEV" "$3"; }

case_status_info() {
	local idle='wants_check=0 md_writeback_error=0 truncate_error=0 enospc=0 merge=none stage=none'
	# 16 + 8 data clusters of 64k in the base, an empty top
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:1M r:4M:512k
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	map_rw rw:base.qcow2 top.qcow2
	status v
	echo "status: $STATUS"
	expect_status v "images=2 $idle clusters=24,0"
	random w5.bin 320k
	random w1.bin 4k
	random w2.bin 64k
	# five new clusters at 8M
	put w5.bin "$DEV" $((8 * MIB))
	expect_status v "images=2 $idle clusters=24,5"
	# 4k into a new cluster: one more
	put w1.bin "$DEV" $((12 * MIB + 4096))
	expect_status v "images=2 $idle clusters=24,6"
	# over a cluster the top has: no more
	put w2.bin "$DEV" $((8 * MIB))
	expect_status v "images=2 $idle clusters=24,6"
	# 4k into a cluster of the base: copied up
	put w1.bin "$DEV" 65536
	expect_status v "images=2 $idle clusters=24,7"
	# reads of a cluster the top has: the second one at least takes the
	# fast path (the first lookup may fill its table)
	fast_reads v $((8 * MIB + 4096)) up
	# so do reads of a cluster only the base has (the table learns where
	# the chain shows it from)
	fast_reads v $((4 * MIB)) up

	# a merge shows in the status; after complete the base has 24 + 6
	msg_ok v merge_backward start -1 0
	status v
	echo "status: $STATUS"
	[ "$ST_MERGE" = backward ] || dmq_fail "merge=$ST_MERGE during a merge"
	case $ST_STAGE in copying | ready) ;; *) dmq_fail "stage=$ST_STAGE" ;; esac
	dmq_wait_ready v merge_backward
	status v
	echo "status: $STATUS"
	[ "$ST_MERGE $ST_STAGE $ST_PCT" = "backward ready 100" ] ||
		dmq_fail "ready merge: '$STATUS'"
	# ready: the top's clusters were moved into the base; reads there
	# resolve from the base, and its clusters are served from then on
	fast_reads v $((8 * MIB + 4096)) up
	msg_ok v merge_backward complete
	expect_status v "images=1 $idle clusters=30"
	# the new top (the base) is served again
	fast_reads v $((8 * MIB + 4096)) up
	fast_reads v $((4 * MIB)) up
	dump "$DEV" dev.raw
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	[ "$(map_clusters base.qcow2)" = 30 ] || dmq_fail "qemu-img map: base.qcow2 has $(map_clusters base.qcow2) clusters"
	# the merge moved the top's clusters into the base
	[ "$(map_clusters top.qcow2)" = 0 ] || dmq_fail "qemu-img map: top.qcow2 has $(map_clusters top.qcow2) clusters"
	convert base.qcow2 base.raw
	same dev.raw base.raw "qemu-img convert of base.qcow2 differs from the device"
}

# While a merge runs the fast path serves reads of clusters the top
# maps, not writes (the merge must see them); what the device shows stays
# what QEMU reads of the chain.
case_fast_during_merge() {
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:1M r:4M:512k
	dmq_img_create mid.qcow2 16M cluster_size=64k base.qcow2
	dmq_write mid.qcow2 r:4M:128k r:6M:64k
	dmq_img_create top.qcow2 16M cluster_size=64k mid.qcow2
	dmq_write top.qcow2 r:8M:256k
	map_rw rw:base.qcow2 mid.qcow2 top.qcow2
	fast_reads v $((8 * MIB + 4096)) up
	# the control: without a merge a write in place takes the fast path
	random w.bin 4k
	fast_write v w.bin $((8 * MIB + 8192)) up
	msg_ok v merge_backward start -1 1
	dmq_wait_ready v merge_backward
	# the top is not merged: its clusters stay served without the worker
	fast_reads v $((8 * MIB + 4096)) up
	# a write in place takes the locked path while the merge runs
	random w.bin 4k
	fast_write v w.bin $((8 * MIB + 8192)) same
	expect_at "$DEV" $((8 * MIB + 8192)) w.bin
	dump "$DEV" before.raw
	merge_done v merge_backward 2
	fast_reads v $((8 * MIB + 4096)) up
	dump "$DEV" dev.raw
	same dev.raw before.raw "the device changed with the merge's completion"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	convert top.qcow2 top.raw
	same dev.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
}

# Reads of clusters only a lower delta maps take the fast path too (its
# table learns which delta shows them, a whole L2 page of them where no
# delta above maps any); a first write into such a cluster,
# a write-zeroes and a discard of one, a backward merge of the delta they
# come from (copying into the base's holes, dropping what it moved) and a
# forward merge into the top each change an L2 entry of the cluster, and
# the entry is forgotten before they do: every read right after shows the
# new data, with fio reading the same clusters beside, and the device
# shows what QEMU reads of the chain.
# merge_done NAME KIND N: `KIND complete` for NAME; its chain then has N
# images
merge_done() {
	msg_ok "$1" "$2" complete
	[ "$(chain_len "$1")" = "$3" ] || dmq_fail "the chain has $(chain_len "$1") images after the merge"
}

# bg_reads_start SIZE: fio's 4k random reads of the device's first SIZE in
# the background (until bg_reads_stop); w.bin (4k of random data) and
# zero.bin (64k of zeroes) for the writes beside them
bg_reads_start() {
	"$FIO" --output=fio-bg.log --filename="$DEV" --direct=1 \
		--ioengine=libaio --rw=randread --bs=4k --iodepth=8 --size="$1" \
		--time_based --runtime=600 --name=r &
	BG_PIDS+=($!)
	random w.bin 4k
	: >zero.bin
	truncate -s 64k zero.bin
}

# bg_zero_start OFFSET SIZE: as zero_stream, over and over in the background
# until bg_reads_stop
bg_zero_start() {
	"$FIO" --output=fio-bg.log --filename="$DEV" --offset="$1" --size="$2" \
		"${ZERO_READS[@]}" --loops=1000000 &
	BG_PIDS+=($!)
}

# bg_reads_stop: the reads of bg_reads_start or bg_zero_start end; none may
# have failed
bg_reads_stop() {
	kill "${BG_PIDS[0]}" 2>/dev/null
	wait "${BG_PIDS[0]}" 2>/dev/null
	BG_PIDS=()
	grep -qEi 'err= *[1-9]' fio-bg.log && { cat fio-bg.log; dmq_fail "fio's reads failed"; }
	return 0
}

case_fast_below() {
	local k off
	need "$FIO"
	# the base has holes under the middle delta's 4M-5M (the backward
	# merge copies into them) and 8M-16M unwritten (zeroes: no entry)
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 r:0:4M r:5M:3M
	dmq_img_create mid.qcow2 16M cluster_size=64k base.qcow2
	dmq_write mid.qcow2 r:4M:1M
	dmq_img_create top.qcow2 16M cluster_size=64k mid.qcow2
	trap on_exit EXIT
	map_rw rw:base.qcow2 rw:mid.qcow2 top.qcow2
	# a cluster only the base shows, one the middle delta shows
	fast_reads v $((1 * MIB)) up
	fast_reads v $((4 * MIB + 4096)) up
	# nothing above maps them (the top has no L2 table, the middle delta's
	# has zero entries there): a lookup put the other clusters of the
	# delta's L2 page in too, so a first read of one takes the fast path
	fast_count v up "a first read at 3.5M" dmq_run dd if="$DEV" of=/dev/null \
		bs=4k count=1 skip=$((3 * 256 + 128 + 1)) iflag=direct status=none
	fast_count v up "a first read at 4.5M" dmq_run dd if="$DEV" of=/dev/null \
		bs=4k count=1 skip=$((4 * 256 + 128 + 1)) iflag=direct status=none
	# readers of the first 8M (what the writes below change) all along
	bg_reads_start 8M
	for k in $(seq 0 23); do
		# a cluster of the base (16-31: 1M-2M) or of the middle delta
		# (64-71: 4M-4.5M), read (its entry put) then written
		off=$(((k < 16 ? 16 + k : 48 + k) * 65536))
		read_twice "$off"
		put w.bin "$DEV" $((off + 8192))
		expect_at "$DEV" $((off + 8192)) w.bin
	done
	for k in $(seq 0 7); do
		# write-zeroes (40-47: 2.5M-3M), and a discard (80-87: 5M-5.5M),
		# of a cluster of the base read before: zeroes in the top (v3)
		off=$(((40 + k) * 65536))
		read_twice "$off"
		dmq_run blkdiscard -z -o "$off" -l 65536 "$DEV"
		expect_at "$DEV" "$off" zero.bin
		off=$(((80 + k) * 65536))
		read_twice "$off"
		dmq_run blkdiscard -o "$off" -l 65536 "$DEV"
		expect_at "$DEV" "$off" zero.bin
	done
	bg_reads_stop
	# the middle delta merged back into the base: its clusters are copied
	# into the base's holes and dropped from it; reads of them (4.625M,
	# not written above) and of the base's own (2M) keep the fast path
	# while the device stays the same
	dump "$DEV" before.raw
	fast_reads v $((4 * MIB + 655360)) up
	msg_ok v merge_backward start -1 1
	dmq_wait_ready v merge_backward
	fast_reads v $((4 * MIB + 655360)) up
	fast_reads v $((2 * MIB + 4096)) up
	dump "$DEV" ready.raw
	same ready.raw before.raw "the device changed with the backward merge"
	merge_done v merge_backward 2
	fast_reads v $((4 * MIB + 655360)) up
	dump "$DEV" dev.raw
	same dev.raw before.raw "the device changed with the backward merge's completion"
	# the base merged forward into the top: the copies into the top where
	# it had nothing replace entries pointing at the base
	fast_reads v $((3 * MIB + 4096)) up
	msg_ok v merge_forward start -1 1
	dmq_wait_ready v merge_forward
	fast_reads v $((3 * MIB + 4096)) up
	dump "$DEV" ready.raw
	same ready.raw before.raw "the device changed with the forward merge"
	merge_done v merge_forward 1
	put w.bin "$DEV" $((3 * MIB + 8192))
	expect_at "$DEV" $((3 * MIB + 8192)) w.bin
	dump "$DEV" dev.raw
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 mid.qcow2 top.qcow2
	convert top.qcow2 top.raw
	same dev.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
	put w.bin before.raw $((3 * MIB + 8192))
	same dev.raw before.raw "the device is not what it was before the merges"
}

# Reads of clusters the chain shows as zeroes (a hole in every delta, a
# zero cluster of the top over data of the base, one of the base, its
# preallocated zero clusters, past the end of a smaller base) are answered
# in `map` with zeroes (fast_bios counts them; one lookup makes the rest
# of its metadata page known); a write into such a cluster, and
# write-zeroes or a discard of a data cluster read before, show at once,
# with fio reading the same range beside; a forward merge leaves the
# device as it was; a fresh image's first read makes its whole L2 range
# known. The device, read 4k at a time (every cluster's reads by the
# zero map or the table where they know it), is what QEMU reads of the
# chain throughout.
case_fast_zero() {
	local k off
	need "$FIO"
	dmq_img_create base.qcow2 8M cluster_size=64k
	dmq_write base.qcow2 r:0:2M z:2M:1M r:3M:1M z:3M:512k
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 z:1M:512k r:12M:1M
	trap on_exit EXIT
	map_rw rw:base.qcow2 top.qcow2
	convert top.qcow2 want.raw
	for off in $((6 * MIB)) $((1 * MIB + 4096)) $((2 * MIB + 8192)) $((3 * MIB)) \
		$((10 * MIB + 4096)); do
		fast_reads v "$off" up
	done
	# first reads of other holes: in the base's page (7M) and past its end
	# (14M, from the top's page)
	fast_count v up "a first read at 7M" dmq_run dd if="$DEV" of=/dev/null \
		bs=4k count=1 skip=$((7 * 256 + 3)) iflag=direct status=none
	fast_count v up "a first read at 14M" dmq_run dd if="$DEV" of=/dev/null \
		bs=4k count=1 skip=$((14 * 256 + 5)) iflag=direct status=none
	dump4k "$DEV" dev.raw
	same dev.raw want.raw "the device differs from the chain"
	bg_reads_start 16M
	for k in $(seq 0 7); do
		# a hole everywhere, a zero cluster of the top over base data, one
		# of the base, one past the base's end: read (known zeroes), then
		# written
		for off in $(((6 * 16 + k) * 65536)) $(((16 + k) * 65536)) \
			$(((32 + k) * 65536)) $(((160 + k) * 65536)); do
			read_twice "$off"
			put w.bin "$DEV" $((off + 8192))
			expect_at "$DEV" $((off + 8192)) w.bin
			dmq_run dd if=w.bin of=want.raw bs=4k seek=$(((off + 8192) / 4096)) \
				conv=notrunc status=none
		done
		# write-zeroes of a data cluster of the top, a discard of one of
		# the base, each read before: zeroes at once
		off=$(((192 + k) * 65536))
		read_twice "$off"
		dmq_run blkdiscard -z -o "$off" -l 65536 "$DEV"
		expect_at "$DEV" "$off" zero.bin
		read_twice "$off"
		dmq_run dd if=zero.bin of=want.raw bs=64k seek=$((192 + k)) conv=notrunc status=none
		off=$(((8 + k) * 65536))
		read_twice "$off"
		dmq_run blkdiscard -o "$off" -l 65536 "$DEV"
		expect_at "$DEV" "$off" zero.bin
		read_twice "$off"
		dmq_run dd if=zero.bin of=want.raw bs=64k seek=$((8 + k)) conv=notrunc status=none
		# and a zeroed cluster written again
		put w.bin "$DEV" "$off"
		expect_at "$DEV" "$off" w.bin
		dmq_run dd if=w.bin of=want.raw bs=4k seek=$((off / 4096)) conv=notrunc status=none
	done
	bg_reads_stop
	dump4k "$DEV" dev.raw
	same dev.raw want.raw "the device differs from what was written"
	# the base merged forward into the top; reads of holes keep their path
	fast_reads v $((5 * MIB)) up
	msg_ok v merge_forward start -1 1
	dmq_wait_ready v merge_forward
	fast_reads v $((5 * MIB)) up
	dump4k "$DEV" dev.raw
	same dev.raw want.raw "the device changed with the forward merge"
	merge_done v merge_forward 1
	fast_reads v $((5 * MIB)) up
	dump4k "$DEV" dev.raw
	same dev.raw want.raw "the device changed with the forward merge's completion"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	convert top.qcow2 top.raw
	same top.raw want.raw "qemu-img convert of top.qcow2 differs from the device"
	# a fresh image (no L2 table): one read makes every cluster known
	dmq_img_create fresh.qcow2 64M cluster_size=64k
	map_rw rw:fresh.qcow2
	dmq_run dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct status=none
	fast_count v up "a first read at 40M" dmq_run dd if="$DEV" of=/dev/null \
		bs=4k count=1 skip=$((40 * 256 + 7)) iflag=direct status=none
	put w.bin "$DEV" $((40 * MIB + 4096))
	expect_at "$DEV" $((40 * MIB + 4096)) w.bin
	fast_reads v $((40 * MIB + 65536)) up
	# a stream of reads of holes (two submitters at queue depth 32) shows
	# zeroes, and the write above stays seen
	fast_count v up "a stream of reads of holes" zero_stream $((41 * MIB)) $((16 * MIB))
	# and while such a stream runs, holes read (known zeroes), written and
	# read again show what was written
	bg_zero_start $((41 * MIB)) $((16 * MIB))
	for k in $(seq 0 7); do
		off=$((58 * MIB + k * 65536 + 4096))
		read_twice "$off"
		put w.bin "$DEV" "$off"
		expect_at "$DEV" "$off" w.bin
	done
	bg_reads_stop
	expect_at "$DEV" $((40 * MIB + 4096)) w.bin
	dump4k "$DEV" dev.raw
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images fresh.qcow2
	convert fresh.qcow2 want.raw
	same dev.raw want.raw "qemu-img convert of fresh.qcow2 differs from the device"
	cmp -s -n 4096 -i $((40 * MIB + 4096)):0 dev.raw w.bin ||
		dmq_fail "the write at 40M+4k is not in fresh.qcow2"
}

# A damaged image whose L1 names one L2 table twice (QEMU never writes
# one): a change of an entry changes a cluster under each name, so the
# fast path stays off (a lookup or zero bit of the other name would stay
# behind); the device shows what QEMU reads, the write under one name
# under the other too.
case_fast_aliased_l1() {
	local e0
	dmq_img_create a.qcow2 4M cluster_size=4k
	dmq_write a.qcow2 P0x5a:20k:4k
	e0=$(dmq_py dmq_img entry a.qcow2 l1 0) || dmq_fail "L1[0]"
	dmq_run dmq_py dmq_img entry a.qcow2 l1 1 = "${e0#* }"
	echo "a.qcow2: L1[0] and L1[1] both ${e0#* }"
	map_rw rw:a.qcow2
	fast_reads v $((2 * MIB)) same
	fast_reads v $((2 * MIB + 20480)) same
	random w.bin 4k
	put w.bin "$DEV" 0
	expect_at "$DEV" $((2 * MIB)) w.bin
	dump4k "$DEV" dev.raw
	dmq_remove v || dmq_fail "dmsetup remove failed"
	convert a.qcow2 want.raw
	same dev.raw want.raw "the device differs from what QEMU reads"
}

# The first lookup in one of the top's L2 pages puts the page's other data
# clusters into the fast path's table: a first read of another cluster of
# the page, and a first write in place into one, take the fast path; a 4k
# read of every block (of 64k clusters: one page of each of a table's
# eight; of 4k clusters: two tables of one page each) shows what QEMU
# reads of the chain.
case_fast_warm() {
	local cs
	for cs in 64k 4k; do
		dmq_img_create base.qcow2 4M cluster_size=$cs
		dmq_write base.qcow2 r:1M:1M
		dmq_img_create top.qcow2 4M cluster_size=$cs base.qcow2
		dmq_write top.qcow2 r:0:512k r:1536k:256k
		map_rw rw:base.qcow2 top.qcow2
		convert top.qcow2 want.raw
		# loads the page of the first L2 table
		dmq_run dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct status=none
		if [ "$cs" = 64k ]; then
			fast_count v up "a first read at 448k" dmq_run dd if="$DEV" of=/dev/null \
				bs=4k count=1 skip=$((448 * 1024)) iflag=direct,skip_bytes status=none
			random w.bin 4k
			fast_write v w.bin $((1600 * 1024)) up
			dmq_run dd if=w.bin of=want.raw bs=4k seek=400 conv=notrunc status=none
		fi
		fast_count v up "4k reads of the device" dmq_run dd if="$DEV" of=dev.raw \
			bs=4k iflag=direct status=none
		same dev.raw want.raw "the device differs from the chain ($cs clusters)"
		dmq_remove v || dmq_fail "dmsetup remove failed"
		dmq_check_images base.qcow2 top.qcow2
		convert top.qcow2 top.raw
		same top.raw want.raw "qemu-img convert of top.qcow2 differs ($cs clusters)"
		rm -f base.qcow2 top.qcow2 want.raw dev.raw top.raw w.bin
	done
}

# Reads during a backward merge of the top (depth 0, its clusters moved into
# the base and dropped from it while the fast path serves reads of the
# rest): every read of the device shows what QEMU reads of the chain.
case_reads_during_merge() {
	dmq_img_create base.qcow2 32M cluster_size=64k
	dmq_write base.qcow2 t:0:4M r:20M:2M
	dmq_img_create top.qcow2 32M cluster_size=64k base.qcow2
	dmq_write top.qcow2 r:2M:12M r:21M:64k
	map_rw rw:base.qcow2 top.qcow2
	convert top.qcow2 want.raw
	dump "$DEV" dev.raw
	same dev.raw want.raw "the device differs from qemu-img convert before the merge"
	rm -f stop bad
	(
		i=0
		while [ ! -e stop ] && [ "$i" -lt 200 ]; do
			i=$((i + 1))
			dd if="$DEV" of=r.raw bs=64k iflag=direct status=none || { echo "read $i failed" >bad; break; }
			cmp -s r.raw want.raw || { echo "read $i differs" >bad; cp r.raw bad.raw; break; }
		done
		echo "$i" >reads
	) &
	local reader=$!
	sleep 0.3
	msg_ok v merge_backward start -1 0
	dmq_wait_ready v merge_backward
	touch stop
	wait "$reader"
	echo "whole-device reads during the merge: $(cat reads)"
	[ ! -e bad ] || dmq_fail "$(cat bad)"
	msg_ok v merge_backward complete
	reads_then_removed v "$DEV" want.raw base.qcow2
}

# The clusters= counts are kept up to date (not recounted per status):
# they follow allocation, copy-on-write, discard and write-zeroes of a
# compressed cluster, are rebuilt after a resume (the metadata is read
# again), and agree with qemu-img map.
case_status_counts() {
	local idle='wants_check=0 md_writeback_error=0 truncate_error=0 enospc=0 merge=none stage=none'
	local full
	need blkdiscard
	full=$(dmq_full_name v)
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:2M
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	# 16 clusters of data, 2 compressed ones
	dmq_write top.qcow2 r:4M:1M ct:8M:128k
	trap on_exit EXIT
	map_rw base.qcow2 top.qcow2
	expect_status v "images=2 $idle clusters=32,18"
	random w.bin 64k
	put w.bin "$DEV" $((12 * MIB))
	expect_status v "images=2 $idle clusters=32,19"
	# copy-on-write of a cluster of the base
	put w.bin "$DEV" $((MIB))
	expect_status v "images=2 $idle clusters=32,20"
	# four clusters of the top discarded (zero clusters now)
	dmq_run blkdiscard -o $((4 * MIB)) -l $((256 * 1024)) "$DEV"
	expect_status v "images=2 $idle clusters=32,16"
	# a compressed cluster zeroed
	dmq_run blkdiscard -z -o $((8 * MIB)) -l 65536 "$DEV"
	expect_status v "images=2 $idle clusters=32,15"
	dmq_run "$DMSETUP" suspend "$full"
	dmq_run "$DMSETUP" resume "$full"
	expect_status v "images=2 $idle clusters=32,15"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	[ "$(map_clusters top.qcow2)" = 15 ] || dmq_fail "qemu-img map: top.qcow2 has $(map_clusters top.qcow2) clusters"
	[ "$(map_clusters base.qcow2)" = 32 ] || dmq_fail "qemu-img map: base.qcow2 has $(map_clusters base.qcow2) clusters"
}

# dmsetup status in a loop while fio writes (allocating, copy-on-write)
# and verifies: every line parses, the top's cluster count never goes down
# (nothing frees clusters here), fio's data is intact, and the last count
# is what qemu-img map finds. (What the loop costs fio is measured by the
# bench's status-under-fio job, not here: no timing in tests.)
case_status_under_fio() {
	local rc n=0 prev=0 top
	need "$FIO"
	dmq_img_create base.qcow2 32M cluster_size=64k
	dmq_write base.qcow2 t:0:8M r:8M:8M
	dmq_img_create top.qcow2 32M cluster_size=64k base.qcow2
	trap on_exit EXIT
	map_rw base.qcow2 top.qcow2
	"$FIO" --output=fio.log --filename="$DEV" --direct=1 --ioengine=libaio \
		--rw=randwrite --bsrange=4k-64k --iodepth=8 --size=32M \
		--io_size=8M --verify=crc32c --verify_fatal=1 --randrepeat=1 \
		--randseed=7 --name=j0 &
	BG_PIDS+=($!)
	while kill -0 "${BG_PIDS[0]}" 2>/dev/null; do
		status v
		top=${ST_CLUSTERS##*,}
		[ "$top" -ge "$prev" ] || dmq_fail "top's clusters went down: $prev -> $top ('$STATUS')"
		prev=$top
		n=$((n + 1))
	done
	wait "${BG_PIDS[0]}"
	rc=$?
	if [ "$rc" -ne 0 ] || grep -qEi 'verify|bad magic|bad header|crc32c|err= *[1-9]' fio.log; then
		cat fio.log
		dmq_fail "fio failed (rc=$rc)"
	fi
	status v
	top=${ST_CLUSTERS##*,}
	echo "$n status lines while fio wrote; the top's clusters 0 -> $top"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	[ "$(map_clusters top.qcow2)" = "$top" ] ||
		dmq_fail "qemu-img map: top.qcow2 has $(map_clusters top.qcow2) clusters, status said $top"
}

# ------------------------------------------------------- fault injection

case_fault_injection() {
	local rc
	need "$FIO"
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:4M r:4M:4M
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	sha256sum base.qcow2 >base.sha256 || dmq_fail "sha256sum"
	convert top.qcow2 before.raw
	trap on_exit EXIT
	map_rw base.qcow2 top.qcow2
	random a.bin 1M
	random b.bin 64k
	put a.bin "$DEV" "$MIB"
	put b.bin "$DEV" $((2 * MIB))

	# every I/O of the top fails
	msg_ok v set_fault_injection 1 100000
	dd if="$DEV" of=/dev/null bs=64k skip=16 count=1 iflag=direct status=none 2>/dev/null &&
		dmq_fail "read of a cluster of the top worked with faults on"
	dd if=b.bin of="$DEV" bs=64k seek=144 count=1 oflag=direct conv=notrunc status=none 2>/dev/null &&
		dmq_fail "write of a new cluster worked with faults on"
	dd if=b.bin of="$DEV" bs=64k seek=32 count=1 oflag=direct conv=notrunc status=none 2>/dev/null &&
		dmq_fail "write in place worked with faults on"
	echo "ratio 100000 on the top: reads and writes fail"
	msg_ok v set_fault_injection 1 0
	expect_at "$DEV" "$MIB" a.bin
	dmq_run dd if="$DEV" of=/dev/null bs=1M iflag=direct status=none
	echo "ratio 0: the data is there, everything reads"

	# the base's I/O fails: its clusters do not read, the top's do
	msg_ok v set_fault_injection 0 100000
	dd if="$DEV" of=/dev/null bs=64k skip=80 count=1 iflag=direct status=none 2>/dev/null &&
		dmq_fail "read of a cluster of the base worked with faults on it"
	expect_at "$DEV" "$MIB" a.bin
	msg_ok v set_fault_injection 0 0
	echo "ratio 100000 on the base: only the base's clusters fail"

	# random faults under fio on 8M..16M
	msg_ok v set_fault_injection 1 20000
	"$FIO" --output=fio.log --name=f --filename="$DEV" --direct=1 \
		--ioengine=libaio --rw=randwrite --bsrange=4k-64k --iodepth=4 \
		--offset=8M --size=8M --io_size=2M --continue_on_error=all \
		--randrepeat=1
	rc=$?
	msg_ok v set_fault_injection 1 0
	echo "fio with 20% faults: rc=$rc"
	grep -E 'write: IOPS|err=' fio.log | sed 's/^ */fio: /'
	msg_ok v get_errors
	echo "get_errors: ${MSG_OUT//$'\n'/ }"
	# each 0 or 1; wants_check is the OR of the others (and of failed
	# refcount updates), as the C target
	local errs=$MSG_OUT
	[[ $errs =~ ^wants_check=([01])$'\n'md_writeback_error=([01])$'\n'truncate_error=([01])$'\n'?$ ]] ||
		dmq_fail "get_errors: '$errs'"
	if [ "${BASH_REMATCH[2]}" = 1 ] || [ "${BASH_REMATCH[3]}" = 1 ]; then
		[ "${BASH_REMATCH[1]}" = 1 ] || dmq_fail "wants_check=0 with a writeback error"
	fi
	local wants=${BASH_REMATCH[1]}

	# acknowledged data is still there; the rest of the device too
	expect_at "$DEV" "$MIB" a.bin
	dump "$DEV" dev.raw
	# untouched since: 0..1M and 2M+64k..8M (the failed writes went to
	# 2M and 9M, fio to 8M..16M)
	cmp -n "$MIB" dev.raw before.raw || dmq_fail "data at 0..1M changed"
	cmp -i $((2 * MIB + 65536)) -n $((6 * MIB - 65536)) dev.raw before.raw ||
		dmq_fail "data at 2M+64k..8M changed"
	# no fsync: after a failed one every flush fails (fsync_error_sticks)
	random c.bin 64k
	dmq_run dd if=c.bin of="$DEV" bs=4k seek=$((15 * MIB / 4096)) oflag=direct \
		conv=notrunc status=none
	expect_at "$DEV" $((15 * MIB)) c.bin
	dump "$DEV" dev.raw
	if [ "$wants" = 1 ]; then
		# the table may not run again before a check: resume is EIO
		dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
		"$DMSETUP" resume "$(dmq_full_name v)" 2>resume.err &&
			dmq_fail "resume worked with wants_check=1"
		grep -q "Input/output error" resume.err ||
			dmq_fail "resume with wants_check=1: $(cat resume.err)"
		echo "wants_check=1: resume refused (EIO)"
	fi
	dmq_remove v || dmq_fail "dmsetup remove failed"

	check_rc top.qcow2 0 3
	sha256sum -c --quiet base.sha256 || dmq_fail "base.qcow2 changed"
	dmq_check_images base.qcow2
	convert top.qcow2 top.raw
	if [ "$wants" = 1 ]; then
		# an fsync may have failed: then nothing became durable after it,
		# and the image holds what the flushes before it made durable
		cmp -n "$MIB" top.raw before.raw || dmq_fail "top.qcow2: data at 0..1M changed"
		cmp -i "$MIB:0" -n "$MIB" top.raw a.bin || dmq_fail "top.qcow2: a.bin (flushed) is not at 1M"
		echo "qemu-img convert of top.qcow2: what was flushed before the faults is there"
	else
		same dev.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
		echo "qemu-img convert of top.qcow2 equals the device"
	fi
}

# fault_top_setup [OPTS]: top.qcow2 (16M, 64k clusters, more qemu-img
# options OPTS, 0x11 over its first cluster) mapped writable as v ($DEV),
# for the target's fault injection
fault_top_setup() {
	dmq_needs_kernel "the target's fault injection"
	dmq_img_create top.qcow2 16M "cluster_size=64k${1:+,$1}"
	dmq_write top.qcow2 P0x11:0:64k
	trap on_exit EXIT
	map_rw top.qcow2
}

# A failed fsync stays failed: what was written before it may be lost
# without a later fsync saying so (a disk that dropped its cache), so no
# mapping may become durable over it. A flush fails while every I/O of the
# top fails (set_fault_injection); with the faults off a write into a new
# cluster works and reads back, but its flush fails too (the old module's
# worked, and made the mapping durable). get_errors says
# md_writeback_error=1, a resume is refused, and the image holds what the
# last good flush made durable: the cluster flushed before, not the one
# written after the failure.
case_fsync_error_sticks() {
	fault_top_setup
	random a.bin 64k
	random b.bin 64k
	put a.bin "$DEV" "$MIB"
	msg_ok v set_fault_injection 0 100000
	flush_dev "$DEV" && dmq_fail "a flush worked with every I/O of the top failing"
	msg_ok v set_fault_injection 0 0
	echo "a flush failed with every I/O of the top failing"
	dmq_run dd if=b.bin of="$DEV" bs=64k seek=32 count=1 oflag=direct conv=notrunc status=none
	expect_at "$DEV" $((2 * MIB)) b.bin
	flush_dev "$DEV" && dmq_fail "a flush worked after a failed one"
	echo "faults off: a write works, its flush fails"
	msg_ok v get_errors
	[[ $MSG_OUT == *md_writeback_error=1* ]] || dmq_fail "get_errors: $MSG_OUT"
	dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
	"$DMSETUP" resume "$(dmq_full_name v)" 2>/dev/null && dmq_fail "resume worked after a failed fsync"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc top.qcow2 0 3
	dmq_run "$QEMU_IO" -r -f qcow2 -c "read -P 0x11 0 64k" -c "read -P 0 2M 64k" top.qcow2
	convert top.qcow2 top.raw
	cmp -i "$MIB:0" -n 65536 top.raw a.bin || dmq_fail "a.bin (flushed before) is not at 1M"
	echo "the image holds what was flushed before the failure, nothing after"
}

# After a failed fsync the metadata cache keeps serving reads. The pages
# dirtied since can never be written out: they stay at most half the cache,
# and a first write that needs one more fails with EIO. With
# md_cache_pages=16 and an image with 32 L2 tables in use (64k clusters:
# 32M each): a flush fails; first writes into each table: the first ones
# work, later ones fail; then every table's data reads back, and so do the
# writes that worked (the old module failed every lookup of an uncached
# page once 8 pages were dirty, reads included).
case_fsync_error_reads() {
	dmq_with_md_cache 16 fsync_error_reads
}

fsync_error_reads() {
	local k p specs=() reads=() ok=() failed=0
	dmq_needs_kernel "the target's fault injection"
	for k in $(seq 0 31); do
		specs+=("P$(printf 0x%x $((0x40 + k))):$((k * 32))M:64k")
		reads+=(-c "read -P $((0x40 + k)) $((k * 32))M 64k")
	done
	dmq_img_create top.qcow2 1G cluster_size=64k
	dmq_write top.qcow2 "${specs[@]}"
	trap on_exit EXIT
	map_rw top.qcow2
	msg_ok v set_fault_injection 0 100000
	flush_dev "$DEV" && dmq_fail "a flush worked with every I/O of the top failing"
	msg_ok v set_fault_injection 0 0
	random w.bin 4k
	for k in $(seq 0 31); do
		if dd if=w.bin of="$DEV" bs=4k seek=$(((k * 32 * MIB + 131072) / 4096)) count=1 \
			oflag=direct conv=notrunc status=none 2>/dev/null; then
			ok+=("$k")
		else
			failed=$((failed + 1))
		fi
	done
	echo "first writes after a failed flush: ${#ok[@]} worked, $failed failed"
	[ "${#ok[@]}" -gt 0 ] || dmq_fail "no first write worked"
	[ "$failed" -gt 0 ] || dmq_fail "every first write worked: the dirty pages are not bounded"
	for k in $(seq 0 31); do
		p=$(printf '\\%03o' $((0x40 + k)))
		head -c 65536 /dev/zero | tr '\0' "$p" >p.bin
		expect_at "$DEV" $((k * 32 * MIB)) p.bin
	done
	for k in "${ok[@]}"; do
		expect_at "$DEV" $((k * 32 * MIB + 131072)) w.bin
	done
	echo "every table's data reads back, and the writes that worked"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc top.qcow2 0 3
	dmq_run "$QEMU_IO" -r -f qcow2 "${reads[@]}" top.qcow2
	echo "the image holds its data"
}

# A FUA write is made durable by the target's own fsync after it lands, not
# written through (IOCB_DSYNC): a write-through that fails cannot say
# whether a sector or the cache flush failed, and after a failed flush none
# may pass (fsync_error_sticks). With every I/O of the top failing, a FUA
# write in place fails and so does its fsync; with the faults off a flush
# fails too (the old module wrote FUA through and never fsynced: its flush
# worked), get_errors says md_writeback_error=1, and the image keeps what it
# held before. The image has extended L2 entries, which the fast path does
# not serve: the write takes the worker, whose batch commits (and fsyncs)
# after a FUA write even when its data write failed. On the fast path (a
# FUA write in place while the top's metadata is durable) a failed write
# fails its bio only, before any fsync (fua_fast_write_error).
case_fua_error_sticks() {
	fault_top_setup extended_l2=on
	random a.bin 4k
	msg_ok v set_fault_injection 0 100000
	dd if=a.bin of="$DEV" bs=4k count=1 oflag=direct,dsync conv=notrunc \
		status=none 2>/dev/null && dmq_fail "a FUA write worked with every I/O of the top failing"
	msg_ok v set_fault_injection 0 0
	status v
	[ "$ST_FUA" = 0 ] || dmq_fail "the FUA write took the fast path (fast_fua $ST_FUA)"
	echo "a FUA write in place (through the worker) failed with every I/O of the top failing"
	flush_dev "$DEV" && dmq_fail "a flush worked after a FUA write's fsync failed"
	echo "faults off: a flush fails"
	msg_ok v get_errors
	[[ $MSG_OUT == *md_writeback_error=1* ]] || dmq_fail "get_errors: $MSG_OUT"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc top.qcow2 0 3
	dmq_run "$QEMU_IO" -r -f qcow2 -c "read -P 0x11 0 64k" top.qcow2
	echo "the image holds what it did before"
}

# A FUA write in place, while the top's metadata is durable, takes the fast
# path (status fast_fua): a plain write, then the commit's fsync once it
# landed. With every I/O of the top failing the write fails and ends its
# bio; no fsync ran, so nothing is final: with the faults off a flush
# works, get_errors says nothing failed, the image holds what it held
# before, and a FUA write in place works and reads back.
case_fua_fast_write_error() {
	local f0
	fault_top_setup
	random a.bin 4k
	# the fast path's table learns cluster 0 from a read
	dmq_run dd if="$DEV" of=/dev/null bs=64k count=1 iflag=direct status=none
	status v
	f0=$ST_FUA
	msg_ok v set_fault_injection 0 100000
	dd if=a.bin of="$DEV" bs=4k count=1 oflag=direct,dsync conv=notrunc \
		status=none 2>/dev/null && dmq_fail "a FUA write worked with every I/O of the top failing"
	msg_ok v set_fault_injection 0 0
	status v
	[ "$ST_FUA" -gt "$f0" ] || dmq_fail "the FUA write did not take the fast path (fast_fua $f0 -> $ST_FUA)"
	echo "a FUA write in place failed on the fast path (fast_fua $f0 -> $ST_FUA)"
	flush_dev "$DEV" || dmq_fail "a flush failed after a FUA write's data write failed"
	msg_ok v get_errors
	[[ $MSG_OUT == *md_writeback_error=0* ]] || dmq_fail "get_errors: $MSG_OUT"
	echo "faults off: a flush works, no error recorded"
	dmq_run dd if=a.bin of="$DEV" bs=4k count=1 oflag=direct,dsync conv=notrunc status=none
	expect_at "$DEV" 0 a.bin
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc top.qcow2 0
	dmq_run "$QEMU_IO" -r -f qcow2 -c "read -P 0x11 4k 60k" top.qcow2
	echo "a FUA write in place works again; the image holds it and the rest"
}

# flush_dev DEV: fsync of the block device (a flush bio); its status
flush_dev() {
	"$PYTHON" -c 'import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
try:
    os.fsync(fd)
except OSError as e:
    print("fsync: %s" % e.strerror)
    sys.exit(1)' "$1"
}

# ------------------------------------------------------------------ ENOSPC

# globals, for the EXIT trap
SMALL=
DD_PID=

# make room, let the parked writes finish, then unmap and unmount
enospc_exit() {
	local i
	rm -f "$SMALL/filler"
	if [ -n "$DD_PID" ]; then
		for i in $(seq 1 30); do
			kill -0 "$DD_PID" 2>/dev/null || break
			sleep 1
		done
		kill "$DD_PID" 2>/dev/null
	fi
	"$DMSETUP" remove --retry "$(dmq_full_name v)" >/dev/null 2>&1
	umount "$SMALL" 2>/dev/null || umount -l "$SMALL"
}

# small_tmpfs: a 24M tmpfs on $SMALL, unmounted by enospc_exit
small_tmpfs() {
	SMALL=$DMQ_CASE_DIR/small
	mkdir -p "$SMALL"
	mount -t tmpfs -o size=24M,mode=0700 dmq-enospc "$SMALL" ||
		dmq_skip "cannot mount a 24M tmpfs"
	trap enospc_exit EXIT
}

# enospc_case OPTS: a 24M tmpfs, full but 1M: dd of 8M into an image made
# with OPTS waits (ENOSPC parks the writes), get_event and a dm event say
# so, dmsetup status counts them; once the filler is removed the writes
# complete within the 1 s retry period. With WARM=1 the 8M are read first,
# so that the fast path's table knows them: the 1 MiB writes then go to
# direct I/O from a lane (fast_bios), end short on the full tmpfs and are
# parked like the worker's.
enospc_case() {
	local full avail ev0 ev1 ev2 rc end fast0=
	need fallocate
	full=$(dmq_full_name v)
	small_tmpfs
	dmq_img_create "$SMALL/a.qcow2" 64M "$1"
	random pat.bin 8M
	map_rw "$SMALL/a.qcow2"
	if [ "${WARM:-0}" = 1 ]; then
		dmq_run dd if="$DEV" of=/dev/null bs=1M count=8 iflag=direct status=none
		status v
		fast0=$ST_FAST
	fi
	avail=$("$PYTHON" -c 'import os, sys; s = os.statvfs(sys.argv[1]); print(s.f_bavail * s.f_frsize)' "$SMALL") ||
		dmq_fail "statvfs"
	# (WARM: 1.5M free, so that a 1 MiB write ends short, part written)
	dmq_run fallocate -l $((avail - MIB - ${WARM:-0} * MIB / 2)) "$SMALL/filler"
	echo "tmpfs: $(df -h "$SMALL" | tail -n 1)"
	ev0=$("$DMSETUP" info -c --noheadings -o events "$full" | tr -d ' ')
	status v
	[ "$ST_ENOSPC" = 0 ] || dmq_fail "enospc=$ST_ENOSPC before any write"

	dd if=pat.bin of="$DEV" bs=1M count=8 oflag=direct conv=fsync status=none 2>dd.err &
	DD_PID=$!
	end=$((SECONDS + 30))
	while :; do
		msg_ok v get_event
		[ "$MSG_OUT" = event_ENOSPC ] && break
		[ -z "$MSG_OUT" ] || dmq_fail "get_event: '$MSG_OUT'"
		kill -0 "$DD_PID" 2>/dev/null || { cat dd.err; dmq_fail "dd ended without an ENOSPC event"; }
		[ "$SECONDS" -lt "$end" ] || dmq_fail "no event_ENOSPC after 30 s"
		sleep 0.2
	done
	echo "get_event: event_ENOSPC"
	ev1=$("$DMSETUP" info -c --noheadings -o events "$full" | tr -d ' ')
	[ "$ev1" -gt "$ev0" ] || dmq_fail "no dm event (event_nr $ev0 -> $ev1)"
	echo "dm event_nr: $ev0 -> $ev1"
	end=$((SECONDS + 5))
	while status v && [ "$ST_ENOSPC" = 0 ]; do
		[ "$SECONDS" -lt "$end" ] || dmq_fail "enospc=0 while writes wait: '$STATUS'"
		sleep 0.2
	done
	echo "status: enospc=$ST_ENOSPC"
	# still waiting after a few retries (one a second by default), each of
	# which hit ENOSPC again: get_event and a dm event say so again
	sleep 3
	kill -0 "$DD_PID" 2>/dev/null || { cat dd.err; dmq_fail "dd ended while the file system is full"; }
	echo "dd waits while the file system is full"
	[ -e /sys/module/dm_qcow2/parameters/enospc_retry_ms ] ||
		dmq_fail "no enospc_retry_ms module parameter"
	msg_ok v get_event
	[ "$MSG_OUT" = event_ENOSPC ] || dmq_fail "get_event after retries: '$MSG_OUT'"
	ev2=$("$DMSETUP" info -c --noheadings -o events "$full" | tr -d ' ')
	[ "$ev2" -gt "$ev1" ] || dmq_fail "no dm event from the retries (event_nr $ev1 -> $ev2)"
	echo "after retries: event_ENOSPC again, dm event_nr $ev1 -> $ev2"

	rm -f "$SMALL/filler"
	rc=0
	dmq_wait_exit "$DD_PID" 30 "dd, after the filler's rm," || rc=$?
	DD_PID=
	[ "$rc" = 0 ] || { cat dd.err; dmq_fail "dd failed (rc=$rc)"; }
	echo "dd completed after the filler was removed"
	# one more event may be left from a retry before the rm, no more
	msg_ok v get_event
	if [ -n "$MSG_OUT" ]; then
		[ "$MSG_OUT" = event_ENOSPC ] || dmq_fail "get_event: '$MSG_OUT'"
		echo "get_event: an event from a retry before the rm"
	fi
	expect_output v '' get_event
	status v
	[ "$ST_ENOSPC" = 0 ] || dmq_fail "enospc=$ST_ENOSPC after dd completed"
	if [ -n "$fast0" ]; then
		[ "$ST_FAST" -ge $((fast0 + 8)) ] ||
			dmq_fail "the writes did not take the fast path (fast_bios $fast0 -> $ST_FAST)"
		echo "fast path: fast_bios $fast0 -> $ST_FAST"
	fi
	expect_at "$DEV" 0 pat.bin
	dump "$DEV" dev.raw
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images "$SMALL/a.qcow2"
	convert "$SMALL/a.qcow2" a.raw
	same dev.raw a.raw "qemu-img convert differs from the device"
	cmp -n $((8 * MIB)) a.raw pat.bin || dmq_fail "the image does not hold what dd wrote"
	echo "the image holds what dd wrote"
}

# new clusters: ENOSPC in the worker (copy-on-write)
case_enospc() {
	enospc_case cluster_size=64k
}

# a v2 image with preallocated metadata: every cluster is allocated (sparse
# in the file), the writes go in place and ENOSPC comes from their
# asynchronous I/O (end_io takes the bio back)
case_enospc_inplace() {
	enospc_case cluster_size=64k,compat=0.10,preallocation=metadata
}

# the same, its 1 MiB writes from a lane: a direct write over several
# clusters that ends short (tmpfs wrote part of it) ends with ENOSPC and is
# parked and written again whole, not failed
case_enospc_fast() {
	WARM=1 enospc_case cluster_size=64k,compat=0.10,preallocation=metadata
}

# an in-place write into a cluster that the image places across the host
# file system's size limit (ext4 extent files: 2^32 - 1 blocks) ends short
# there for good: it fails (EFBIG: an I/O error to the writer) instead of
# being parked as ENOSPC until the device is suspended. The L2 entry is
# patched to point there, so the image is not clean afterwards.
case_write_limit() {
	local bs limit host rc
	dmq_needs_kernel "the host file system's size limit"
	[ "$(stat -f -c %T .)" = ext2/ext3 ] || dmq_skip "needs ext4 (its size limit is known)"
	bs=$(stat -f -c %S .)
	limit=$((((1 << 32) - 1) * bs))
	host=$((limit / 65536 * 65536))
	[ "$host" -lt "$limit" ] && [ $((host + 65536)) -gt "$limit" ] ||
		dmq_skip "no 64 KiB cluster crosses the limit ($limit) here"
	dmq_img_create a.qcow2 1M cluster_size=64k
	dmq_write a.qcow2 r:0:64k
	dmq_run dmq_py dmq_img entry a.qcow2 l2 0 = "$(printf '0x%x' $((host | (1 << 63))))"
	random pat.bin 64k
	map_rw a.qcow2
	dd if=pat.bin of="$DEV" bs=64k count=1 oflag=direct status=none 2>dd.err &
	DD_PID=$!
	rc=0
	dmq_wait_exit "$DD_PID" 60 "dd across the size limit" || rc=$?
	DD_PID=
	[ "$rc" != 0 ] || dmq_fail "a write across the file's size limit ($limit) succeeded"
	echo "dd failed as it should: $(cat dd.err)"
	status v
	[ "$ST_ENOSPC" = 0 ] || dmq_fail "the write was parked: enospc=$ST_ENOSPC"
	expect_output v '' get_event
	dmq_remove v || dmq_fail "dmsetup remove failed"
	echo "the write across $limit failed at once, nothing parked"
}

# wait_parked WHAT LOG: within 30 s, `dmsetup status` counts parked writes
# while WHAT (pid $DD_PID) still runs (else its LOG is shown)
wait_parked() {
	local end=$((SECONDS + 30))
	while status v && [ "$ST_ENOSPC" = 0 ]; do
		kill -0 "$DD_PID" 2>/dev/null || { cat "$2"; dmq_fail "$1 ended without waiting for space"; }
		[ "$SECONDS" -lt "$end" ] || dmq_fail "no parked writes after 30 s: '$STATUS'"
		sleep 0.2
	done
	echo "writes parked: enospc=$ST_ENOSPC"
}

# copy-on-write fills run in a gang (drivers/io/cow.rs) and hit ENOSPC:
# 4 KiB random writes at iodepth 32 into an empty top on a full 24M tmpfs
# over a written base of 64 KiB clusters (every write needs a new cluster
# filled from the base); the writes park, and once the filler is removed
# they complete; fio verifies its blocks, and every other byte is the
# base's (check_unwritten), qemu-img reads what the device did, check clean
case_enospc_cow() {
	local avail rc
	need "$FIO"
	need fallocate
	small_tmpfs
	dmq_img_create base.qcow2 32M cluster_size=64k
	dmq_write base.qcow2 r:0:32M
	dmq_img_create "$SMALL/top.qcow2" 32M cluster_size=64k "$PWD/base.qcow2"
	convert "$SMALL/top.qcow2" before.raw
	map_rw base.qcow2 "$SMALL/top.qcow2"
	avail=$("$PYTHON" -c 'import os, sys; s = os.statvfs(sys.argv[1]); print(s.f_bavail * s.f_frsize)' "$SMALL") ||
		dmq_fail "statvfs"
	dmq_run fallocate -l $((avail - MIB)) "$SMALL/filler"
	# 768 writes over 256 clusters (16M): the top needs ~16M, 1M is free
	"$FIO" --output=fio.log --name=c --filename="$DEV" --direct=1 \
		--ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 --size=16M \
		--io_size=3M --verify=crc32c --verify_fatal=1 --randrepeat=1 \
		--randseed=29 --write_iolog=c.iolog &
	DD_PID=$!
	wait_parked fio fio.log
	msg_ok v get_event
	[ "$MSG_OUT" = event_ENOSPC ] || dmq_fail "get_event: '$MSG_OUT'"
	sleep 2
	kill -0 "$DD_PID" 2>/dev/null || { cat fio.log; dmq_fail "fio ended while the file system is full"; }
	rm -f "$SMALL/filler"
	rc=0
	dmq_wait_exit "$DD_PID" 60 "fio, after the filler's rm," || rc=$?
	DD_PID=
	if [ "$rc" -ne 0 ] || grep -qEi 'verify|bad magic|bad header|crc32c|err= *[1-9]' fio.log; then
		cat fio.log
		dmq_fail "fio failed (rc=$rc)"
	fi
	grep -q 'read: IOPS=' fio.log || { cat fio.log; dmq_fail "fio did not verify"; }
	grep -E '^ *(write|read): IOPS' fio.log | sed 's/^ */fio: /'
	status v
	[ "$ST_ENOSPC" = 0 ] || dmq_fail "enospc=$ST_ENOSPC after fio completed"
	dump "$DEV" dev.raw
	check_unwritten before.raw dev.raw c.iolog ||
		dmq_fail "bytes fio did not write differ from the base's"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images "$SMALL/top.qcow2" base.qcow2
	convert "$SMALL/top.qcow2" top.raw
	same dev.raw top.raw "qemu-img convert of the top differs from the device"
	echo "qemu-img reads the chain as the device did"
}

# writes wait for space in the top (on a full 24M tmpfs) while a backward
# merge moves the top into the base (on the scratch file system): start and
# complete work with writes parked (they hold no in-flight reference, as in
# the C target), and the parked writes then land in the base, the new top,
# without any space freed on the tmpfs. OPTS: the top's qemu-img options.
enospc_merge_case() {
	local avail rc p
	need fallocate
	small_tmpfs
	dmq_img_create base.qcow2 64M cluster_size=64k
	dmq_write base.qcow2 r:16M:4M t:40M:1M
	# (qemu-img refuses preallocation with a backing file: set it after)
	dmq_img_create "$SMALL/top.qcow2" 64M "$1"
	dmq_run "$QEMU_IMG" rebase -u -f qcow2 -F qcow2 -b "$PWD/base.qcow2" "$SMALL/top.qcow2"
	dmq_write "$SMALL/top.qcow2" P0x5a:18M:1M r:30M:2M
	convert "$SMALL/top.qcow2" before.raw
	random pat.bin 8M
	map_rw rw:base.qcow2 "$SMALL/top.qcow2"
	avail=$("$PYTHON" -c 'import os, sys; s = os.statvfs(sys.argv[1]); print(s.f_bavail * s.f_frsize)' "$SMALL") ||
		dmq_fail "statvfs"
	dmq_run fallocate -l $((avail - MIB)) "$SMALL/filler"
	dd if=pat.bin of="$DEV" bs=1M count=8 oflag=direct conv=fsync status=none 2>dd.err &
	DD_PID=$!
	wait_parked dd dd.err

	msg_ok v merge_backward start -1 0
	echo "merge_backward start: accepted with writes parked"
	dmq_wait_ready v merge_backward 60
	echo "merge progress: $MSG_OUT"
	kill -0 "$DD_PID" 2>/dev/null || echo "(dd already done: the merge's moves freed tmpfs space)"
	msg_ok v merge_backward complete
	echo "merge_backward complete: accepted"
	[ "$(chain_len v)" = 1 ] || dmq_fail "the chain still has $(chain_len v) images"
	rc=0
	dmq_wait_exit "$DD_PID" 30 "dd, after complete," || rc=$?
	DD_PID=
	[ "$rc" = 0 ] || { cat dd.err; dmq_fail "dd failed (rc=$rc)"; }
	echo "dd completed into the base"
	status v
	[ "$ST_ENOSPC" = 0 ] || dmq_fail "enospc=$ST_ENOSPC after dd completed"
	dump "$DEV" dev.raw
	cmp -n $((8 * MIB)) dev.raw pat.bin || dmq_fail "the device does not hold what dd wrote"
	cmp -i $((8 * MIB)) dev.raw before.raw || dmq_fail "the device changed past 8M"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2
	convert base.qcow2 base.raw
	same dev.raw base.raw "qemu-img convert of base.qcow2 differs from the device"
	echo "base.qcow2 alone reads like the device"
}

# new clusters: the writes park in the worker
case_enospc_merge() {
	enospc_merge_case cluster_size=64k
}

# preallocated metadata (v2): in place, ENOSPC from the data I/O (end_io)
case_enospc_merge_inplace() {
	enospc_merge_case cluster_size=64k,compat=0.10,preallocation=metadata
}

# ----------------------------------------------------------- suspend/resume

# fio writes and verifies while the device is suspended and resumed every
# second
case_suspend_loop() {
	local full half size rc n=0
	need "$FIO"
	full=$(dmq_full_name v)
	dmq_img_create base.qcow2 32M cluster_size=64k
	dmq_write base.qcow2 t:0:8M r:8M+512:2M ct:12M:128k P0x33:20M:4M z:22M:64k
	dmq_img_create top.qcow2 32M cluster_size=64k base.qcow2
	sha256sum base.qcow2 >base.sha256 || dmq_fail "sha256sum"
	convert top.qcow2 before.raw
	trap on_exit EXIT
	map_rw base.qcow2 top.qcow2
	dump "$DEV" dev.raw
	same before.raw dev.raw "the device does not read like the chain"
	half=$((16 * MIB))
	size=$((half - MIB))
	# --rate keeps the writes going for ~16 s
	"$FIO" --output=fio.log --filename="$DEV" --direct=1 --ioengine=libaio \
		--rw=randwrite --bsrange=4k-64k --iodepth=4 --size="$size" \
		--io_size=6M --rate=,384k --verify=crc32c --verify_fatal=1 \
		--randrepeat=1 --name=j0 --offset=0 --randseed=5 \
		--name=j1 --offset="$half" --randseed=1005 &
	BG_PIDS+=($!)
	sleep 1
	while kill -0 "${BG_PIDS[0]}" 2>/dev/null && [ "$n" -lt 60 ]; do
		dmq_run "$DMSETUP" suspend "$full"
		sleep 0.3
		dmq_run "$DMSETUP" resume "$full"
		n=$((n + 1))
		sleep 0.7
	done
	wait "${BG_PIDS[0]}"
	rc=$?
	if [ "$rc" -ne 0 ] || grep -qEi 'verify|bad magic|bad header|crc32c|err= *[1-9]|error' fio.log; then
		cat fio.log
		dmq_fail "fio failed (rc=$rc)"
	fi
	grep -q 'read: IOPS=' fio.log || { cat fio.log; dmq_fail "fio did not verify"; }
	grep -E '^ *(write|read): IOPS' fio.log | sed 's/^ */fio: /'
	echo "$n suspend/resume cycles while fio ran"
	[ "$n" -ge 3 ] || dmq_fail "fio ended after $n cycles"
	dump "$DEV" dev.raw
	# fio writes 0..15M and 16M..31M
	cmp -i $((15 * MIB)) -n "$MIB" before.raw dev.raw || dmq_fail "data at 15M changed"
	cmp -i $((31 * MIB)) -n "$MIB" before.raw dev.raw || dmq_fail "data at 31M changed"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images top.qcow2 base.qcow2
	sha256sum -c --quiet base.sha256 || dmq_fail "base.qcow2 changed"
	convert top.qcow2 top.raw
	same dev.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
	echo "qemu-img convert of top.qcow2 equals the device"
}

# Snapshot by reload: suspend, put a new overlay on the top with qemu-img,
# load base+top+overlay (the overlay writable), resume. The old top keeps
# what was written before, the overlay what came after.
case_snapshot_reload() {
	local full
	full=$(dmq_full_name v)
	mk_chain2
	convert top.qcow2 before.raw
	trap on_exit EXIT
	map_rw base.qcow2 top.qcow2
	random a.bin 1M
	random b.bin 1M
	put a.bin "$DEV" $((2 * MIB))
	dmq_run "$DMSETUP" suspend "$full"
	dmq_img_create over.qcow2 16M cluster_size=64k top.qcow2
	# dmq_open.py opens the files and runs "$DMSETUP create ..."; this
	# wrapper turns that into a reload of the existing device
	cat >dmsetup-reload <<-'EOF'
		#!/bin/sh
		[ "$1" = create ] || exit 90
		shift
		exec "${DMSETUP:-dmsetup}" reload "$@"
	EOF
	chmod +x dmsetup-reload
	dmq_create v --rw --dmsetup "$DMQ_CASE_DIR/dmsetup-reload" \
		base.qcow2 top.qcow2 over.qcow2 || dmq_fail "dmsetup reload failed"
	dmq_run "$DMSETUP" resume "$full"
	expect_chain v base.qcow2 top.qcow2 over.qcow2
	put b.bin "$DEV" $((6 * MIB))

	cp before.raw want-top.raw && patch_into want-top.raw $((2 * MIB)) a.bin
	cp want-top.raw want.raw && patch_into want.raw $((6 * MIB)) b.bin
	dump "$DEV" dev.raw
	same want.raw dev.raw "the device does not hold A and B"
	echo "the device holds both writes"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2 over.qcow2
	convert top.qcow2 top.raw
	same want-top.raw top.raw "top.qcow2 does not hold exactly the first write"
	echo "top.qcow2 holds the first write only"
	convert over.qcow2 over.raw
	same dev.raw over.raw "qemu-img convert of over.qcow2 differs from the device"
	echo "qemu-img convert of over.qcow2 equals the device"
}

# rewrite_chain CS: base.qcow2 < top.qcow2 created again in place (the
# same files, so the same inodes the table holds) with CS clusters and
# other data: what e.g. qemu-img does to an image while the device is
# suspended
rewrite_chain() {
	dmq_run "$QEMU_IMG" create -q -f qcow2 -o "cluster_size=$1" base.qcow2 16M
	dmq_write base.qcow2 "r:0:8M:$2"
	dmq_run "$QEMU_IMG" create -q -f qcow2 -o "cluster_size=$1" \
		-b base.qcow2 -F qcow2 top.qcow2 16M
	dmq_write top.qcow2 "P0x5a:4M+4k:8k"
}

# The images are rewritten with another cluster size while the device is
# suspended (same inodes, other content). The resume re-reads them, sizes
# its per-cluster buffers anew (or refuses), and copy-on-write into the
# new clusters works without an oops (it used to overrun the buffer sized
# at ctr). Larger (2M) and smaller (4k) clusters than the first ones.
case_resume_cluster_size() {
	local full cs ino0 ino1 seed=7 off
	full=$(dmq_full_name v)
	mk_chain2
	trap on_exit EXIT
	map_rw rw:base.qcow2 top.qcow2
	ino0=$(stat -c %i base.qcow2 top.qcow2)
	for cs in 2M 4k 64k; do
		dmq_run "$DMSETUP" suspend "$full"
		rewrite_chain "$cs" "$seed"
		ino1=$(stat -c %i base.qcow2 top.qcow2)
		[ "$ino0" = "$ino1" ] || dmq_fail "qemu-img create made new files"
		convert top.qcow2 want.raw
		if ! "$DMSETUP" resume "$full" 2>resume.err; then
			# a refusal is fine if it says why; the device stays
			# suspended and nothing else is tried
			cat resume.err
			dmq_dmesg_case | grep -i "cluster size" ||
				dmq_fail "resume with $cs clusters refused without a reason"
			echo "resume with $cs clusters refused"
			return 0
		fi
		echo "resumed with $cs clusters: $(dmq_dmesg_case | grep -i 'cluster size' | tail -n 1)"
		dump "$DEV" dev.raw
		same want.raw dev.raw "the device does not show the rewritten chain ($cs)"
		# copy-on-write from the base, in the middle of a cluster of each
		# size, and next to the top's own data
		random w.bin 8k
		for off in $((MIB + 12288)) $((6 * MIB + 1032192)) $((4 * MIB + 16384)); do
			put w.bin "$DEV" "$off"
			patch_into want.raw "$off" w.bin
		done
		dump "$DEV" dev.raw
		same want.raw dev.raw "the device after copy-on-write ($cs)"
		echo "$cs clusters: the chain reads and copies on write correctly"
		seed=$((seed + 1))
	done
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 top.qcow2
	convert top.qcow2 top.raw
	same dev.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
}

# Cases whose injected faults make the target log I/O and refcount errors.
DMQ_FAULT_CASES="fault_injection fsync_error_sticks fsync_error_reads fua_error_sticks fua_fast_write_error enospc enospc_inplace enospc_fast write_limit enospc_cow enospc_merge enospc_merge_inplace"

DMQ_CASES=(
	messages
	message_args
	message_big_buffer
	nonroot
	suspended_busy
	status_info
	fast_during_merge
	fast_below
	fast_zero
	fast_aliased_l1
	fast_warm
	reads_during_merge
	status_counts
	status_under_fio
	fault_injection
	fsync_error_sticks
	fsync_error_reads
	fua_error_sticks
	fua_fast_write_error
	enospc
	enospc_inplace
	enospc_fast
	write_limit
	enospc_cow
	enospc_merge
	enospc_merge_inplace
	suspend_loop
	snapshot_reload
	resume_cluster_size
)

dmq_main "$@"
