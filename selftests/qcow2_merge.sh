#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 merges (messages merge_backward/merge_forward start|progress|
# complete|cancel). A chain built with qemu-img/qemu-io (text, random,
# pattern, compressed and zero ranges, unaligned and sub-subcluster writes)
# is mapped writable and one delta is merged into its neighbour:
#   - the device reads the same bytes before, during and after the merge
#     (whole-device dumps; with fio writing during the merge: crc32c verify
#     after `complete`, and the bytes fio did not write are unchanged);
#   - after `complete`, `dmsetup table` counts one image less and
#     get_img_name lists the renumbered chain;
#   - after remove, `qemu-img check` is clean on every file (the dropped one
#     too), `qemu-img convert` of the new chain's top equals the device, the
#     receiving delta alone reads like the merged one did, and the files
#     the spec says are untouched are byte-for-byte unchanged.
# Plus the eventfd, cancel (copying and ready), suspend cancelling a merge,
# a merge failing on an I/O error, and every argument error.
#
# usage: qcow2_merge.sh [-l] [CASE...]
# DMQ_FIO_IO=SIZE overrides the bytes each fio job writes (default 4M).

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

FIO=${FIO:-fio}
DEV_SIZE=32M			# virtual size of every delta of the small chains
FIO_IO=${DMQ_FIO_IO:-4M}	# written by each of the two fio jobs
FIO_SEED=1
MERGE_TIMEOUT=120		# seconds until stage=ready
DEV=				# the mapped device (map_rw)
CHAIN=()			# the images of the current case, base first
SPECS=()			# CHAIN as dmq_open.py specs (chain_specs)
MSG_OUT=			# output of the last msg_ok
PROG=				# the last merge progress line,
STAGE=				# its stage=,
PCT=				# progress=
MERR=				# and error=
BG_PIDS=()			# background jobs killed when the case ends

# ------------------------------------------------------------ messages





# kv LINE KEY: the value of KEY=... in LINE
kv() {
	local w
	for w in $1; do
		case $w in
		"$2="*)
			echo "${w#*=}"
			return 0
			;;
		esac
	done
	return 1
}

# progress NAME KIND: "KIND progress" into PROG, STAGE, PCT, MERR; checks
# the format: "merge=KIND depth=D stage=S progress=P error=E" or
# "merge=none [depth=D ]stage=none ..."
progress() {
	local name=$1 kind=$2
	msg_ok "$name" "$kind" progress
	PROG=$MSG_OUT
	STAGE=$(kv "$PROG" stage) || dmq_fail "no stage= in '$PROG'"
	PCT=$(kv "$PROG" progress)
	MERR=$(kv "$PROG" error)
	case $STAGE in
	none)
		# the spec shows "merge=none stage=none ..."; a depth= between
		# (as in "merge=backward depth=1 stage=...") is fine too
		[[ $PROG =~ ^merge=none\ (depth=[0-9]+\ )?stage=none($|\ ) ]] ||
			dmq_fail "bad progress line '$PROG'"
		;;
	copying | ready | failed)
		[[ $PROG =~ ^merge=${kind#merge_}\ depth=[0-9]+\ stage=[a-z]+\ progress=[0-9]+\ error=[0-9]+$ ]] ||
			dmq_fail "bad progress line '$PROG'"
		[ "$PCT" -le 100 ] || dmq_fail "progress above 100: '$PROG'"
		if [ "$STAGE" = failed ]; then
			[ "$MERR" -gt 0 ] || dmq_fail "stage=failed with error=0: '$PROG'"
		else
			[ "$MERR" = 0 ] || dmq_fail "error set while $STAGE: '$PROG'"
		fi
		[ "$STAGE" != ready ] || [ "$PCT" = 100 ] ||
			dmq_fail "stage=ready below 100%: '$PROG'"
		;;
	*) dmq_fail "unknown stage in '$PROG'" ;;
	esac
}

# expect_merge NAME KIND DEPTH: a merge of that kind and depth is running
# (copying) or ready
expect_merge() {
	progress "$1" "$2"
	case $STAGE in
	copying | ready) ;;
	*) dmq_fail "no merge running: '$PROG'" ;;
	esac
	[ "$(kv "$PROG" depth)" = "$3" ] || dmq_fail "expected depth=$3: '$PROG'"
}

# expect_idle NAME KIND: no merge (waits up to 10 s for a cancel to end)
expect_idle() {
	local end=$((SECONDS + 10))
	while :; do
		progress "$1" "$2"
		[ "$STAGE" = none ] && return 0
		[ "$SECONDS" -lt "$end" ] || dmq_fail "merge still there: '$PROG'"
		sleep 0.2
	done
}

# wait_stage NAME KIND STAGE [TIMEOUT]: poll progress until STAGE
# (ready or failed); any other end fails the case
wait_stage() {
	local name=$1 kind=$2 goal=$3 t=${4:-$MERGE_TIMEOUT} end n=0
	end=$((SECONDS + t))
	while :; do
		progress "$name" "$kind"
		n=$((n + 1))
		[ "$STAGE" = "$goal" ] && break
		[ "$STAGE" = copying ] || dmq_fail "waiting for stage=$goal: '$PROG'"
		[ "$SECONDS" -lt "$end" ] || dmq_fail "no stage=$goal after $t s: '$PROG'"
		sleep 0.2
	done
	echo "after $n polls: $PROG"
}

# ------------------------------------------------------------- devices

# expect_chain NAME IMG...: the table has these images, base first
expect_chain() {
	local name=$1 i=0 img n
	shift
	n=$(chain_len "$name") || dmq_fail "dmsetup table $name"
	[ "$n" = $# ] || dmq_fail "dmsetup table: $n images, expected $#"
	for img in "$@"; do
		msg_ok "$name" get_img_name "$i"
		[ "$MSG_OUT" = "$(readlink -f "$img")" ] ||
			dmq_fail "get_img_name $i: '$MSG_OUT', expected $(readlink -f "$img")"
		i=$((i + 1))
	done
	msg_ok "$name" get_img_name "$i"
	[ -z "$MSG_OUT" ] || dmq_fail "get_img_name $i (no such image): '$MSG_OUT'"
	echo "chain ($n): $*"
}

# chain_specs IDX...: CHAIN as dmq_open.py specs in SPECS, the deltas at
# these indexes opened read-write (the top is anyway, with --rw)
chain_specs() {
	local i j s
	SPECS=()
	for i in "${!CHAIN[@]}"; do
		s=${CHAIN[i]}
		for j in "$@"; do
			[ "$j" = "$i" ] && s="rw:$s"
		done
		SPECS+=("$s")
	done
}

# map_rw SPEC...: writable table "v"; its node in DEV
map_rw() {
	dmq_create v --rw "$@" || dmq_fail "dmsetup create --rw failed for $*"
	DEV=$(dmq_dev v) || dmq_fail "no device node"
	[ "$(blockdev --getro "$DEV")" = 0 ] || dmq_fail "$DEV is read-only"
}

# dump_before TOP: the device into before.raw, which must be what
# `qemu-img convert` of TOP (the top of the mapped chain) gives
dump_before() {
	dump "$DEV" before.raw
	convert "$1" chain.raw
	same chain.raw before.raw "the device does not read like $1 (qemu-img convert)"
	rm -f chain.raw
}

# no_backing IMG: qemu-img info IMG works and shows no backing file (the
# info is captured and checked first: a failing qemu-img must not pass)
no_backing() {
	local info b
	info=$("$QEMU_IMG" info -U --output=json "$1" 2>qinfo.err) ||
		{ cat qinfo.err; dmq_fail "qemu-img info $1 failed"; }
	b=$("$PYTHON" -c 'import json, sys
d = json.load(sys.stdin)
print("yes" if "backing-filename" in d else "no" if "virtual-size" in d else "?")' <<<"$info") ||
		{ printf '%s\n' "$info"; dmq_fail "qemu-img info $1: not JSON"; }
	case $b in
	no) echo "$1 has no backing file" ;;
	yes) "$QEMU_IMG" info -U "$1"; dmq_fail "$1 still has a backing file" ;;
	*) printf '%s\n' "$info"; dmq_fail "qemu-img info $1: no virtual-size" ;;
	esac
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

# ------------------------------------------------------------- fixtures

# mk_chain N OPTS: the first N of base.qcow2 < o1.qcow2 < o2.qcow2 <
# top.qcow2 (DEV_SIZE each) in CHAIN. Every delta has its own data:
# text, random, patterns, zeroes (write -z) over lower data, compressed
# clusters in the base, COW of a compressed cluster, unaligned writes and
# writes smaller than a subcluster (2k with extended_l2 and 64k clusters).
mk_chain() {
	local n=$1 o=$2
	dmq_img_create base.qcow2 "$DEV_SIZE" "$o"
	dmq_write base.qcow2 t:0:4M r:4M+512:1M ct:6M:128k P0x11:8M:2M \
		z:9M:64k t:12M:3M r:20M:2M cr:26M:64k P0x22:30M:2M
	CHAIN=(base.qcow2)
	[ "$n" -ge 2 ] || return 0
	dmq_img_create o1.qcow2 "$DEV_SIZE" "$o" base.qcow2
	dmq_write o1.qcow2 r:1M:256k z:2M:128k t:5M+3k:9k P0x33:9M+64k:1M \
		r:16M:1M z:21M:64k r:6M+64k:4k
	CHAIN+=(o1.qcow2)
	[ "$n" -ge 3 ] || return 0
	dmq_img_create o2.qcow2 "$DEV_SIZE" "$o" o1.qcow2
	dmq_write o2.qcow2 P0x44:0:64k t:3M:1M z:8M+64k:192k r:13M+512:100k \
		P0x55:24M:2M r:17M+512:1k z:18M+2k:2k t:19M+100:700
	CHAIN+=(o2.qcow2)
	[ "$n" -ge 4 ] || return 0
	dmq_img_create top.qcow2 "$DEV_SIZE" "$o" o2.qcow2
	dmq_write top.qcow2 r:64k:64k t:7M:1M z:12M:512k P0x66:31M:1M \
		r:2M+4k:4k t:9M+1k:3k z:16M+64k:64k r:20M+2k:1k
	CHAIN+=(top.qcow2)
}

# mk_big: base.qcow2 < top.qcow2, 128 MiB, 4k clusters, ~96 MiB of data in
# the top: copying it into the base takes long enough to act on "copying"
mk_big() {
	dmq_img_create base.qcow2 128M cluster_size=4k
	dmq_write base.qcow2 t:0:8M P0x11:64M:8M r:120M:1M
	dmq_img_create top.qcow2 128M cluster_size=4k base.qcow2
	dmq_write top.qcow2 P0x5a:0:40M r:40M+512:4M P0xa5:48M:48M t:100M:4M \
		z:120M+4k:8k
	CHAIN=(base.qcow2 top.qcow2)
}

# ------------------------------------------------------------------ fio

# fio_jobs DEV [log] [fio options]: FIO_ARGS for two randwrite jobs with
# crc32c verify, one per half of DEV (512 B to 64 KiB, so partial clusters
# and subclusters); "log" adds write_iologs j0.iolog/j1.iolog
fio_jobs() {
	local dev=$1 half size log0=() log1=()
	shift
	if [ "${1:-}" = log ]; then
		log0=(--write_iolog=j0.iolog)
		log1=(--write_iolog=j1.iolog)
		shift
	fi
	half=$(($(blockdev --getsize64 "$dev") / 2))
	size=$((half - half / 16))
	FIO_ARGS=(--filename="$dev" --direct=1 --ioengine=libaio
		--rw=randwrite --bsrange=512-64k --iodepth=4 --size="$size"
		--io_size="$FIO_IO" --verify=crc32c --verify_fatal=1
		--randrepeat=1 "$@"
		--name=j0 --offset=0 --randseed="$FIO_SEED" "${log0[@]}"
		--name=j1 --offset="$half" --randseed=$((FIO_SEED + 1000))
		"${log1[@]}")
}

# fio_check LOG RC WHAT: fio's status and log are clean
fio_check() {
	local log=$1 rc=$2 bad
	bad=$(grep -Ei 'verify|bad magic|bad header|crc32c|err= *[1-9]|error' "$log")
	if [ "$rc" -ne 0 ] || [ -n "$bad" ]; then
		cat "$log"
		dmq_fail "$3: fio failed (rc=$rc)"
	fi
	grep -q 'read: IOPS=' "$log" || { cat "$log"; dmq_fail "$3: fio did not verify"; }
	grep -E '^ *(write|read): IOPS' "$log" | sed "s/^ */$3: /"
}

# fio_start DEV: the jobs in the background (FIO_PID)
fio_start() {
	rm -f j0.iolog j1.iolog
	# 1 MiB/s: the writes go on for ~4 s, while the merge runs
	fio_jobs "$1" log --rate=,1m
	echo "+ $FIO ${FIO_ARGS[*]} &"
	"$FIO" --output=fio.log "${FIO_ARGS[@]}" &
	FIO_PID=$!
	BG_PIDS+=("$FIO_PID")
}

fio_wait() {
	local rc
	wait "$FIO_PID"
	rc=$?
	fio_check fio.log "$rc" "fio during the merge"
	grep -q 'write: IOPS=' fio.log || { cat fio.log; dmq_fail "fio did not write"; }
}

# fio_verify DEV: read back and verify what fio_start wrote
fio_verify() {
	local rc
	fio_jobs "$1" --verify_only
	"$FIO" --output=fio-verify.log "${FIO_ARGS[@]}"
	rc=$?
	fio_check fio-verify.log "$rc" "fio --verify_only after the merge"
}


# ------------------------------------------------------- backward merges

# backward_case DEPTH nofio|fio [default]: merge the delta at DEPTH of
# CHAIN (0 = top) into the one below it, with fio writing meanwhile or not;
# "default" omits the depth argument (0 is the default)
backward_case() {
	local depth=$1 mode=$2 n m lower new=() i top arg=$1
	[ "${3:-}" = default ] && arg=
	[ "$mode" = fio ] && need "$FIO"
	n=${#CHAIN[@]}
	m=$((n - 1 - depth))
	lower=$((m - 1))
	dmq_check_images "${CHAIN[@]}"
	for i in "${!CHAIN[@]}"; do
		[ "$i" != "$m" ] && new+=("${CHAIN[i]}")
	done
	# what the merged delta provides: the receiving one must read so after
	convert "${CHAIN[m]}" merged-view.raw
	sha256sum "${CHAIN[m]}" >merged.sha256 || dmq_fail "sha256sum"
	trap on_exit EXIT
	chain_specs "$lower"
	map_rw "${SPECS[@]}"
	expect_chain v "${CHAIN[@]}"
	expect_idle v merge_backward
	dump_before "${CHAIN[-1]}"
	if [ "$mode" = fio ]; then
		fio_start "$DEV"
		sleep 1
	fi
	# shellcheck disable=SC2086	# no depth argument for "default"
	msg_ok v merge_backward start -1 $arg
	expect_merge v merge_backward "$depth"
	echo "started: $PROG"
	wait_stage v merge_backward ready
	local waited=0
	if [ "$mode" = fio ] && ! dmq_complete_under_io; then
		fio_wait
		waited=1
	fi
	msg_ok v merge_backward complete
	[ -z "$MSG_OUT" ] || echo "complete: $MSG_OUT"
	expect_idle v merge_backward
	expect_chain v "${new[@]}"
	if [ "$mode" = fio ]; then
		[ "$waited" = 1 ] || fio_wait
		fio_verify "$DEV"
	fi
	dump "$DEV" after.raw
	if [ "$mode" = fio ]; then
		check_unwritten before.raw after.raw j0.iolog j1.iolog ||
			dmq_fail "data outside fio's writes changed"
	else
		same before.raw after.raw "the device changed across the merge"
		echo "device unchanged across the merge"
	fi
	dmq_remove v || dmq_fail "dmsetup remove failed"

	dmq_check_images "${CHAIN[@]}"
	echo "qemu-img check clean: ${CHAIN[*]}"
	# a merged top (writable) had its clusters moved, not copied
	if [ "$m" -eq $((n - 1)) ]; then
		local own
		own=$(own_clusters "${CHAIN[m]}") || dmq_fail "qemu-img map ${CHAIN[m]}"
		[ "$own" = 0 ] || dmq_fail "${CHAIN[m]} still holds $own data clusters: not moved"
		echo "${CHAIN[m]} holds no data clusters: they were moved"
	fi
	# the merged file is untouched unless it was the writable top
	if [ "$m" -ne $((n - 1)) ]; then
		sha256sum -c --quiet merged.sha256 || dmq_fail "${CHAIN[m]} changed"
		# the kernel keeps the backing file names: relink the delta above
		dmq_run "$QEMU_IMG" rebase -u -b "${CHAIN[lower]}" -F qcow2 "${CHAIN[m + 1]}"
	fi
	top=${new[-1]}
	convert "$top" new.raw
	same after.raw new.raw "qemu-img convert of $top differs from the device"
	echo "qemu-img convert of $top equals the device"
	if [ "$mode" != fio ] || [ "$depth" -ne 0 ]; then
		convert "${CHAIN[lower]}" lower-view.raw
		same merged-view.raw lower-view.raw \
			"${CHAIN[lower]} does not read like ${CHAIN[m]} did"
		echo "${CHAIN[lower]} now reads like ${CHAIN[m]} did"
	fi
	rm -f ./*.raw
}

case_backward_d0() {
	mk_chain 4 cluster_size=64k
	backward_case 0 nofio default
}

case_backward_d1() {
	mk_chain 4 cluster_size=64k
	backward_case 1 nofio
}

case_backward_d2() {
	mk_chain 4 cluster_size=64k
	backward_case 2 nofio
}

case_backward_d0_fio() {
	FIO_SEED=10
	mk_chain 4 cluster_size=64k
	backward_case 0 fio
}

case_backward_d1_fio() {
	FIO_SEED=11
	mk_chain 4 cluster_size=64k
	backward_case 1 fio
}

case_backward_d2_fio() {
	FIO_SEED=12
	mk_chain 4 cluster_size=64k
	backward_case 2 fio
}

# the top (~96 MiB in 4k clusters) merged while fio writes to it: guest
# writes land behind and ahead of the walker (redo list) and after ready
case_backward_big_fio() {
	FIO_SEED=13
	mk_big
	backward_case 0 fio
}

# `complete` while the guest reads at queue depth 16 with no rate limit
# (reads: writes at that rate keep the merge from ever being ready): the
# message returns while the reads go on (nothing after the unlink waits
# for the in-flight counter to be idle, which a steady load need not let
# it be), and the device reads the same before and after, and what
# qemu-img convert of the base reads.
case_backward_complete_busy() {
	local pid
	dmq_needs_kernel "a merge that completes under a guest's I/O"
	need "$FIO"
	mk_chain 2 cluster_size=64k
	trap on_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	echo "+ $FIO (4k random reads, QD16, until killed) &"
	"$FIO" --output=busy.log --filename="$DEV" --direct=1 --ioengine=libaio \
		--rw=randread --bs=4k --iodepth=16 --time_based --runtime=300 --name=busy &
	pid=$!
	BG_PIDS+=("$pid")
	sleep 2
	kill -0 "$pid" 2>/dev/null || { cat busy.log; dmq_fail "fio did not start"; }
	msg_ok v merge_backward start -1 0
	wait_stage v merge_backward ready
	msg_ok v merge_backward complete
	kill -0 "$pid" 2>/dev/null || dmq_fail "complete returned only after the reads stopped"
	echo "complete returned while the guest kept reading"
	kill "$pid"
	wait "$pid" 2>/dev/null
	expect_idle v merge_backward
	expect_chain v base.qcow2
	reads_then_removed v "$DEV" before.raw base.qcow2
	rm -f ./*.raw
}

# 64k clusters with 2k subclusters: partial-subcluster data in every delta
case_backward_extl2() {
	mk_chain 4 cluster_size=64k,extended_l2=on
	backward_case 1 nofio
}

case_backward_extl2_fio() {
	FIO_SEED=13
	mk_chain 4 cluster_size=64k,extended_l2=on
	backward_case 0 fio
}

# merges again with md_cache_pages=16 (DMQ_MD_CACHE_PAGES=16 runs them all
# so): both deltas' L2 and refcount pages are evicted while the walker copies
case_md16_backward_d0_fio() {
	dmq_with_md_cache 16 case_backward_d0_fio
}

case_md16_backward_extl2() {
	dmq_with_md_cache 16 case_backward_extl2
}

# -------------------------------------------------------- forward merges

# forward_case DEPTH [default]: merge the delta at DEPTH of a 3-deep chain
# into the one above it; "default" omits the depth argument (1)
forward_case() {
	local depth=$1 arg=$1 n l u new=() i top
	[ "${2:-}" = default ] && arg=
	mk_chain 3 cluster_size=64k
	dmq_check_images "${CHAIN[@]}"
	n=${#CHAIN[@]}
	l=$((n - 1 - depth))
	u=$((l + 1))
	for i in "${!CHAIN[@]}"; do
		[ "$i" != "$l" ] && new+=("${CHAIN[i]}")
	done
	convert "${CHAIN[u]}" upper-view.raw
	sha256sum "${CHAIN[l]}" >lower.sha256 || dmq_fail "sha256sum"
	trap on_exit EXIT
	chain_specs "$u"
	map_rw "${SPECS[@]}"
	expect_chain v "${CHAIN[@]}"
	expect_idle v merge_forward
	dump_before "${CHAIN[-1]}"
	# shellcheck disable=SC2086	# no depth argument for "default"
	msg_ok v merge_forward start -1 $arg
	expect_merge v merge_forward "$depth"
	echo "started: $PROG"
	wait_stage v merge_forward ready
	msg_ok v merge_forward complete
	expect_idle v merge_forward
	expect_chain v "${new[@]}"
	dump "$DEV" after.raw
	same before.raw after.raw "the device changed across the merge"
	echo "device unchanged across the merge"
	dmq_remove v || dmq_fail "dmsetup remove failed"

	dmq_check_images "${CHAIN[@]}"
	echo "qemu-img check clean: ${CHAIN[*]}"
	sha256sum -c --quiet lower.sha256 || dmq_fail "${CHAIN[l]} changed"
	if [ "$l" -eq 0 ]; then
		# the receiving delta is the new base: no backing file any more
		no_backing "${CHAIN[u]}"
	else
		dmq_run "$QEMU_IMG" rebase -u -b "${CHAIN[l - 1]}" -F qcow2 "${CHAIN[u]}"
	fi
	top=${new[-1]}
	convert "$top" new.raw
	same after.raw new.raw "qemu-img convert of $top differs from the device"
	echo "qemu-img convert of $top equals the device"
	convert "${CHAIN[u]}" upper-after.raw
	same upper-view.raw upper-after.raw "${CHAIN[u]} reads differently"
	echo "${CHAIN[u]} reads as before"
	rm -f ./*.raw
}

# the middle delta into the writable top
case_forward_d1() {
	forward_case 1 default
}

# the base into the middle delta (opened read-write)
case_forward_d2() {
	forward_case 2
}

# ---------------------------------------------------------------- eventfd

# eventfd_merge NAME KIND DEPTH: start with a fresh eventfd (dmq_eventfd.py)
# and wait for it; it must have counted 1, and the merge must be ready
eventfd_merge() {
	local out
	out=$("$PYTHON" "$DMQ_DIR/dmq_eventfd.py" --timeout "$MERGE_TIMEOUT" \
		"$DMSETUP" message "$(dmq_full_name "$1")" 0 -- "$2" start '{efd}' "$3")
	case $? in
	0) ;;
	1) progress "$1" "$2"; dmq_fail "$2: no eventfd signal ($out; $PROG)" ;;
	*) dmq_fail "$2 start with an eventfd failed: $out" ;;
	esac
	echo "$2 depth $3: $out"
	[[ $out =~ ^eventfd=1\  ]] || dmq_fail "eventfd counter is not 1: $out"
	progress "$1" "$2"
	[ "$STAGE" = ready ] || dmq_fail "signalled, but '$PROG'"
}

# base < o1 < o2: o1 into base (backward, depth 1), then the base into o2
# (forward, depth 1), each signalled through an eventfd: o2 alone is left
case_eventfd() {
	mk_chain 3 cluster_size=64k
	dmq_check_images "${CHAIN[@]}"
	sha256sum o1.qcow2 >o1.sha256 || dmq_fail "sha256sum"
	trap on_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	eventfd_merge v merge_backward 1
	msg_ok v merge_backward complete
	expect_chain v base.qcow2 o2.qcow2
	eventfd_merge v merge_forward 1
	msg_ok v merge_forward complete
	expect_idle v merge_forward
	expect_chain v o2.qcow2
	dump "$DEV" after.raw
	same before.raw after.raw "the device changed across the merges"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images "${CHAIN[@]}"
	sha256sum -c --quiet o1.sha256 || dmq_fail "o1.qcow2 changed"
	no_backing o2.qcow2
	convert o2.qcow2 o2.raw
	same before.raw o2.raw "o2.qcow2 alone differs from the chain"
	echo "o2.qcow2 alone reads like the chain did"
}

# ----------------------------------------------------------------- cancel

# after_cancel NAME IMG...: no merge, the chain unchanged, the device as in
# before.raw; remove; the files check clean and the top still converts to
# before.raw
after_cancel() {
	local name=$1 top
	shift
	expect_idle "$name" merge_backward
	expect_chain "$name" "$@"
	dump "$DEV" after.raw
	same before.raw after.raw "the device changed"
	echo "device unchanged"
	dmq_remove "$name" || dmq_fail "dmsetup remove failed"
	dmq_check_images "$@"
	echo "qemu-img check clean: $*"
	top=${*: -1}
	convert "$top" top.raw
	same before.raw top.raw "qemu-img convert of $top differs from the device"
	echo "qemu-img convert of $top equals the device"
	rm -f after.raw top.raw
}

# start_copying NAME KIND DEPTH: start a merge and check it is copying
start_copying() {
	msg_ok "$1" "$2" start -1 "$3"
	expect_merge "$1" "$2" "$3"
	[ "$STAGE" = copying ] ||
		dmq_fail "copying was over before anything could be done: '$PROG'"
	echo "started: $PROG"
}

case_cancel_copying() {
	mk_big
	trap on_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	start_copying v merge_backward 0
	msg_ok v merge_backward cancel
	after_cancel v "${CHAIN[@]}"
}

# cancel a ready merge; then the same merge again, completed this time
case_cancel_ready() {
	mk_chain 4 cluster_size=64k
	dmq_check_images "${CHAIN[@]}"
	sha256sum o2.qcow2 >o2.sha256 || dmq_fail "sha256sum"
	trap on_exit EXIT
	chain_specs 1
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	msg_ok v merge_backward start -1 1
	wait_stage v merge_backward ready
	msg_ok v merge_backward cancel
	after_cancel v "${CHAIN[@]}"

	echo "again, and complete it"
	map_rw "${SPECS[@]}"
	msg_ok v merge_backward start -1 1
	wait_stage v merge_backward ready
	msg_ok v merge_backward complete
	expect_chain v base.qcow2 o1.qcow2 top.qcow2
	dump "$DEV" after.raw
	same before.raw after.raw "the device changed across the merge"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images "${CHAIN[@]}"
	sha256sum -c --quiet o2.sha256 || dmq_fail "o2.qcow2 changed"
	dmq_run "$QEMU_IMG" rebase -u -b o1.qcow2 -F qcow2 top.qcow2
	convert top.qcow2 top.raw
	same before.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
	echo "merged after a cancel: the device and the files agree"
}

# `dmsetup suspend` cancels a running merge
case_suspend_cancels() {
	mk_big
	trap on_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	start_copying v merge_backward 0
	dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
	# progress is no I/O: it answers while suspended
	expect_idle v merge_backward
	echo "suspended: $PROG"
	dmq_run "$DMSETUP" resume "$(dmq_full_name v)"
	after_cancel v "${CHAIN[@]}"
}

# I/O errors on the receiving delta (set_fault_injection) fail the merge:
# stage=failed with an errno, the eventfd is signalled, complete is
# refused, cancel drops it and nothing changed
case_failed_eio() {
	local pid out rc end
	mk_big
	trap on_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	"$PYTHON" "$DMQ_DIR/dmq_eventfd.py" --timeout "$MERGE_TIMEOUT" \
		"$DMSETUP" message "$(dmq_full_name v)" 0 -- merge_backward start '{efd}' 0 \
		>efd.out 2>&1 &
	pid=$!
	BG_PIDS+=("$pid")
	end=$((SECONDS + 30))
	while :; do
		progress v merge_backward
		[ "$STAGE" != none ] && break
		kill -0 "$pid" 2>/dev/null || { cat efd.out; dmq_fail "merge start failed"; }
		[ "$SECONDS" -lt "$end" ] || dmq_fail "the merge did not start"
		sleep 0.1
	done
	[ "$STAGE" = copying ] ||
		dmq_fail "copying was over before anything could be done: '$PROG'"
	msg_ok v set_fault_injection 0 100000
	wait_stage v merge_backward failed
	wait "$pid"
	rc=$?
	out=$(cat efd.out)
	[ "$rc" = 0 ] || dmq_fail "no eventfd signal on failure (rc=$rc): $out"
	echo "$out"
	echo "failed with errno $MERR"
	expect_msg_err v EBUSY merge_backward complete
	msg_ok v set_fault_injection 0 0
	# as the C target: a failed merge is over, a new start is allowed at
	# once (no cancel first); this one is cancelled once ready
	msg_ok v merge_backward start -1 0
	wait_stage v merge_backward ready
	echo "started again after the failure, without a cancel"
	msg_ok v merge_backward cancel
	expect_idle v merge_backward
	expect_chain v "${CHAIN[@]}"
	dump "$DEV" after.raw
	same before.raw after.raw "the device changed"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	# the failed writes may have leaked clusters, nothing worse
	for out in "${CHAIN[@]}"; do
		"$QEMU_IMG" check -f qcow2 "$out" >check.log 2>&1
		rc=$?
		case $rc in
		0) echo "$out: clean" ;;
		3) echo "$out: leaked clusters only" ;;
		*) cat check.log; dmq_fail "qemu-img check $out: rc=$rc" ;;
		esac
	done
	convert top.qcow2 top.raw
	same before.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
}

# --------------------------------------------------------- bad arguments

case_bad_args() {
	local n
	mk_chain 4 cluster_size=64k
	dmq_check_images "${CHAIN[@]}"
	trap on_exit EXIT
	# o2 (below the top) read-write, o1 and the base read-only
	chain_specs 2
	map_rw "${SPECS[@]}"
	dump_before "${CHAIN[-1]}"
	progress v merge_backward
	echo "idle: $PROG"
	[ "$STAGE" = none ] || dmq_fail "a merge before any start: '$PROG'"

	expect_msg_err v EINVAL merge_backward
	expect_msg_err v EINVAL merge_backward foo
	expect_msg_err v EINVAL merge_forward bar
	expect_msg_err v EINVAL merge_backward start
	# no delta below (above) the one at that depth: ENOENT (the C target)
	expect_msg_err v ENOENT merge_backward start -1 3
	expect_msg_err v ENOENT merge_backward start -1 4
	expect_msg_err v EINVAL merge_backward start -1 x
	expect_msg_err v ENOENT merge_forward start -1 0
	expect_msg_err v ENOENT merge_forward start -1 4
	expect_msg_err v EBADF merge_backward start 999 0
	expect_msg_err v EBADF merge_forward start 999 1
	expect_msg_err v EBUSY merge_backward complete
	expect_msg_err v EBUSY merge_forward complete
	# cancel always succeeds, also with nothing running (the C target)
	msg_ok v merge_backward cancel
	msg_ok v merge_forward cancel
	# the delta receiving the data is opened read-only
	expect_msg_err v EACCES merge_backward start -1 1
	expect_msg_err v EACCES merge_backward start -1 2
	expect_msg_err v EACCES merge_forward start -1 3
	progress v merge_backward
	[ "$STAGE" = none ] || dmq_fail "a refused start left '$PROG'"

	# one merge at a time, running or ready
	msg_ok v merge_backward start -1 0
	expect_msg_err v EBUSY merge_backward start -1 0
	expect_msg_err v EBUSY merge_forward start -1 1
	wait_stage v merge_backward ready
	expect_msg_err v EBUSY merge_backward start -1 0
	expect_msg_err v EBUSY merge_forward start -1 1
	msg_ok v merge_backward cancel
	expect_idle v merge_backward

	n=$(chain_len v) || dmq_fail "dmsetup table"
	[ "$n" = 4 ] || dmq_fail "$n images after the refused messages"
	dump "$DEV" after.raw
	same before.raw after.raw "the device changed"
	echo "device unchanged"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images "${CHAIN[@]}"

	# a lower delta smaller than the merged one
	dmq_img_create small.qcow2 16M cluster_size=64k
	dmq_write small.qcow2 t:0:1M
	dmq_img_create big.qcow2 32M cluster_size=64k small.qcow2
	dmq_write big.qcow2 r:512k:1M P0x77:20M:1M
	map_rw rw:small.qcow2 big.qcow2
	expect_msg_err v EBADSLT merge_backward start -1 0
	progress v merge_backward
	[ "$STAGE" = none ] || dmq_fail "a refused start left '$PROG'"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images small.qcow2 big.qcow2
}

# Cases whose injected faults make the target log I/O and refcount errors.
DMQ_FAULT_CASES="failed_eio tables_past_end"

# own_clusters IMG: data clusters IMG holds itself (qemu-img map, depth 0)
own_clusters() {
	"$QEMU_IMG" map -f qcow2 --output=json "$1" | "$PYTHON" -c '
import json, sys
print(sum(1 for e in json.load(sys.stdin) if e.get("depth") == 0 and e.get("data")))'
}

# expect_dirty IMG 0|1 WHEN: the qcow2 dirty bit (incompatible bit 0) of IMG
expect_dirty() {
	local f
	f=$(dmq_header "$1" incompatible_features) || dmq_fail "header of $1"
	[ $((f & 1)) = "$2" ] || dmq_fail "$1: dirty bit $((f & 1)) $3, expected $2"
	echo "$1: dirty=$2 $3"
}

# module_with [PARAM=VALUE...]: dm-qcow2 loaded again with these parameters
module_with() {
	dmq_run rmmod dm_qcow2
	dmq_run insmod "$DMQ_MODULE" "$@"
}

dirty_exit() {
	on_exit
	dmq_remove_all
	rmmod dm_qcow2 2>/dev/null
	insmod "$DMQ_MODULE" 2>/dev/null
}

# kernel_sets_dirty_bit (read-only parameter: the module is loaded again
# with it). Off, the kernel never writes the dirty bit, a merge neither.
# On, as the C target: resume sets it on the top and suspend clears it,
# the merge target is dirty while the merge runs, complete clears the
# removed delta's bit and leaves the delta now live (the top) dirty.
case_dirty_bit() {
	dmq_needs_kernel "module parameters"
	[ -f "${DMQ_MODULE:-}" ] || dmq_skip "no DMQ_MODULE to load again"
	mk_chain 2 cluster_size=64k
	trap dirty_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	expect_dirty o1.qcow2 0 "live, parameter off"
	msg_ok v merge_backward start -1 0
	expect_dirty base.qcow2 0 "merging, parameter off"
	wait_stage v merge_backward ready
	msg_ok v merge_backward complete
	expect_dirty base.qcow2 0 "after complete, parameter off"
	expect_dirty o1.qcow2 0 "removed, parameter off"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2 o1.qcow2

	mk_chain 2 cluster_size=64k
	module_with kernel_sets_dirty_bit=1
	map_rw "${SPECS[@]}"
	expect_dirty o1.qcow2 1 "live"
	expect_dirty base.qcow2 0 "live, below the top"
	dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
	expect_dirty o1.qcow2 0 "suspended"
	dmq_run "$DMSETUP" resume "$(dmq_full_name v)"
	expect_dirty o1.qcow2 1 "resumed"
	msg_ok v merge_backward start -1 0
	expect_dirty base.qcow2 1 "merging"
	wait_stage v merge_backward ready
	msg_ok v merge_backward complete
	expect_chain v base.qcow2
	expect_dirty o1.qcow2 0 "removed by the merge"
	expect_dirty base.qcow2 1 "the live top after complete"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	expect_dirty base.qcow2 0 "removed"
	dmq_check_images base.qcow2 o1.qcow2
	module_with
}

# The top of a 512 TiB chain whose L1 names a million L2 tables past the end
# of its file (read as zeroes), all "in use" by refcount table entries that
# name one cluster of 0xff bytes, the file then grown sparsely to 6 GiB
# (64 Ki of the tables inside it, in a hole: an apparent size bounds
# nothing; each is read once to confirm it holds zeroes): the merge walker
# skips each such table's range whole (it went through their 2^33 clusters
# one by one), reaches ready, and the base then holds the top's data (the
# first 2 MiB of the device read the same before and after; the base checks
# clean). Then a top whose L1 names its one table 1 Mi
# times: the merge fails with EUCLEAN at once (a dmesg line says why).
case_tables_past_end() {
	local l1 n ff t
	dmq_needs_kernel "the merge walker's skip of tables past the end"
	dmq_img_create base.qcow2 $((512 << 40)) cluster_size=64k
	dmq_write base.qcow2 t:0:2M
	dmq_img_create top.qcow2 $((512 << 40)) cluster_size=64k base.qcow2
	dmq_write top.qcow2 P0x6b:64k:64k P0xff:1M:64k
	l1=$(dmq_header top.qcow2 l1_table_offset) && n=$(dmq_header top.qcow2 l1_size) &&
		ff=$(dmq_py dmq_img entry top.qcow2 l2 1M) || dmq_fail "entries"
	ff=$((${ff#* } & ((1 << 56) - 512)))
	# the 0xff cluster stays in use but maps nothing (a merge frees the
	# top's data clusters, and this one is now a refcount block)
	dmq_run dmq_py dmq_img entry top.qcow2 l2 1M = 0
	"$PYTHON" -c 'import struct, sys
f = open(sys.argv[1], "r+b"); l1, n, ff = map(int, sys.argv[2:5])
f.seek(l1 + 8)
f.write(b"".join(struct.pack(">Q", 1 << 63 | (32768 + i) << 16) for i in range(1, n)))
rt = struct.unpack(">Q", open(sys.argv[1], "rb").read(56)[48:56])[0]
f.seek(rt + 8); f.write(struct.pack(">Q", ff) * 8191)' top.qcow2 "$l1" "$n" "$ff" ||
		dmq_fail "python"
	truncate -s 6G top.qcow2 || dmq_fail "truncate"
	echo "top.qcow2: L1 entries 1..$((n - 1)) name tables past the end of the file, the first 64 Ki of them inside it, in a hole (grown to 6 GiB)"
	CHAIN=(base.qcow2 top.qcow2)
	trap on_exit EXIT
	chain_specs 0
	map_rw "${SPECS[@]}"
	dmq_run dd if="$DEV" of=before.raw bs=1M count=2 iflag=direct status=none
	msg_ok v merge_backward start -1 0
	t=$SECONDS
	wait_stage v merge_backward ready
	echo "ready after $((SECONDS - t)) s"
	msg_ok v merge_backward complete
	expect_idle v merge_backward
	expect_chain v base.qcow2
	dmq_run dd if="$DEV" of=after.raw bs=1M count=2 iflag=direct status=none
	same before.raw after.raw "the device changed across the merge"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	dmq_check_images base.qcow2
	dmq_run "$QEMU_IMG" dd -f qcow2 -O raw bs=1M count=2 if=base.qcow2 of=base.raw
	cmp before.raw base.raw || dmq_fail "base.qcow2 does not hold the merged data"
	echo "base.qcow2 holds the top's data, checks clean"
	rm -f ./*.raw

	# every L1 entry names the top's one table (inside its file): the merge
	# fails (EUCLEAN) instead of walking 2^33 clusters; cancelled, the chain
	# reads as before
	dmq_img_create b2.qcow2 $((512 << 40)) cluster_size=64k
	dmq_img_create t2.qcow2 $((512 << 40)) cluster_size=64k b2.qcow2
	dmq_write t2.qcow2 P0x6b:64k:64k
	l1=$(dmq_header t2.qcow2 l1_table_offset) && n=$(dmq_header t2.qcow2 l1_size) &&
		ff=$(dmq_py dmq_img entry t2.qcow2 l1 0) || dmq_fail "entries"
	"$PYTHON" -c 'import struct, sys
f = open(sys.argv[1], "r+b"); l1, n, e = (int(a, 0) for a in sys.argv[2:5])
f.seek(l1 + 8); f.write(struct.pack(">Q", e) * (n - 1))' t2.qcow2 "$l1" "$n" "${ff#* }" ||
		dmq_fail "python"
	echo "t2.qcow2: all $n L1 entries name one table"
	CHAIN=(b2.qcow2 t2.qcow2)
	chain_specs 0
	map_rw "${SPECS[@]}"
	dmq_run dd if="$DEV" of=before.raw bs=1M count=1 skip=$((512 * 5)) iflag=direct status=none
	msg_ok v merge_backward start -1 0
	wait_stage v merge_backward failed
	[ "$MERR" = 117 ] || dmq_fail "failed with errno $MERR, not EUCLEAN (117)"
	expect_kmsg_merge "its L1 table named an L2 table more than once when loaded: merge stopped"
	msg_ok v merge_backward cancel
	expect_idle v merge_backward
	expect_chain v b2.qcow2 t2.qcow2
	dmq_run dd if="$DEV" of=after.raw bs=1M count=1 skip=$((512 * 5)) iflag=direct status=none
	same before.raw after.raw "the device changed"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	rm -f ./*.raw
}

# expect_kmsg_merge TEXT: the kernel logged a line with TEXT in this case
expect_kmsg_merge() {
	dmq_dmesg_case | grep -F -- "$1" || dmq_fail "no kernel line with '$1'"
}

DMQ_CASES=(
	backward_d0
	backward_d1
	backward_d2
	backward_d0_fio
	backward_d1_fio
	backward_d2_fio
	backward_big_fio
	backward_complete_busy
	backward_extl2
	backward_extl2_fio
	md16_backward_d0_fio
	md16_backward_extl2
	forward_d1
	forward_d2
	eventfd
	cancel_copying
	cancel_ready
	suspend_cancels
	failed_eio
	bad_args
	dirty_bit
	tables_past_end
)
# Long cases (`make check-full`): the depth-1 merge without writes (its fio
# variant stays), depth 0 and 2 under fio (backward_big_fio and the plain
# ones stay), extended L2 under fio (backward_extl2 stays), md_cache_pages=16
# under fio (md16_backward_extl2 stays).
DMQ_LONG_CASES=(backward_d1 backward_d0_fio backward_d2_fio backward_extl2_fio md16_backward_d0_fio)

dmq_md_cache_env
dmq_main "$@"
