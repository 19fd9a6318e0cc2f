#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The dm-qcow2 command (tools/dm-qcow2) against the target, every step
# checked against QEMU's view of the images:
#   connect_chain: a 3-deep chain (relative and absolute backing names)
#     found from the headers, read like `qemu-img convert`; list/status;
#     read-only mapping; disconnect by top path and by /dev/mapper/NAME.
#   snapshot_merge_ext4: ext4 on the device and a file workload while
#     `snapshot` runs twice and `merge --depth 1` once; then disconnect,
#     `qemu-img check` clean, QEMU reads the final chain (whose backing
#     names the tool rewrote) as the device did, files intact.
#   merge_forward: `merge --forward`, `merge --no-wait` then `merge` to
#     finish it, `merge --cancel`.
#   merge_interrupt: SIGINT during a merge cancels it cleanly.
#   resize: grow online (header and L1 while suspended, new length).
#   refusals: a dirty image with lazy refcounts, a missing backing file, a
#     non-root caller, a busy device on disconnect (then --deferred), a
#     table the kernel refuses (its constructor message shown), usage.
#   snapshot_fails: snapshots made to fail before suspend, while suspended,
#     after the load and after the swap leave the device resumed, with the
#     same chain and data, and the new file removed.
#
# Environment: DMQ_TOOL (default: target/release/dm-qcow2 of this tree,
# built by tools/check.sh and make kselftest).
#
# usage: qcow2_tool.sh [-l] [CASE...]

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

MIB=$((1 << 20))
DMQ_TOOL=${DMQ_TOOL:-$DMQ_DIR/../target/release/dm-qcow2}
DMQ_FAULT_CASES="refusals"
TOOL_OUT=

# tool ARGS...: run the tool, end the case if it fails; its stdout in TOOL_OUT
tool() {
	local rc
	[ "${DMQ_VERBOSE:-0}" = 1 ] && echo "+ dm-qcow2 $*"
	TOOL_OUT=$("$DMQ_TOOL" "$@" 2>tool.err)
	rc=$?
	if [ "$rc" -ne 0 ]; then
		printf '%s\n' "$TOOL_OUT"
		cat tool.err
		dmq_fail "dm-qcow2 $* failed (rc=$rc)"
	fi
}

# tool_fails RC TEXT ARGS...: the tool exits RC with one line containing TEXT
tool_fails() {
	local want=$1 text=$2 rc err
	shift 2
	"$DMQ_TOOL" "$@" >tool.out 2>tool.err
	rc=$?
	err=$(cat tool.err)
	[ "$rc" -eq "$want" ] || { cat tool.out; echo "$err"; dmq_fail "dm-qcow2 $*: rc=$rc, expected $want"; }
	grep -qF -- "$text" tool.err || { echo "$err"; dmq_fail "dm-qcow2 $*: no '$text' in the message"; }
	if [ "$want" = 1 ] && [ "$(wc -l <tool.err)" != 1 ]; then
		echo "$err"
		dmq_fail "dm-qcow2 $*: not one line"
	fi
	echo "refused (rc=$rc): $err" | head -n 1
}

# chain_files NAME: get_img_name 0..n-1 of the device, one a line
chain_files() {
	local full n i
	full=$(dmq_full_name "$1")
	n=$(chain_len "$1") || return 1
	for ((i = 0; i < n; i++)); do
		"$DMSETUP" message "$full" 0 get_img_name "$i" || return 1
	done
}

# active NAME: the device exists, is not suspended and has a live table
active() {
	local st
	st=$("$DMSETUP" info "$(dmq_full_name "$1")" | sed -n 's/^State: *//p')
	[ "$st" = ACTIVE ] || { echo "state of $1: '$st'"; return 1; }
}

# mk_chain3 [LOWER_SIZE]: base <- mid <- sub/top (24M; the lower ones 16M)
mk_chain3() {
	local ls=${1:-16M}
	dmq_img_create base.qcow2 "$ls" cluster_size=64k
	dmq_write base.qcow2 t:0:2M r:4M:1M
	mkdir -p sub
	dmq_img_create mid.qcow2 "$ls" cluster_size=64k base.qcow2
	dmq_write mid.qcow2 r:1M:512k P0x33:6M:1M
	# an absolute backing name, from another directory
	dmq_run "$QEMU_IMG" create -q -f qcow2 -o cluster_size=64k -b "$PWD/mid.qcow2" \
		-F qcow2 sub/top.qcow2 24M
	dmq_write sub/top.qcow2 P0x44:3M:64k r:10M:128k z:6M+64k:64k
}

case_connect_chain() {
	local full dev json
	full=$(dmq_full_name c)
	mk_chain3
	convert sub/top.qcow2 want.raw
	tool connect --name "$full" sub/top.qcow2
	dev=$TOOL_OUT
	[ "$dev" = "/dev/mapper/$full" ] || dmq_fail "connect printed '$dev'"
	[ -b "$dev" ] || dmq_fail "$dev is not a block device when connect returned"
	[ "$(chain_len c)" = 3 ] || dmq_fail "chain: $(chain_len c) images"
	[ "$(blockdev --getsize64 "$dev")" = $((24 * MIB)) ] || dmq_fail "size $(blockdev --getsize64 "$dev")"
	[ "$(blockdev --getro "$dev")" = 0 ] || dmq_fail "writable mapping is read-only"
	dump "$dev" dev.raw
	same want.raw dev.raw "the device does not read like qemu-img convert"
	echo "3-deep chain from the headers reads like qemu-img convert"

	tool list --json
	json=$TOOL_OUT
	JSON=$json "$PYTHON" - "$full" "$PWD" <<'PY' || dmq_fail "list --json: $json"
import json, os, sys
name, d = sys.argv[1], sys.argv[2]
devs = {x["name"]: x for x in json.loads(os.environ["JSON"])}
x = devs[name]
assert x["chain"] == [d + "/base.qcow2", d + "/mid.qcow2", d + "/sub/top.qcow2"], x["chain"]
assert x["size"] == 24 << 20 and not x["read_only"], x
assert x["status"]["images"] == "3" and x["status"]["merge"] == "none", x["status"]
PY
	tool status "$full"
	printf '%s\n' "$TOOL_OUT"
	grep -q "2: $PWD/sub/top.qcow2" <<<"$TOOL_OUT" || dmq_fail "status does not show the top"
	tool status sub/top.qcow2 --json
	grep -q "\"name\": \"$full\"" <<<"$TOOL_OUT" || dmq_fail "status by top path"

	# disconnect by the top's path (get_img_name)
	tool disconnect sub/top.qcow2
	dmq_dev_absent c || dmq_fail "device still there after disconnect by top path"
	[ -e "$dev" ] && dmq_fail "$dev left behind"

	# read-only, the chain given explicitly
	tool connect --read-only --name "$full" --chain base.qcow2 mid.qcow2 sub/top.qcow2
	[ "$(blockdev --getro "$dev")" = 1 ] || dmq_fail "--read-only mapping is writable"
	dump "$dev" dev.raw
	same want.raw dev.raw "the read-only device"
	tool disconnect "$dev"
	dmq_dev_absent c || dmq_fail "device still there after disconnect /dev/mapper/NAME"
	dmq_check_images base.qcow2 mid.qcow2 sub/top.qcow2
	echo "read-only --chain mapping; disconnect by path and by node"
}

# workload DIR N: N files of random data, their sums in DIR.sums
workload() {
	local i
	for ((i = 0; i < $2; i++)); do
		dd if=/dev/urandom of="$1/f$i" bs=64k count=$((1 + i % 7)) status=none conv=fsync || return 1
	done
}

case_snapshot_merge_ext4() {
	local full dev wpid n
	full=$(dmq_full_name e)
	need mkfs.ext4
	dmq_img_create base.qcow2 128M cluster_size=64k
	tool connect --name "$full" base.qcow2
	dev=$TOOL_OUT
	dmq_run mkfs.ext4 -q -F "$dev"
	mkdir mnt
	dmq_run mount -t ext4 "$dev" mnt
	mkdir mnt/a mnt/b mnt/c
	workload mnt/a 24 &
	wpid=$!
	sleep 1
	tool snapshot "$full" s1.qcow2
	echo "snapshot 1: $TOOL_OUT"
	workload mnt/b 24 || { umount mnt; dmq_fail "workload b"; }
	tool snapshot "$dev" s2.qcow2
	echo "snapshot 2: $TOOL_OUT"
	[ "$(chain_len e)" = 3 ] || { umount mnt; dmq_fail "chain after two snapshots: $(chain_len e)"; }
	workload mnt/c 16 &
	# s1 (depth 1) into base, while files are written
	"$DMQ_TOOL" merge "$full" --depth 1 >merge.out 2>&1 || {
		cat merge.out; wait; umount mnt; dmq_fail "merge --depth 1"; }
	cat merge.out
	wait "$wpid" || { umount mnt; dmq_fail "workload a"; }
	wait || { umount mnt; dmq_fail "workload c"; }
	[ "$(chain_len e)" = 2 ] || { umount mnt; dmq_fail "chain after the merge: $(chain_len e)"; }
	mapfile -t n < <(chain_files e)
	[ "${n[0]}" = "$PWD/base.qcow2" ] && [ "${n[1]}" = "$PWD/s2.qcow2" ] ||
		{ umount mnt; dmq_fail "chain after the merge: ${n[*]}"; }
	(cd mnt && find . -type f -print0 | sort -z | xargs -0 md5sum) >sums || dmq_fail "md5sum"
	echo "$(wc -l <sums) files written during two snapshots and a merge"
	dmq_run umount mnt
	dump "$dev" dev.raw
	tool disconnect "$full"
	dmq_dev_absent e || dmq_fail "device still there"
	dmq_check_images base.qcow2 s1.qcow2 s2.qcow2
	"$QEMU_IMG" info --backing-chain s2.qcow2 | grep -E '^(image|backing file):'
	[ "$("$QEMU_IMG" info --backing-chain s2.qcow2 | grep -c '^image:')" = 2 ] ||
		dmq_fail "qemu-img sees another chain than base <- s2"
	convert s2.qcow2 qemu.raw
	same dev.raw qemu.raw "QEMU reads the final chain differently from the device"
	dmq_run fsck.ext4 -n -f qemu.raw
	dmq_run mount -o ro,loop qemu.raw mnt
	(cd mnt && md5sum --quiet -c ../sums) || { umount mnt; dmq_fail "files differ under QEMU's view"; }
	dmq_run umount mnt
	echo "QEMU reads base <- s2 as the device did; fsck clean; files intact"
}

case_merge_forward() {
	local full dev
	full=$(dmq_full_name f)
	mk_chain3 24M
	convert sub/top.qcow2 want.raw
	tool connect --name "$full" sub/top.qcow2
	dev=$TOOL_OUT
	# mid (depth 1) into the top: the top then names base
	tool merge "$full" --forward
	[ "$(chain_len f)" = 2 ] || dmq_fail "chain after merge --forward: $(chain_len f)"
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after merge --forward"
	# a merge started without waiting, finished by a second call
	tool merge "$full" --no-wait
	# a suspend would cancel it: snapshot and resize refuse meanwhile
	tool_fails 1 "a merge is running" snapshot "$full" x.qcow2
	[ -e x.qcow2 ] && dmq_fail "x.qcow2 created while refusing"
	tool_fails 1 "a merge is running" resize "$full" 32M
	tool merge "$full"
	[ "$(chain_len f)" = 1 ] || dmq_fail "chain after merge --no-wait + merge: $(chain_len f)"
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after the backward merge"
	tool merge "$full" --cancel
	grep -q "no merge running" <<<"$TOOL_OUT" || dmq_fail "cancel without merge: '$TOOL_OUT'"
	tool_fails 1 "nothing to merge" merge "$full"
	tool disconnect "$full"
	dmq_check_images base.qcow2 mid.qcow2 sub/top.qcow2
	convert base.qcow2 qemu.raw
	same want.raw qemu.raw "QEMU reads the merged base differently"
	echo "forward, no-wait, follow-up and cancel merges"
}

case_refusals() {
	local full dev fd
	full=$(dmq_full_name r)
	# usage errors: 2
	tool_fails 2 "Usage" connect
	tool_fails 2 "unrecognized" frobnicate
	# dirty with lazy refcounts
	dmq_img_create d.qcow2 16M cluster_size=64k,lazy_refcounts=on
	dmq_patch d.qcow2 'incompatible_features|=1'
	tool_fails 1 "run qemu-img check -r all" connect --name "$full" d.qcow2
	dmq_dev_absent r || dmq_fail "device left after a refused connect"
	# read-only it is fine (nothing would be allocated)
	tool connect --read-only --name "$full" d.qcow2
	tool disconnect "$full"
	# a missing backing file is named
	dmq_img_create gone.qcow2 16M cluster_size=64k
	dmq_img_create t.qcow2 16M cluster_size=64k gone.qcow2
	rm gone.qcow2
	tool_fails 1 "backing file 'gone.qcow2' of t.qcow2" connect --name "$full" t.qcow2
	# not root
	if command -v setpriv >/dev/null &&
		setpriv --reuid=65534 --regid=65534 --clear-groups "$DMQ_TOOL" --version >/dev/null 2>&1; then
		setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all \
			"$DMQ_TOOL" list >tool.out 2>tool.err
		[ $? = 1 ] && grep -q "needs CAP_SYS_ADMIN (run as root)" tool.err ||
			{ cat tool.err; dmq_fail "nobody: no CAP_SYS_ADMIN message"; }
		cat tool.err
		setpriv --inh-caps=-all --bounding-set=-all "$DMQ_TOOL" list >tool.out 2>tool.err
		[ $? = 1 ] && grep -q "needs CAP_SYS_ADMIN (run as root)" tool.err ||
			{ cat tool.err; dmq_fail "root without capabilities: no CAP_SYS_ADMIN message"; }
	fi
	# busy on disconnect, then --deferred
	dmq_img_create ok.qcow2 16M cluster_size=64k
	tool connect --name "$full" ok.qcow2
	dev=$TOOL_OUT
	exec {fd}<"$dev"
	tool_fails 1 "busy" disconnect "$full"
	active r || dmq_fail "busy device not active after the refused disconnect"
	tool disconnect --deferred "$full"
	exec {fd}<&-
	sleep 0.5
	dmq_dev_absent r || dmq_fail "deferred remove did not happen at the last close"
	# a table the kernel refuses: its constructor message is shown
	# (the header's refcount zeroed: only the kernel checks metadata refcounts)
	dmq_img_create k.qcow2 16M cluster_size=64k,refcount_bits=64
	dmq_run dmq_py dmq_img entry k.qcow2 refb 0 = 0
	tool_fails 1 "Metadata cluster with refcount 0" connect --name "$full" k.qcow2
	dmq_dev_absent r || dmq_fail "device left after a refused table"
	echo "every refusal gave its message"
}

case_resize() {
	local full dev
	full=$(dmq_full_name z)
	mk_chain3
	tool connect --name "$full" sub/top.qcow2
	dev=$TOOL_OUT
	convert sub/top.qcow2 want.raw
	tool resize "$full" 40M
	[ "$(blockdev --getsize64 "$dev")" = $((40 * MIB)) ] ||
		dmq_fail "size after resize: $(blockdev --getsize64 "$dev")"
	dmq_run truncate -s 40M want.raw
	dmq_run dd if=/dev/urandom of=a.bin bs=64k count=2 status=none
	put a.bin "$dev" $((39 * MIB))
	dmq_run dd if=a.bin of=want.raw bs=4k seek=$((39 * MIB / 4096)) conv=notrunc status=none
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after resize"
	tool_fails 1 "shrinking is not supported" resize "$full" 32M
	tool disconnect "$full"
	dmq_check_images sub/top.qcow2
	convert sub/top.qcow2 qemu.raw
	same want.raw qemu.raw "QEMU reads the resized image differently"
	echo "resized 24M -> 40M online; shrinking refused"
}

# Ctrl-C during a merge cancels it: the chain and the data stay as before.
case_merge_interrupt() {
	local full dev pid rc i st
	full=$(dmq_full_name i)
	dmq_img_create base.qcow2 256M cluster_size=64k
	dmq_img_create top.qcow2 256M cluster_size=64k base.qcow2
	dmq_write top.qcow2 r:0:96M
	convert top.qcow2 want.raw
	tool connect --name "$full" top.qcow2
	dev=$TOOL_OUT
	"$DMQ_TOOL" merge "$full" >merge.out 2>&1 &
	pid=$!
	for ((i = 0; i < 200; i++)); do
		st=$("$DMSETUP" status "$full")
		case $st in *stage=copying*) break ;; esac
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -INT "$pid"
	wait "$pid"
	rc=$?
	cat merge.out
	if [ "$rc" = 0 ]; then
		# the merge won the race: it completed, which is fine too
		[ "$(chain_len i)" = 1 ] || dmq_fail "merge exited 0 but the chain has $(chain_len i) images"
		echo "the merge completed before the signal (no cancel tested)"
	else
		grep -q "merge cancelled (interrupted)" merge.out || dmq_fail "rc=$rc without the cancel message"
		[ "$(chain_len i)" = 2 ] || dmq_fail "chain after the cancel: $(chain_len i)"
		st=$("$DMSETUP" status "$full")
		case $st in *merge=none*) ;; *) dmq_fail "status after the cancel: $st" ;; esac
		active i || dmq_fail "device not active after the cancel"
		echo "interrupted merge cancelled: $st"
	fi
	dump "$dev" dev.raw
	same want.raw dev.raw "the device after the interrupted merge"
	tool disconnect "$full"
	dmq_check_images base.qcow2 top.qcow2
}

# unchanged NAME WANT...: the device is active, its chain is WANT, it reads
# as before.raw
unchanged() {
	local name=$1 n
	shift
	active "$name" || dmq_fail "device not active"
	mapfile -t n < <(chain_files "$name")
	[ "${n[*]}" = "$*" ] || dmq_fail "chain is '${n[*]}', expected '$*'"
	dump "$(dmq_dev "$name")" dev.raw
	same before.raw dev.raw "device content changed"
}

case_snapshot_fails() {
	local full dev p
	full=$(dmq_full_name s)
	mk_chain3
	tool connect --name "$full" sub/top.qcow2
	dev=$TOOL_OUT
	dmq_run dd if=/dev/urandom of=a.bin bs=64k count=4 status=none
	put a.bin "$dev" $((2 * MIB))
	dump "$dev" before.raw
	local want=("$PWD/base.qcow2" "$PWD/mid.qcow2" "$PWD/sub/top.qcow2")
	tool_fails 1 "nodir/new.qcow2" snapshot "$full" nodir/new.qcow2
	unchanged s "${want[@]}"
	for p in after-suspend after-load after-resume; do
		DM_QCOW2_FAULT=$p tool_fails 1 "fault injected at $p" snapshot "$full" new.qcow2
		[ -e new.qcow2 ] && dmq_fail "$p: new.qcow2 left behind"
		unchanged s "${want[@]}"
		echo "$p: device resumed with the old chain, new file removed"
	done
	# an existing file is never overwritten
	: >exists.qcow2
	tool_fails 1 "exists.qcow2" snapshot "$full" exists.qcow2
	unchanged s "${want[@]}"
	# and then a snapshot that works, writable after
	tool snapshot "$full" new.qcow2
	put a.bin "$dev" $((8 * MIB))
	dmq_run dd if=a.bin of=before.raw bs=4k seek=$((8 * MIB / 4096)) conv=notrunc status=none
	unchanged s "${want[@]}" "$PWD/new.qcow2"
	tool disconnect "$full"
	dmq_check_images base.qcow2 mid.qcow2 sub/top.qcow2 new.qcow2
	convert new.qcow2 qemu.raw
	same before.raw qemu.raw "QEMU reads the new chain differently"
}

# dmq_init and the kernel are needed; the tool too
if [ ! -x "$DMQ_TOOL" ] && [ "${1:-}" != -l ]; then
	ktap_print_header
	ktap_skip_all "dm-qcow2 tool not found at $DMQ_TOOL (cargo build --release -p dm-qcow2)"
	exit "$KSFT_SKIP"
fi

DMQ_CASES=(
	connect_chain
	snapshot_merge_ext4
	merge_forward
	merge_interrupt
	resize
	refusals
	snapshot_fails
)

dmq_main "$@"
