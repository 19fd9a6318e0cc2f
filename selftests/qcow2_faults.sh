#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dm-qcow2 when memory runs out. The kernel's fault injection (failslab and
# fail_page_alloc, set through debugfs) is limited by its stack-trace
# filter to call chains that pass through the module's text: only
# allocations the target makes, itself or in the host file system and
# block layer on its behalf, fail. The constructor with its first resume,
# a suspend/resume and the messages fail at each of their allocations in
# turn (fail-nth); I/O and a backward merge run with allocations failing
# at random. What must hold: no oops, warning, lockdep report or hang (the
# runner's dmesg scan); a failed constructor or resume leaves nothing
# behind and a later one works; every bio and message ends, failed ones
# with an error; data not written is unchanged, the device reads what
# qemu-img reads, and the images pass qemu-img check (leaked clusters
# allowed, as after a crash).
#
# usage: qcow2_faults.sh [-l] [CASE...]

set -u -o pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

FIO=${FIO:-fio}
MIB=$((1 << 20))
FI=/sys/kernel/debug
ATTRS=(failslab fail_page_alloc)
TIMES=1000000			# "times" while armed: what is left says how many failed
MAX_NTH=${DMQ_MAX_NTH:-400}	# allocations of one operation the sweep may find
DEV=

# ------------------------------------------------------- fault injection

fi_set() {
	echo "$3" >"$FI/$1/$2" 2>/dev/null || dmq_fail "cannot write $3 to $FI/$1/$2"
}

# module_text: "START END" of the loaded module's executable sections (the
# section addresses from sysfs, their sizes from the module file)
module_text() {
	local ko=${DMQ_MODULE:-}
	[ -r "$ko" ] || ko=$(modinfo -n dm_qcow2 2>/dev/null) || return 1
	"$PYTHON" - "$ko" /sys/module/dm_qcow2/sections <<-'EOF'
		import gzip, lzma, os, struct, sys
		ko, secdir = sys.argv[1], sys.argv[2]
		data = open(ko, "rb").read()
		if ko.endswith(".xz"):
		    data = lzma.decompress(data)
		elif ko.endswith(".gz"):
		    data = gzip.decompress(data)
		if data[:4] != b"\x7fELF" or data[4] != 2:
		    sys.exit("%s: not a 64-bit ELF file" % ko)
		addr = {}
		for n in os.listdir(secdir):
		    with open(os.path.join(secdir, n)) as f:
		        addr[n] = int(f.read(), 16)
		shoff, = struct.unpack_from("<Q", data, 0x28)
		shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3a)
		def sh(i):
		    return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
		strs = sh(shstrndx)[4]
		lo = hi = None
		for i in range(shnum):
		    name_off, _, flags, _, _, size = sh(i)
		    end = data.index(b"\0", strs + name_off)
		    name = data[strs + name_off:end].decode()
		    # SHF_EXECINSTR; init text is gone after the load
		    if not flags & 4 or not size or name.startswith(".init") or name not in addr:
		        continue
		    a = addr[name]
		    if a == 0:
		        sys.exit("section addresses read as 0 (kptr_restrict?)")
		    lo = a if lo is None else min(lo, a)
		    hi = a + size if hi is None else max(hi, a + size)
		if lo is None:
		    sys.exit("no executable section of %s in %s" % (ko, secdir))
		print(lo, hi)
	EOF
}

# faults_setup: both capabilities limited to the module's text, quiet
# (the stack dumps would read as warnings), sleeping allocations included,
# any order of pages, every task; nothing fails until armed
faults_setup() {
	local a range
	[ -w "$FI/failslab/probability" ] && [ -w "$FI/fail_page_alloc/probability" ] &&
		[ -e "$FI/failslab/require-start" ] ||
		dmq_skip "no fault injection (CONFIG_FAILSLAB, CONFIG_FAIL_PAGE_ALLOC, CONFIG_FAULT_INJECTION_STACKTRACE_FILTER, debugfs)"
	range=$(module_text) || dmq_fail "cannot find the module's text"
	trap faults_off EXIT
	for a in "${ATTRS[@]}"; do
		fi_set "$a" probability 0
		fi_set "$a" verbose 0
		fi_set "$a" task-filter N
		fi_set "$a" ignore-gfp-wait N
		fi_set "$a" interval 1
		fi_set "$a" space 0
		fi_set "$a" times "$TIMES"
		fi_set "$a" stacktrace-depth 32
		fi_set "$a" require-start "${range% *}"
		fi_set "$a" require-end "${range#* }"
	done
	fi_set fail_page_alloc ignore-gfp-highmem N
	fi_set fail_page_alloc min-order 0
	printf "module text %#x..%#x: its allocations may fail\n" ${range}
}

# faults_off: back to the kernel's defaults (nothing fails)
faults_off() {
	local a
	for a in "${ATTRS[@]}"; do
		echo 0 >"$FI/$a/probability"
		echo 1 >"$FI/$a/times"
		echo 0 >"$FI/$a/require-start"
		echo 18446744073709551615 >"$FI/$a/require-end"
		echo Y >"$FI/$a/ignore-gfp-wait"
		echo 2 >"$FI/$a/verbose"
	done 2>/dev/null
	echo 1 >"$FI/fail_page_alloc/min-order" 2>/dev/null
	echo Y >"$FI/fail_page_alloc/ignore-gfp-highmem" 2>/dev/null
	"$DMSETUP" resume "$(dmq_full_name v)" >/dev/null 2>&1
	return 0
}

# fi_arm: count injected failures from here (see fi_injected)
fi_arm() {
	local a
	for a in "${ATTRS[@]}"; do fi_set "$a" times "$TIMES"; done
}

# fi_injected: failures injected since fi_arm
fi_injected() {
	local a n=0 t
	for a in "${ATTRS[@]}"; do
		t=$(cat "$FI/$a/times") || dmq_fail "cannot read $FI/$a/times"
		n=$((n + TIMES - t))
	done
	echo "$n"
}

# random_faults PERCENT: every allocation through the module fails with
# that probability (0: none)
random_faults() {
	local a
	for a in "${ATTRS[@]}"; do fi_set "$a" probability "$1"; done
}

# nth_wrapper: ./dmsetup-nth, dmsetup with /proc/self/fail-nth set from
# DMQ_FAIL_NTH: the Nth allocation through the module in this task (the
# ioctls' context: constructor, resume, messages) fails, then none
nth_wrapper() {
	cat >dmsetup-nth <<-EOF
		#!/bin/sh
		echo "\$DMQ_FAIL_NTH" >/proc/self/fail-nth || exit 91
		exec "$(command -v "$DMSETUP")" "\$@"
	EOF
	chmod +x dmsetup-nth
}

# ---------------------------------------------------------------- images

# mk_chain: base.qcow2 < top.qcow2, 16 MiB, 64k clusters: plain, compressed
# and zero clusters in the base, data and a partial cluster in the top
mk_chain() {
	dmq_img_create base.qcow2 16M cluster_size=64k
	dmq_write base.qcow2 t:0:4M r:4M:2M ct:6M:512k z:7M:64k r:8M:2M
	dmq_img_create top.qcow2 16M cluster_size=64k base.qcow2
	dmq_write top.qcow2 P0x22:64k:64k r:12M+512:8k t:3M:1M
	convert top.qcow2 want.raw
	sha256sum base.qcow2 top.qcow2 >images.sha256 || dmq_fail "sha256sum"
}

map_rw() {
	dmq_create v --rw "$@" || dmq_fail "dmsetup create --rw failed for $*"
	DEV=$(dmq_dev v) || dmq_fail "no device node"
}

# expect_device WHAT: the device reads want.raw
expect_device() {
	dump "$DEV" got.raw
	same want.raw got.raw "$1"
	rm -f got.raw
}

# ------------------------------------------------------------------ cases

# Create fails at each of the constructor's and first resume's allocations
# in turn, until one runs without any failing: each try either fails
# cleanly (no device left, a later create works) or, where the target can
# do without the memory, succeeds and reads the chain right.
case_create_each_allocation() {
	local n=1 rc inj failed=0 tolerated=0
	mk_chain
	faults_setup
	nth_wrapper
	while :; do
		fi_arm
		DMQ_FAIL_NTH=$n dmq_create v --rw --dmsetup "$PWD/dmsetup-nth" \
			base.qcow2 top.qcow2 >create.log 2>&1
		rc=$?
		inj=$(fi_injected)
		[ "$rc" = 91 ] && dmq_fail "cannot write /proc/self/fail-nth"
		if [ "$rc" = 0 ]; then
			DEV=$(dmq_dev v) || dmq_fail "no device node"
			expect_device "created with allocation $n failing: the device differs from the chain"
			dmq_remove v || dmq_fail "dmsetup remove failed"
			[ "$inj" = 0 ] && break
			tolerated=$((tolerated + 1))
		else
			[ "$inj" = 0 ] && { cat create.log; dmq_fail "create failed with no allocation failing (try $n)"; }
			# dmsetup removes what it created when the load or the
			# resume fails; nothing may be left
			if dmq_dev_exists v; then
				cat create.log
				dmq_fail "a create whose allocation $n failed left the device"
			fi
			failed=$((failed + 1))
		fi
		n=$((n + 1))
		[ "$n" -le "$MAX_NTH" ] || dmq_fail "still failing after $MAX_NTH allocations"
	done
	echo "create: $((n - 1)) allocations; $failed failed creates were clean, $tolerated went on without the memory"
	[ "$failed" -gt 0 ] || dmq_fail "no create failed: the faults did not reach the constructor"
	# each failure named (device-mapper logs "Unknown error" for a
	# constructor that fails without setting ti->error)
	if dmq_dmesg_case | grep -F "qcow2: Unknown error"; then
		dmq_fail "a failed constructor did not say why"
	fi
	echo "every failed constructor said why: $(dmq_dmesg_case | grep -c 'qcow2: .*(-ENOMEM)') lines with -ENOMEM"
	sha256sum -c --quiet images.sha256 || dmq_fail "an image changed"
	dmq_check_images base.qcow2 top.qcow2
}

# nth_sweep WHAT CMD...: CMD (which runs ./dmsetup-nth) with each
# allocation in turn failing, until none does; after a failed try the
# device must still read the chain. Prints the counts.
nth_sweep() {
	local what=$1 n=1 rc inj failed=0 tolerated=0
	shift
	while :; do
		fi_arm
		DMQ_FAIL_NTH=$n "$@" >sweep.log 2>&1
		rc=$?
		inj=$(fi_injected)
		[ "$rc" = 91 ] && dmq_fail "cannot write /proc/self/fail-nth"
		if [ "$rc" = 0 ]; then
			[ "$inj" = 0 ] && break
			tolerated=$((tolerated + 1))
		else
			[ "$inj" = 0 ] && { cat sweep.log; dmq_fail "$what failed with no allocation failing (try $n)"; }
			failed=$((failed + 1))
		fi
		"$DMSETUP" resume "$(dmq_full_name v)" >/dev/null 2>&1
		expect_device "$what with allocation $n failing: the device differs from the chain"
		n=$((n + 1))
		[ "$n" -le "$MAX_NTH" ] || dmq_fail "$what: still failing after $MAX_NTH allocations"
	done
	echo "$what: $((n - 1)) allocations; $failed tries failed, $tolerated went on without the memory"
}

# nth_msg WORD...: a message through ./dmsetup-nth
nth_msg() {
	./dmsetup-nth message "$(dmq_full_name v)" 0 -- "$@"
}

# nth_resume: suspend (no failures), then resume through ./dmsetup-nth
# (preresume reads the images again)
nth_resume() {
	"$DMSETUP" suspend "$(dmq_full_name v)" || return 92
	./dmsetup-nth resume "$(dmq_full_name v)"
}

# nth_merge_start: merge_backward start through ./dmsetup-nth; a started
# merge is cancelled once ready
nth_merge_start() {
	local end=$((SECONDS + 120)) out
	nth_msg merge_backward start -1 0 || return
	while :; do
		out=$(msg v merge_backward progress) || return 93
		case $out in
		*stage=ready*) break ;;
		*stage=copying*) ;;
		*) echo "progress: $out"; return 94 ;;
		esac
		[ "$SECONDS" -lt "$end" ] || { echo "progress: $out"; return 95; }
		sleep 0.2
	done
	msg v merge_backward cancel || return 96
}

# Messages, status and a suspend/resume cycle, failing at each allocation
# of the ioctl's own context in turn.
case_control_each_allocation() {
	mk_chain
	faults_setup
	nth_wrapper
	map_rw rw:base.qcow2 top.qcow2
	nth_sweep "get_img_name" nth_msg get_img_name 1
	nth_sweep "get_errors" nth_msg get_errors
	nth_sweep "status" ./dmsetup-nth status "$(dmq_full_name v)"
	nth_sweep "set_fault_injection" nth_msg set_fault_injection 1 0
	nth_sweep "merge_backward start" nth_merge_start
	nth_sweep "resume" nth_resume
	msg_ok v merge_backward progress
	[[ $MSG_OUT == *merge=none* ]] || dmq_fail "a merge is left: '$MSG_OUT'"
	expect_device "after the sweeps: the device differs from the chain"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc base.qcow2 0
	check_rc top.qcow2 0 3
	convert top.qcow2 top.raw
	same want.raw top.raw "qemu-img convert of top.qcow2 differs from the chain"
}

# merge_backward complete (copying what was written since ready, the
# commits, the header, the unlink) failing at each allocation in turn, on
# a fresh copy of the chain each time: out of memory it fails and the
# merge stays ready, and a second complete (memory back) finishes it; or
# it goes on without the memory. Either way the one image left reads as
# the chain did and checks clean.
case_complete_each_allocation() {
	local n=1 nth=1 step=1 streak=0 rc inj failed=0 tolerated=0 last=0
	mk_chain
	faults_setup
	nth_wrapper
	while [ "$last" = 0 ]; do
		dmq_run cp base.qcow2 b.qcow2
		dmq_run cp top.qcow2 t.qcow2
		map_rw rw:b.qcow2 t.qcow2
		msg_ok v merge_backward start -1 0
		dmq_wait_ready v merge_backward
		# a write since ready: complete copies it again
		dmq_run dd if="$DEV" of="$DEV" bs=64k count=1 skip=1 seek=1 \
			iflag=direct oflag=direct conv=notrunc status=none
		fi_arm
		DMQ_FAIL_NTH=$nth nth_msg merge_backward complete >complete.log 2>&1
		rc=$?
		inj=$(fi_injected)
		[ "$rc" = 91 ] && dmq_fail "cannot write /proc/self/fail-nth"
		# a long run of allocations the target does without (the fast
		# path's table of the new top, vmalloc'ed page by page) is
		# sampled, at doubling strides: each try is a whole merge
		if [ "$rc" = 0 ]; then
			if [ "$inj" = 0 ]; then last=1; else tolerated=$((tolerated + 1)); fi
			streak=$((streak + 1))
			[ "$streak" -ge 8 ] && [ "$step" -lt 32 ] && step=$((step * 2))
		else
			[ "$inj" = 0 ] && { cat complete.log; dmq_fail "complete failed with no allocation failing (allocation $nth)"; }
			failed=$((failed + 1))
			streak=0 step=1
			msg_ok v merge_backward progress
			[[ $MSG_OUT == *stage=ready* ]] ||
				dmq_fail "complete with allocation $nth failing: the merge is not ready: '$MSG_OUT'"
			msg_ok v merge_backward complete
		fi
		[ "$(chain_len v)" = 1 ] || dmq_fail "complete (allocation $nth): the chain has $(chain_len v) images"
		expect_device "merged with allocation $nth of complete failing: the device differs from the chain"
		dmq_remove v || dmq_fail "dmsetup remove failed"
		check_rc b.qcow2 0 >/dev/null
		convert b.qcow2 b.raw
		same want.raw b.raw "merged with allocation $nth of complete failing: qemu-img reads another image"
		n=$((n + 1))
		nth=$((nth + step))
		[ "$nth" -le "$MAX_NTH" ] || dmq_fail "complete: still failing after $MAX_NTH allocations"
	done
	echo "merge_backward complete: $((n - 1)) tries up to allocation $((nth - 1)); $failed failed and left the merge ready, $tolerated went on without the memory"
	[ "$failed" -gt 0 ] || dmq_fail "no complete failed: the faults did not reach it"
}

# Guest I/O with 20% of the module's allocations failing: reads, copy-on-
# write, first writes and writes in place (4k..128k), discards, flushes.
case_io_random() {
	local rc errs
	need "$FIO"
	mk_chain
	faults_setup
	map_rw base.qcow2 top.qcow2
	fi_arm
	random_faults 20
	# 0..8M: written (and fsync'ed every 16 writes); 8M..12M discarded;
	# reads everywhere; 14M..16M untouched
	"$FIO" --output=fio.log --filename="$DEV" --direct=1 --ioengine=libaio \
		--continue_on_error=all --ignore_error=EIO:ENOMEM,EIO:ENOMEM \
		--randrepeat=1 --randseed=7 \
		--name=w --rw=randwrite --bsrange=4k-128k --iodepth=8 \
		--offset=0 --size=8M --io_size=6M --fsync=16 --write_iolog=w.iolog \
		--name=d --rw=randtrim --bs=64k --iodepth=2 --offset=8M --size=4M \
		--io_size=2M --write_iolog=d.iolog \
		--name=r --rw=randread --bsrange=4k-64k --iodepth=4 --size=16M \
		--io_size=4M
	rc=$?
	random_faults 0
	echo "fio with 20% of the allocations failing: rc=$rc, $(fi_injected) failed"
	grep -E ': \(groupid|issued rwts' fio.log | sed 's/^ */fio: /'
	[ "$(fi_injected)" -gt 0 ] || dmq_fail "no allocation failed: the faults did not reach the I/O path"
	msg_ok v get_errors
	errs=${MSG_OUT//$'\n'/ }
	echo "get_errors: $errs"
	# ENOMEM is transient: a failed metadata commit is written again by
	# the next one and latches nothing; only a failed refcount decrement
	# (leaks) asks for a check, and then the table may not resume
	dmq_run "$DMSETUP" suspend "$(dmq_full_name v)"
	if [[ $errs == *wants_check=1* ]]; then
		"$DMSETUP" resume "$(dmq_full_name v)" 2>resume.err &&
			dmq_fail "resume worked with wants_check=1"
		echo "wants_check=1: resume refused"
		# the rest of the case needs the device: a new table
		dmq_remove v || dmq_fail "dmsetup remove failed"
		map_rw base.qcow2 top.qcow2
	else
		dmq_run "$DMSETUP" resume "$(dmq_full_name v)"
		echo "suspend and resume work"
	fi
	# memory comes back: the device works again, everything reads
	random r.bin 192k
	put r.bin "$DEV" $((14 * MIB))
	dmq_run dd if="$DEV" of=/dev/null bs=1M iflag=direct status=none
	dump "$DEV" dev.raw
	cmp -n $((192 << 10)) -i $((14 * MIB)):0 dev.raw r.bin ||
		dmq_fail "a write after the faults does not read back"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc top.qcow2 0 3
	grep ' base.qcow2$' images.sha256 | sha256sum -c --quiet || dmq_fail "base.qcow2 changed"
	dmq_check_images base.qcow2
	convert top.qcow2 top.raw
	same dev.raw top.raw "qemu-img convert of top.qcow2 differs from the device"
	# outside what fio wrote or discarded (and the write at 14M) nothing moved
	patch_r_into_want
	check_unwritten want.raw dev.raw w.iolog d.iolog ||
		dmq_fail "data outside the written ranges changed"
}

# patch_r_into_want: want.raw with r.bin at 14M (the last write)
patch_r_into_want() {
	dmq_run dd if=r.bin of=want.raw bs=4k seek=$((14 * MIB / 4096)) conv=notrunc status=none
}

# A backward merge of the top (6 MiB of its own) with 3% of the module's
# allocations failing: batches that run out of memory are tried again, so
# it is ready in the end (or, after 16 failed batches in a row, failed:
# then started again once memory is back). The device reads the same
# throughout.
case_merge_random() {
	local out end stage tries=0
	mk_chain
	dmq_write top.qcow2 r:0:6M:77
	convert top.qcow2 want.raw
	faults_setup
	map_rw rw:base.qcow2 top.qcow2
	fi_arm
	random_faults 3
	# the start itself may fail for want of memory: try again
	until msg v merge_backward start -1 0 >/dev/null; do
		tries=$((tries + 1))
		[ "$tries" -lt 50 ] || { cat msg.err; dmq_fail "merge_backward start failed 50 times"; }
	done
	end=$((SECONDS + 180))
	while :; do
		if out=$(msg v merge_backward progress); then
			stage=${out##*stage=}
			stage=${stage%% *}
			[ "$stage" = copying ] || break
		fi
		[ "$SECONDS" -lt "$end" ] || dmq_fail "merge still copying after 180 s: '$out'"
		sleep 0.2
	done
	random_faults 0
	echo "merge with 3% of the allocations failing ($tries failed starts): '$out', $(fi_injected) failed"
	expect_device "during the merge: the device differs from the chain"
	case $stage in
	ready) ;;
	failed)
		msg_ok v merge_backward start -1 0
		dmq_wait_ready v merge_backward
		echo "started again once memory was back: ready"
		;;
	*) dmq_fail "merge stage '$stage': '$out'" ;;
	esac
	msg_ok v merge_backward complete
	[ "$(chain_len v)" = 1 ] || dmq_fail "the chain still has $(chain_len v) images after complete"
	expect_device "after the merge: the device differs from the chain"
	dmq_remove v || dmq_fail "dmsetup remove failed"
	check_rc base.qcow2 0 3
	convert base.qcow2 base.raw
	same want.raw base.raw "qemu-img convert of base.qcow2 differs from the chain"
}

# Failed allocations make the target log I/O and metadata errors (a
# resume that cannot update the header, a commit that cannot write).
DMQ_FAULT_CASES="create_each_allocation control_each_allocation complete_each_allocation io_random merge_random"

DMQ_CASES=(
	create_each_allocation
	control_each_allocation
	complete_each_allocation
	io_random
	merge_random
)

dmq_main "$@"
