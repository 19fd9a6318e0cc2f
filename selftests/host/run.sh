#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Run the selftests on a host without device-mapper, against a fake
# dmsetup that models the dm-qcow2 constructor checks and "maps" tables as
# raw files. This checks the test scripts (image generation, expected
# data, KTAP plumbing), not the target. Needs root (tmpfs mount), qemu-img,
# qemu-io, python3.
#
# usage: host/run.sh [qcow2_read.sh|qcow2_ctr_errors.sh|qcow2_write.sh [CASE...]]
# FAKE_CORRUPT=OFFSET flips a device byte; FAKE_WARN=1 logs a WARNING:
# both must make the cases fail.
set -u
here=$(cd "$(dirname "$0")" && pwd)
FAKE_STATE=$(mktemp -d /tmp/dmq-fake.XXXXXX)
export FAKE_STATE
trap 'rm -rf "$FAKE_STATE"' EXIT
mkdir -p "$FAKE_STATE/bin" "$FAKE_STATE/devs"
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
chmod +x "$FAKE_STATE/bin/"*
export PATH="$FAKE_STATE/bin:$PATH"
export DMQ_KMSG="$FAKE_STATE/kmsg"
export DMQ_LIB_OVERRIDES="$here/overrides.sh"
rc=0
if [ $# -gt 0 ]; then
	"$here/../$1" "${@:2}" || rc=$?
else
	for t in qcow2_ctr_errors.sh qcow2_read.sh qcow2_write.sh; do
		"$here/../$t" || rc=$?
	done
fi
exit "$rc"
