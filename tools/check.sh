#!/usr/bin/env bash
# The test suite: host tests (cargo) and the kselftests inside the VM.
#   tools/check.sh all|host|kselftest|runner-test|packaging [test-name...]
# Ends with one line 'N passed, N failed' (', N skipped' when any skipped);
# exits non-zero if anything failed or nothing ran.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
cd "$DMQ_ROOT"

what=${1:-all}
shift || true
pass=0 fail=0 skip=0

host_tests() {
	echo "== host tests (cargo test)"
	local log; log=$(mktemp)
	cargo test --workspace 2>&1 | tee "$log"
	local rc=${PIPESTATUS[0]}
	local p f
	p=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | paste -sd+ | bc)
	f=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | paste -sd+ | bc)
	pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0}))
	if [ "$rc" != 0 ] && [ "${f:-0}" = 0 ]; then
		echo "cargo test failed (rc=$rc) without a failed test: counting one failure"
		fail=$((fail + 1))
	fi
	rm -f "$log"
}

# The kernel's Rust style: the module's sources as rustfmt formats them
# with the kernel's .rustfmt.toml (a copy at the top; `make rustfmt`).
style_tests() {
	echo "== style: rustfmt --check (the kernel's .rustfmt.toml)"
	if rustfmt --check --edition 2021 --config-path .rustfmt.toml drivers/dm_qcow2.rs; then
		echo "ok: the module's sources are rustfmt-clean"; pass=$((pass + 1))
	else
		echo "not ok: rustfmt --check (make rustfmt fixes it)"; fail=$((fail + 1))
	fi
}

# The packaging checks (scripts/): the preflight's verdicts on our kernel,
# kernels without Rust, missing Rust files, another rustc (seconds).
packaging_tests() {
	echo "== packaging: preflight cases (scripts/test-preflight.sh)"
	if [ ! -f "$(dmq_kdir)/include/config/auto.conf" ]; then
		echo "skip: no built test kernel at $(dmq_kdir) (make kernel)"; skip=$((skip + 1))
		return
	fi
	local log; log=$(mktemp)
	scripts/test-preflight.sh "$(dmq_kdir)" 2>&1 | tee "$log"
	local rc=${PIPESTATUS[0]} p f
	p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
	pass=$((pass + p)); fail=$((fail + f))
	if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
		echo "not ok: scripts/test-preflight.sh exited $rc"; fail=$((fail + 1))
	fi
	rm -f "$log"
}

# The packaging builds (scripts/test-headers-build.sh, test-dkms.sh,
# test-patches.sh, test-deb.sh): the module against a headers-only copy of
# the test kernel, through DKMS, and in-tree from the patch series applied
# to pristine sources (checkpatch-clean), and the two .deb packages (about a minute of CPU, 3-6 minutes on a loaded
# machine): in the background during the kselftests.
pkg_pid=
pkg_log=
pkg_mods=
packaging_start() {
	pkg_log=$(mktemp)
	pkg_mods=$(mktemp -d /tmp/dmq-pkgmods.XXXXXX)
	echo "== packaging: headers-only, DKMS, in-tree builds and .debs (scripts/test-*.sh), in the background"
	{
		scripts/test-headers-build.sh "$(dmq_kdir)"
		DMQ_DKMS_KEEP=$pkg_mods/dkms scripts/test-dkms.sh "$(dmq_kdir)"
		DMQ_INTREE_KEEP=$pkg_mods/in-tree scripts/test-patches.sh "$(dmq_kdir)"
		scripts/test-deb.sh
	} >"$pkg_log" 2>&1 &
	pkg_pid=$!
}
packaging_wait() {
	[ -n "$pkg_pid" ] || return 0
	wait "$pkg_pid"
	local rc=$? p f
	echo "== packaging: headers-only, DKMS, in-tree builds and .debs"
	cat "$pkg_log"
	p=$(grep -c '^ok ' "$pkg_log"); f=$(grep -c '^not ok ' "$pkg_log")
	pass=$((pass + p)); fail=$((fail + f))
	if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
		echo "not ok: the packaging builds exited $rc"; fail=$((fail + 1))
	fi
	rm -f "$pkg_log"
}

# The modules the packaging builds made (DKMS against the headers-only
# tree, in-tree from the patch series), each loaded in turn in one VM and
# run through two of qcow2_read.sh's cases, plain and compressed clusters
# (zlib: the in-tree build links the kernel's own), ~1.5 min a module (all
# 24 would take ~16; each passed them all by hand).
PACKAGED_READ_CASES=cluster_64k+compressed_64k
packaged_modules() {
	[ -n "$pkg_mods" ] || return 0
	local m cmd="" have=() rc
	for m in dkms in-tree; do
		if [ -f "$pkg_mods/$m/dm-qcow2.ko" ]; then
			have+=("$m")
			mkdir -p "$pkg_mods/out-$m"
			cmd+="DMQ_MODULE=$pkg_mods/$m/dm-qcow2.ko KDIR=$(dmq_kdir) $DMQ_ROOT/tools/guest-tests.sh "
			cmd+="$pkg_mods/out-$m ext4,512:qcow2_read.sh+$PACKAGED_READ_CASES; "
		else
			echo "not ok: the packaging builds left no $m module"; fail=$((fail + 1))
		fi
	done
	if [ ${#have[@]} -gt 0 ]; then
		echo "== the ${have[*]} module(s) of the packaging builds in the VM: qcow2_read.sh (cases ${PACKAGED_READ_CASES//+/ })"
		DMQ_VM_RWDIR=$pkg_mods timeout -k 60 1800 tools/vm.sh "$cmd" >"$pkg_mods/vm.log" 2>&1
		rc=$?
		cat "$pkg_mods/vm.log"
		for m in "${have[@]}"; do
			echo "== qcow2_read.sh on ext4, 512-byte sectors, with the $m module"
			count_log "$pkg_mods/out-$m" qcow2_read.sh-ext4-512 qcow2_read.sh "$rc"
			run_checks "$pkg_mods/out-$m"
		done
	fi
	rm -rf "$pkg_mods"
}

# The dm-qcow2 command in release form, for qcow2_tool.sh in the VM (and
# the .debs, which reuse target/): `all` starts it with the host tests, so
# its minutes of compiling overlap them instead of delaying the VMs.
tool_pid=
tool_log=
tool_build_start() {
	tool_log=$(mktemp)
	cargo build --release -p dm-qcow2 >"$tool_log" 2>&1 &
	tool_pid=$!
}
tool_build_wait() {
	[ -n "$tool_pid" ] || return 0
	local rc=0
	wait "$tool_pid" || rc=$?
	echo "== cargo build --release -p dm-qcow2 (for qcow2_tool.sh)"
	cat "$tool_log"
	if [ "$rc" != 0 ]; then
		echo "not ok: cargo build --release -p dm-qcow2"; fail=$((fail + 1))
	fi
	rm -f "$tool_log"; tool_pid=
}

# The test scripts themselves, against a fake dmsetup (no kernel): started
# in the background (it mostly waits on qemu-img), collected by fake_wait.
fake_pid=
fake_log=
fake_start() {
	fake_log=$(mktemp)
	echo "== selftests against a fake dmsetup (selftests/host/run.sh), in the background"
	selftests/host/run.sh >"$fake_log" 2>&1 &
	fake_pid=$!
}
fake_wait() {
	[ -n "$fake_pid" ] || return 0
	if wait "$fake_pid"; then
		echo "ok: selftests/host/run.sh against the fake dmsetup ($(grep -c '^ok ' "$fake_log") cases)"
		pass=$((pass + 1))
	else
		cat "$fake_log"
		echo "not ok: selftests/host/run.sh against the fake dmsetup"
		fail=$((fail + 1))
	fi
	rm -f "$fake_log"
}

# The passes: every script on ext4 over a 512-byte-sector loop device; the
# write cases that depend most on the host file system again on xfs (its
# direct I/O, fallocate and punch-hole paths differ from ext4's; not
# first_write_nofill: its measure, the file's allocated blocks, holds on
# ext4, but on xfs the image grew by a whole cluster per first 4 KiB write,
# not explained yet): fsync, FUA, punch-hole and concurrent direct I/O
# (`make check-full` adds the 64k, extended-L2 and ext4-in-the-device
# cases); DMQ_XFS=0 leaves that out. DMQ_4K=1 adds the read and
# write scripts over a 4 KiB-sector device (alignment, the device's logical
# block size: green, but ~27 more minutes of VM time, which would put a
# fresh machine's `make deps check` over CI's 90 minutes).
# DMQ_PASSES overrides: "FS,SECTOR:SCRIPT[+CASE...] ..."; with test names
# given, those on ext4/512 only.
XFS_WRITE_CASES=flush_fsync+fua_osync+discard_v3+numjobs
[ "${DMQ_FULL:-0}" = 1 ] && XFS_WRITE_CASES+=+cluster_64k+extl2_64k+ext4
default_passes() {
	local t
	for t in "$@"; do echo "ext4,512:$t"; done
	for t in "$@"; do
		case "$t" in
		qcow2_read.sh) [ "${DMQ_4K:-0}" = 1 ] && echo "ext4,4096:$t" ;;
		qcow2_write.sh)
			[ "${DMQ_4K:-0}" = 1 ] && echo "ext4,4096:$t"
			[ "${DMQ_XFS:-1}" = 0 ] || echo "xfs,512:$t+$XFS_WRITE_CASES"
			;;
		esac
	done
}

kselftests() {
	local tests=("$@") passes
	local all=0
	if [ ${#tests[@]} -eq 0 ]; then
		# make itself reads the list (comments and TEST_PROGS_EXTENDED
		# must not leak into it)
		read -r -a tests < <(printf 'dmq-print-progs:\n\t@echo $(TEST_PROGS)\n' |
			make -s --no-print-directory -C selftests -f Makefile -f - dmq-print-progs)
		all=1
	fi
	if [ -n "${DMQ_PASSES:-}" ]; then
		read -r -a passes <<<"$DMQ_PASSES"
	elif [ "$all" = 1 ]; then
		mapfile -t passes < <(default_passes "${tests[@]}")
	else
		mapfile -t passes < <(printf 'ext4,512:%s\n' "${tests[@]}")
	fi
	# The passes go to DMQ_VMS VMs run side by side (one vCPU each when
	# more than one, unless DMQ_VM_CPUS says otherwise): a TCG vCPU is one
	# host thread and the scripts are mostly sequential, so two
	# single-vCPU VMs use both cores (two 2-vCPU VMs took 1.5x-2.5x as
	# long a script on the 2 cores). `make check-smp` runs the scripts
	# with fio in 4-vCPU VMs, the lanes and the worker on several CPUs at
	# once. Each pass goes to the VM with the least work so far
	# (pass_weight: minutes).
	local nvm=${DMQ_VMS:-1} k
	[ "$nvm" -ge 1 ] 2>/dev/null || nvm=1
	[ "$nvm" -gt "${#passes[@]}" ] && nvm=${#passes[@]}
	local -a outs=() groups=() load=() pids=()
	for ((k = 0; k < nvm; k++)); do
		outs[k]=$(mktemp -d /tmp/dmq-ksft.XXXXXX); groups[k]=""; load[k]=0
	done
	local spec best
	# longest first, each to the least loaded VM: the VMs end together
	mapfile -t passes < <(for spec in "${passes[@]}"; do
		echo "$(pass_weight "$spec") $spec"; done | sort -s -k1,1nr | cut -d' ' -f2-)
	for spec in "${passes[@]}"; do
		best=0
		for ((k = 1; k < nvm; k++)); do
			[ "${load[k]}" -lt "${load[best]}" ] && best=$k
		done
		groups[best]+="$spec "
		load[best]=$((load[best] + $(pass_weight "$spec")))
	done
	# qcow2_tool.sh runs the dm-qcow2 command built here (the guest sees
	# this tree): build it first
	if printf '%s\n' "${passes[@]}" | grep -q 'qcow2_tool\.sh'; then
		[ -n "$tool_pid" ] || tool_build_start
		tool_build_wait
	fi
	echo "== kselftests in $nvm VM(s) (kernel: $(basename "$(dmq_kdir)")): ${passes[*]}"
	# A hung VM still gets a verdict: each pass has its own deadline in the
	# guest, and the VM as a whole one more.
	local per=${DMQ_TEST_TIMEOUT:-2400}
	# the crash test's knobs (make crashtest) and DMQ_FULL (make
	# check-full: the scripts' long cases too), passed on into the VM
	local v fwd=
	for v in DMQ_CRASH_STATES DMQ_CRASH_SEED DMQ_CRASH_EPOCHS DMQ_FULL; do
		[ -n "${!v:-}" ] && fwd+="$v=${!v} "
	done
	local cpus=${DMQ_VM_CPUS:-2}
	[ "$nvm" -gt 1 ] && cpus=${DMQ_VM_CPUS:-1}
	for ((k = 0; k < nvm; k++)); do
		local -a g; read -r -a g <<<"${groups[k]}"
		local total=$(( ${#g[@]} * per + 300 ))
		[ "$nvm" -gt 1 ] && echo "== VM $k: ${g[*]}"
		DMQ_VM_CPUS=$cpus DMQ_VM_RWDIR=${outs[k]} timeout -k 60 "$total" tools/vm.sh \
			"KDIR=$(dmq_kdir) DMQ_TEST_TIMEOUT=$per $fwd$DMQ_ROOT/tools/guest-tests.sh ${outs[k]} ${g[*]}" \
			>"${outs[k]}/vm.log" 2>&1 &
		pids[k]=$!
	done
	# Each VM as it ends: its crash log goes to the host-side checkers at
	# once, on the core it freed while the other VM runs on.
	local rc id
	local -a rcs=() running
	while :; do
		running=()
		for ((k = 0; k < nvm; k++)); do
			[ -n "${rcs[k]:-}" ] || running+=("${pids[k]}")
		done
		[ ${#running[@]} -gt 0 ] || break
		id=
		wait -n -p id "${running[@]}"
		rc=$?
		for ((k = 0; k < nvm; k++)); do
			[ "${pids[k]}" = "$id" ] || continue
			rcs[k]=$rc
			cat "${outs[k]}/vm.log"
			if [ "$rc" != 0 ]; then
				echo "not ok: VM $k exited with status $rc${rc/124/ (timed out)}"
				fail=$((fail + 1))
			fi
			crash_host_start "${outs[k]}"
		done
		# no child left to wait for (cannot happen): do not spin
		[ -n "$id" ] || break
	done
	for ((k = 0; k < nvm; k++)); do
		local -a g; read -r -a g <<<"${groups[k]}"
		local out=${outs[k]}
		for spec in "${g[@]}"; do
			local fs=${spec%%,*} rest=${spec#*,}
			local sector=${rest%%:*} t=${rest#*:} some=
			[[ $t == *+* ]] && some=" (cases ${t#*+})"
			t=${t%%+*}
			echo "== $t on $fs, $sector-byte sectors${some//+/ }"
			count_log "$out" "$t-$fs-$sector" "$t" "${rcs[k]:-1}"
		done
		run_checks "$out"
		rm -rf "$out"
	done
}

# In CI a skipped case is a failure: a missing tool must not pass quietly.
ci_skips() {
	if [ "${CI:-}" = true ] && [ "$skip" -gt 0 ]; then
		echo "CI=true: counting $skip skipped cases as failures"
		fail=$((fail + skip))
	fi
}

# count_log OUT BASE SCRIPT VMRC: the pass's KTAP log OUT/BASE.log (and
# its exit status in OUT/BASE.rc) into the totals; no log, no totals, or an
# exit status that disagrees with them is a failure.
count_log() {
	local out=$1 base=$2 t=$3 rc=$4 log=$1/$2.log
	if [ ! -f "$log" ]; then
		echo "$t: no output (VM rc=$rc)"; fail=$((fail + 1)); return
	fi
	cat "$log"
	# a pass that ran into its timeout: what it waited on (guest-tests.sh)
	[ -f "$out/$base.hang.log" ] && cat "$out/$base.hang.log"
	local tot
	tot=$(grep -E '^# Totals: pass:[0-9]+ fail:[0-9]+' "$log" | tail -1)
	if [ -z "$tot" ]; then
		echo "$t: no KTAP totals (rc=$(cat "$out/$base.rc" 2>/dev/null)): counting one failure"
		fail=$((fail + 1)); return
	fi
	local p f s x
	# " pass:" and " fail:" with the space: not "xpass:"/"xfail:".
	p=$(sed -E 's/.* pass:([0-9]+).*/\1/' <<<"$tot")
	f=$(sed -E 's/.* fail:([0-9]+).*/\1/' <<<"$tot")
	x=$(sed -nE 's/.* error:([0-9]+).*/\1/p' <<<"$tot")
	s=$(sed -nE 's/.* skip:([0-9]+).*/\1/p' <<<"$tot")
	pass=$((pass + p)); fail=$((fail + f + ${x:-0})); skip=$((skip + ${s:-0}))
	# The script's own exit status must agree with its totals.
	local trc; trc=$(cat "$out/$base.rc" 2>/dev/null)
	if [ "$trc" != 0 ] && [ "$trc" != 4 ] && [ "$f" = 0 ]; then
		echo "not ok: $t exited $trc with no failed case"; fail=$((fail + 1))
	fi
}

# The runner's own checks, each fed one planted defect (no VM): every one
# must count a failure, and a clean run none. `tools/check.sh host` runs it.
runner_test() {
	local d ok=0 bad=0 name want
	d=$(mktemp -d /tmp/dmq-runner-test.XXXXXX)
	# plant NAME: a clean pass's output in $d/NAME (totals, rc, log, rmmod)
	plant() {
		mkdir -p "$d/$1"
		printf 'TAP version 13\n1..2\nok 1 a\nok 2 b\n# Totals: pass:2 fail:0 xfail:0 xpass:0 skip:0 error:0\n' \
			>"$d/$1/t.sh-ext4-512.log"
		echo 0 >"$d/$1/t.sh-ext4-512.rc"
		printf '[    1.0] Linux version 6.12\n[    2.0] dm_qcow2: loaded\n' >"$d/$1/dmesg.log"
		echo 0 >"$d/$1/rmmod.rc"
	}
	plant clean
	plant dmesg_bug; echo '[    3.0] BUG: KASAN: slab-use-after-free in dm_qcow2' >>"$d/dmesg_bug/dmesg.log"
	plant dmesg_lockdep; echo '[    3.0] WARNING: possible circular locking dependency detected' >>"$d/dmesg_lockdep/dmesg.log"
	plant dmesg_hung; echo '[  300.0] INFO: task kworker/0:1:42 blocked for more than 60 seconds.' >>"$d/dmesg_hung/dmesg.log"
	plant no_dmesg; rm "$d/no_dmesg/dmesg.log"
	plant rmmod; echo 1 >"$d/rmmod/rmmod.rc"; echo "rmmod: ERROR: Module dm_qcow2 is in use" >"$d/rmmod/rmmod.log"
	plant kmemleak; printf 'unreferenced object 0xffff888 (size 64):\n  backtrace:\n    kmalloc\n    dm_qcow2_ctr+0x40/0x900 [dm_qcow2]\n' >"$d/kmemleak/kmemleak.log"
	plant no_totals; sed -i '/Totals/d' "$d/no_totals/t.sh-ext4-512.log"
	plant rc_disagrees; echo 1 >"$d/rc_disagrees/t.sh-ext4-512.rc"
	plant failed_case; sed -i 's/^ok 2 b/not ok 2 b/; s/pass:2 fail:0/pass:1 fail:1/' "$d/failed_case/t.sh-ext4-512.log"
	plant no_log; rm "$d/no_log/t.sh-ext4-512.log"
	for name in clean dmesg_bug dmesg_lockdep dmesg_hung no_dmesg rmmod kmemleak no_totals rc_disagrees failed_case no_log; do
		want=1; [ "$name" = clean ] && want=0
		local got
		got=$( (pass=0 fail=0 skip=0
			count_log "$d/$name" t.sh-ext4-512 t.sh 0 >/dev/null
			run_checks "$d/$name" >/dev/null
			echo "$fail") )
		if { [ "$want" = 0 ] && [ "$got" = 0 ]; } || { [ "$want" = 1 ] && [ "$got" -gt 0 ]; }; then
			ok=$((ok + 1))
		else
			echo "not ok: runner check '$name': $got failures counted"
			bad=$((bad + 1))
		fi
	done
	# CI=true turns a skipped case into a failure
	local got
	got=$( (CI=true skip=1 fail=0; ci_skips >/dev/null; echo "$fail") )
	if [ "$got" = 1 ]; then ok=$((ok + 1)); else echo "not ok: CI=true skip"; bad=$((bad + 1)); fi
	rm -rf "$d"
	if [ "$bad" = 0 ]; then
		echo "ok: the runner's checks each caught their planted defect ($ok)"; pass=$((pass + 1))
	else
		fail=$((fail + 1))
	fi
}

# pass_weight FS,SECTOR:SCRIPT: its minutes in the VM, roughly (measured in
# `make check`'s two single-vCPU VMs on 2 cores, without the long cases):
# to balance the VMs.
pass_weight() {
	case "${1#*:}" in
	*+*) echo 2 ;;
	qcow2_ctr_errors.sh) echo 5 ;;
	qcow2_read.sh) echo 8 ;;
	qcow2_write.sh) echo 19 ;;
	qcow2_merge.sh) echo 19 ;;
	qcow2_ctl.sh) echo 9 ;;
	qcow2_crash.sh) echo 14 ;;
	qcow2_compat.sh) echo 1 ;;
	qcow2_tool.sh) echo 4 ;;
	qcow2_faults.sh) echo 4 ;;
	*) echo 5 ;;
	esac
}

# The crash-replay test's log, exported by qcow2_crash.sh in the VM, checked
# again natively on the host with many more crash states: the same checker
# (journal replay, fsck, qemu-img check, the acknowledged data) with QEMU
# reading the chains instead of fresh tables (the VM's own pass read its
# states through the target). One checker per file system, side by side and
# in the background (crash_host_start; crash_host_wait collects them): they
# overlap the packaged modules' VM. 200 states each: ~4 min of one core
# (`make crashtest` runs thousands).
crash_dirs=()
crash_pids=()
crash_host_start() {
	local out=$1 x fs keep
	for x in "$out"/crash/*/; do
		[ -f "$x/state.json" ] || continue
		fs=$(basename "$x")
		keep=$(mktemp -d /tmp/dmq-crash-host.XXXXXX)
		mv "$x" "$keep/log"
		echo "== crash states checked on the host ($fs, ${DMQ_CRASH_HOST_STATES:-200} states, qemu-img reads), in the background"
		(
			python3 selftests/dmq_crash.py check "$keep/log/state.json" "$keep/log/log.img" \
				--work "$keep/work" --prefix "dmqhc$fs-" --fs "$fs" --reader qemu \
				--dev-size "$(cat "$keep/log/dev-size")" --seed "$(cat "$keep/log/seed")" \
				--states "${DMQ_CRASH_HOST_STATES:-200}"
		) >"$keep/check.log" 2>&1 &
		crash_pids+=($!)
		crash_dirs+=("$keep:$fs")
	done
}
crash_host_wait() {
	local k keep fs rc
	for k in "${!crash_pids[@]}"; do
		wait "${crash_pids[k]}"
		rc=$?
		keep=${crash_dirs[k]%:*}; fs=${crash_dirs[k]##*:}
		echo "== crash states checked on the host ($fs)"
		cat "$keep/check.log"
		if [ "$rc" = 0 ]; then
			echo "ok: crash states on the host ($fs)"; pass=$((pass + 1))
		else
			echo "not ok: crash states on the host ($fs)"; fail=$((fail + 1))
		fi
		rm -rf "$keep"
	done
	crash_pids=(); crash_dirs=()
}

# Whole-run checks: the kernel log from boot to after rmmod, the module's
# unload, and kmemleak's report.
run_checks() {
	local out=$1 bad
	eval "$(grep -E '^DMQ_DMESG_BAD=' selftests/lib.sh)"
	if [ ! -s "$out/dmesg.log" ]; then
		echo "not ok: no kernel log from the VM"; fail=$((fail + 1))
	else
		bad=$(grep -E -- "$DMQ_DMESG_BAD" "$out/dmesg.log")
		if [ -n "$bad" ]; then
			echo "not ok: the run's kernel log has reports:"
			grep -E -B5 -A40 -- "$DMQ_DMESG_BAD" "$out/dmesg.log" | head -200 | sed 's/^/  /'
			fail=$((fail + 1))
		else
			echo "ok: the run's kernel log has no reports ($(wc -l <"$out/dmesg.log") lines)"
			pass=$((pass + 1))
		fi
	fi
	if [ "$(cat "$out/rmmod.rc" 2>/dev/null)" != 0 ]; then
		echo "not ok: rmmod dm_qcow2 failed (a leaked module reference?): $(cat "$out/rmmod.log" 2>/dev/null)"
		fail=$((fail + 1))
	else
		echo "ok: rmmod dm_qcow2"
		pass=$((pass + 1))
	fi
	if [ -f "$out/kmemleak.log" ]; then
		local leaks
		leaks=$(awk '/^unreferenced object/ { if (b ~ /dm_qcow2/) print b; b = "" } { b = b $0 "\n" }
			END { if (b ~ /dm_qcow2/) print b }' "$out/kmemleak.log")
		if [ -n "$leaks" ]; then
			echo "not ok: kmemleak reports leaks from dm_qcow2:"
			printf '%b' "$leaks" | head -100 | sed 's/^/  /'
			fail=$((fail + 1))
		else
			echo "ok: kmemleak: no leaks from dm_qcow2 ($(grep -c '^unreferenced object' "$out/kmemleak.log") elsewhere)"
			pass=$((pass + 1))
		fi
	fi
}

case "$what" in
host) host_tests; style_tests; runner_test; packaging_tests; fake_start; fake_wait ;;
runner-test) runner_test ;;
kselftest) kselftests "$@"; crash_host_wait ;;
packaging) packaging_tests; packaging_start; packaging_wait; packaged_modules ;;
all) tool_build_start; host_tests; style_tests; runner_test; packaging_tests; fake_start; packaging_start; kselftests "$@"; fake_wait; packaging_wait; packaged_modules; crash_host_wait ;;
*) die "usage: $0 all|host|kselftest|runner-test|packaging [test...]" ;;
esac

ci_skips
line="$pass passed, $fail failed"
[ "$skip" -gt 0 ] && line+=", $skip skipped"
echo "$line"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
