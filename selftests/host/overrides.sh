# SPDX-License-Identifier: GPL-2.0
# shellcheck shell=bash
# Sourced by lib.sh through DMQ_LIB_OVERRIDES when host/run.sh runs the
# selftests against fake_dmsetup.py: "devices" are regular files.
dmq_dev() {
	local f
	f="$FAKE_STATE/devs/$(dmq_full_name "$1")"
	[ -f "$f" ] || return 1
	echo "$f"
}

# "devices" are files: no target sees their bios
dmq_counts_bios() {
	return 1
}
