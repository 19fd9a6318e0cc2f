#!/usr/bin/env bash
# Runs inside the VM: loads dm-qcow2 and runs the given kselftests, writing
# each one's KTAP log and exit code into the results directory $1.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1; shift
. "$root/tools/lib.sh"
export KDIR=${KDIR:-$(dmq_kdir)}
export DMQ_MODULE=$root/dm-qcow2.ko
export KTAP_HELPERS=$KDIR/tools/testing/selftests/kselftest/ktap_helpers.sh
if ! grep -qw '^dm_qcow2' /proc/modules; then
	insmod "$DMQ_MODULE" || echo "insmod $DMQ_MODULE failed" >&2
fi
cd "$root/selftests" || exit 1
for t in "$@"; do
	timeout "${DMQ_TEST_TIMEOUT:-1500}" "./$t" >"$out/$t.log" 2>&1
	echo $? >"$out/$t.rc"
done
dmesg >"$out/dmesg.log"
rmmod dm_qcow2 2>>"$out/dmesg.log"
sync
