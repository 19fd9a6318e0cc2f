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

# the fake's merge complete rewrites the device file from the images: a
# write still in flight then is lost (the target has no such window)
dmq_complete_under_io() {
	return 1
}

# the fake writes the device file back into the top: no trim
dmq_trims_on_suspend() {
	return 1
}

# cases that need the kernel (I/O errors from a device, EIO from the
# target's metadata checks, module parameters) cannot run on the fake
dmq_needs_kernel() {
	dmq_skip "needs the kernel: $*"
}

# no module parameter here: the md_cache_pages variants test the kernel's
# cache only (the plain cases run their bodies on the fake already)
dmq_with_md_cache() {
	dmq_needs_kernel "the md_cache_pages module parameter"
}
