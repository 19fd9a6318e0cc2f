#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Run the selftests on a host without device-mapper, against a fake
# dmsetup that models the dm-qcow2 constructor checks and "maps" tables as
# raw files. This checks the test scripts (image generation, expected
# data, KTAP plumbing), not the target. Needs root (tmpfs mount), qemu-img,
# qemu-io, python3.
#
# usage: host/run.sh [SCRIPT [CASE...]]   (SCRIPT: qcow2_*.sh)
# FAKE_CORRUPT=OFFSET flips a device byte; FAKE_WARN=1 logs a WARNING:
# both must make the cases fail. Without arguments every script runs;
# qcow2_ctl.sh without the cases the fake cannot model (fault injection,
# ENOSPC).
set -u
here=$(cd "$(dirname "$0")" && pwd)
FAKE_STATE=$(mktemp -d /tmp/dmq-fake.XXXXXX)
# The fake maps tables as raw files: no loop device or file system needed.
export DMQ_SCRATCH_FS=${DMQ_SCRATCH_FS:-tmpfs}
export FAKE_STATE
trap 'rm -rf "$FAKE_STATE"' EXIT
mkdir -p "$FAKE_STATE/bin" "$FAKE_STATE/devs"
# qcow2_ctl.sh runs dmsetup as nobody: it must find the fake to be refused
chmod 711 "$FAKE_STATE"
chmod 755 "$FAKE_STATE/bin"
: >"$FAKE_STATE/kmsg"
ln -s "$here/fake_dmsetup.py" "$FAKE_STATE/bin/dmsetup"
cat >"$FAKE_STATE/bin/dmesg" <<'EOS'
#!/bin/sh
if [ "${1:-}" = "-C" ]; then : >"$FAKE_STATE/kmsg"; else cat "$FAKE_STATE/kmsg"; fi
EOS
cat >"$FAKE_STATE/bin/blockdev" <<'EOS'
#!/bin/sh
case "$1" in
--getsize64) stat -c %s "$2" ;;
--getro) if [ -e "$FAKE_STATE/rw/$(basename "$2")" ]; then echo 0; else echo 1; fi ;;
--flushbufs) exit 0 ;;
*) exit 1 ;;
esac
EOS
# discard and write-zeroes of a regular-file "device": zeroes
cat >"$FAKE_STATE/bin/blkdiscard" <<'EOS'
#!/usr/bin/env python3
import getopt, os, sys
opts, args = getopt.getopt(sys.argv[1:], "zfqvo:l:s:p:")
o = dict(opts)
fd = os.open(args[0], os.O_WRONLY)
size = os.fstat(fd).st_size
off = int(o.get("-o", "0"), 0)
end = min(size, off + int(o.get("-l", str(size - off)), 0))
while off < end:
    off += os.pwrite(fd, bytes(min(1 << 20, end - off)), off)
os.close(fd)
EOS
chmod +x "$FAKE_STATE/bin/"*
export PATH="$FAKE_STATE/bin:$PATH"
export DMQ_KMSG="$FAKE_STATE/kmsg"
export DMQ_LIB_OVERRIDES="$here/overrides.sh"
rc=0
if [ $# -gt 0 ]; then
	"$here/../$1" "${@:2}" || rc=$?
else
	for t in qcow2_ctr_errors.sh qcow2_read.sh qcow2_write.sh \
		qcow2_merge.sh; do
		"$here/../$t" || rc=$?
	done
	"$here/../qcow2_ctl.sh" messages nonroot suspended_busy status_info \
		suspend_loop snapshot_reload || rc=$?
	# The framework's per-case checks, each fed a planted defect: the
	# script must fail, with exactly these results.
	out=$("$here/runner_cases.sh" 2>&1)
	prc=$?
	printf '%s\n' "$out"
	want=$(printf '%s\n' "ok 1 ok_clean" "not ok 2 bad_left_device" \
		"not ok 3 bad_consistency" "ok 4 ok_consistency_declared" \
		"not ok 5 bad_report" "ok 6 skip_skipped # SKIP")
	got=$(grep -E '^(not )?ok [0-9]+ ' <<<"$out")
	if [ "$got" != "$want" ] || [ "$prc" = 0 ]; then
		echo "not ok: runner_cases.sh (rc=$prc): expected"
		printf '%s\n' "$want"
		rc=1
	else
		echo "ok: runner_cases.sh: each planted defect failed its case"
	fi
fi
exit "$rc"
