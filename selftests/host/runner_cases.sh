#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Planted defects for the per-case checks of lib.sh, run by host/run.sh
# against the fake dmsetup: every case named bad_* must be reported
# "not ok" by the framework although its body succeeds, every ok_* "ok".
# (The whole-run checks of tools/check.sh have their own planted runs:
# `tools/check.sh runner-test`.)

set -u -o pipefail
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"

case_ok_clean() {
	dmq_img_create a.qcow2 1M
	dmq_create v a.qcow2 || dmq_fail "create"
	dmq_remove v || dmq_fail "remove"
}

# a device the case does not remove
case_bad_left_device() {
	dmq_img_create a.qcow2 1M
	dmq_create v a.qcow2 || dmq_fail "create"
}

# the target's own consistency error in the kernel log
case_bad_consistency() {
	echo "dm_qcow2: dm-qcow2: image 0: freeing a free cluster 5" >>"$DMQ_KMSG"
}

# the same in a case that declares fault injection
case_ok_consistency_declared() {
	echo "dm_qcow2: dm-qcow2: image 0: freeing a free cluster 5" >>"$DMQ_KMSG"
}

# a detector's report (KASAN, lockdep, hung task, ...)
case_bad_report() {
	echo "BUG: KASAN: slab-use-after-free in dm_qcow2_map" >>"$DMQ_KMSG"
}

# a skip is neither ok nor a failure
case_skip_skipped() {
	dmq_skip "planted skip"
}

DMQ_FAULT_CASES="ok_consistency_declared"
DMQ_CASES=(
	ok_clean
	bad_left_device
	bad_consistency
	ok_consistency_declared
	bad_report
	skip_skipped
)

dmq_main "$@"
