#!/usr/bin/env bash
# Runs inside the VM: loads dm-qcow2 and runs kselftest passes, writing into
# the results directory $1, for each pass FS,SECTOR:TEST[+CASE...] (e.g.
# ext4,512:qcow2_read.sh, or xfs,512:qcow2_write.sh+ext4+numjobs for some
# cases only), TEST-FS-SECTOR.log (KTAP) and .rc; at the end
# kmemleak.log (the module's leaks), rmmod.rc and dmesg.log (the whole
# run's kernel log, read after rmmod). A case that hangs past its timeout
# gets a sysrq-w dump (blocked tasks) in the log, then is killed.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1; shift
. "$root/tools/lib.sh"
export KDIR=${KDIR:-$(dmq_kdir)}
# another build of the module (DKMS, in-tree) when DMQ_MODULE names one
export DMQ_MODULE=${DMQ_MODULE:-$root/dm-qcow2.ko}
export KTAP_HELPERS=$KDIR/tools/testing/selftests/kselftest/ktap_helpers.sh
# the repository is read-only here: compiled helpers go to the guest's tmpfs
export PYTHONPYCACHEPREFIX=/tmp/dmq-pycache
unset PYTHONDONTWRITEBYTECODE
# the crash test's log, for the host-side check (tools/check.sh)
export DMQ_CRASH_EXPORT=$out/crash
limit=${DMQ_TEST_TIMEOUT:-2400}

mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null
echo 1 >/proc/sys/kernel/sysrq 2>/dev/null
if ! grep -qw '^dm_qcow2' /proc/modules; then
	insmod "$DMQ_MODULE" || echo "insmod $DMQ_MODULE failed" >&2
fi
cd "$root/selftests" || exit 1

# hang_report: what a stuck run waits on (the kernel log with the blocked
# tasks, every task's state and wait channel, the kernel stacks of the
# blocked ones and of dmsetup, udev and dd, the device-mapper devices and
# udev cookies, whether udevd answers)
hang_report() {
	local p
	dmesg
	ps -eo pid,ppid,stat,wchan:32,etime,args
	for p in $(ps -eo pid=,stat= | awk '$2 ~ /D/ {print $1}') \
		$(pgrep -f 'dmsetup|udev|^dd |blkid|fio'); do
		echo "== $p $(tr '\0' ' ' <"/proc/$p/cmdline")"
		cat "/proc/$p/stack"
	done
	dmsetup ls
	dmsetup status
	dmsetup udevcookies
	timeout 10 udevadm control --ping && echo "udevd answers"
}

# run_one LOG CMD...: CMD with a deadline; on expiry dump the blocked tasks
# and the log, then TERM, then KILL.
run_one() {
	local log=$1; shift
	"$@" >"$log" 2>&1 &
	local pid=$! t=0
	while kill -0 "$pid" 2>/dev/null; do
		if [ "$t" -ge "$limit" ]; then
			echo "# TIMEOUT after ${limit}s: sysrq-w (blocked tasks) follows in the kernel log" >>"$log"
			echo w >/proc/sysrq-trigger 2>/dev/null
			# now, not at the run's end: a hang can stop every later test
			sleep 2
			hang_report >"${log%.log}.hang.log" 2>&1
			pkill -TERM -P "$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null
			sleep 30
			pkill -KILL -P "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null
			return 124
		fi
		sleep 1
		t=$((t + 1))
	done
	wait "$pid"
}

for spec in "$@"; do
	fs=${spec%%,*}; rest=${spec#*,}; sector=${rest%%:*}; t=${rest#*:}
	cases=()
	if [[ $t == *+* ]]; then
		IFS=+ read -r -a cases <<<"${t#*+}"
		t=${t%%+*}
	fi
	name=$t-$fs-$sector
	echo "== $t on $fs (sector $sector)${cases[*]:+: ${cases[*]}}"
	t0=$SECONDS
	DMQ_SCRATCH_FS=$fs DMQ_SCRATCH_SECTOR=$sector run_one "$out/$name.log" "./$t" "${cases[@]}"
	echo $? >"$out/$name.rc"
	echo "== $t on $fs (sector $sector): $((SECONDS - t0)) s"
done

# Leaks: scan twice (objects younger than 5 s are not reported) while the
# module's symbols still resolve.
if [ -w /sys/kernel/debug/kmemleak ]; then
	sleep 6
	echo scan >/sys/kernel/debug/kmemleak
	sleep 1
	echo scan >/sys/kernel/debug/kmemleak
	cat /sys/kernel/debug/kmemleak >"$out/kmemleak.log" 2>&1
fi
rmmod dm_qcow2 >"$out/rmmod.log" 2>&1
echo $? >"$out/rmmod.rc"
dmesg >"$out/dmesg.log"
sync
exit 0
