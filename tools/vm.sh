#!/usr/bin/env bash
# Run a command inside a virtme-ng VM booted from the cached test kernel.
# The host's root file system is visible read-only (with writable overlays on
# /tmp, /var, ...). Exit status is the command's.
#   tools/vm.sh 'cmd args'        DMQ_KVM=1 to try KVM (TCG by default:
#                                 QEMU cannot start KVM guests on our runners)
#                                 DMQ_VM_VERBOSE=1 for the guest's console
set -euo pipefail
. "$(dirname "$0")/lib.sh"

KDIR=$(dmq_kdir)
[ -f "$KDIR/arch/x86/boot/bzImage" ] || die "no kernel at $KDIR: run 'make kernel'"
opts=(--disable-kvm)
[ "${DMQ_KVM:-0}" = 1 ] && opts=()
# The console can lose output at exit: callers that need results write them
# to a host directory made writable with DMQ_VM_RWDIR.
[ -n "${DMQ_VM_RWDIR:-}" ] && opts+=(--rwdir "$DMQ_VM_RWDIR")
# The guest sees the host's root, but with tmpfs over /var/tmp, /var/cache
# and others: mount the repository itself so it is there wherever it lives.
opts+=(--rodir "$DMQ_ROOT")
# QEMU opens our stdout and stderr as file chardevs with O_TRUNC, which would wipe a
# log file we are redirected to: hand it a pipe instead.
# A log large enough for a whole suite on the debug kernel (the runner scans
# all of it at the end; nothing is cleared between cases).
opts+=(--append "log_buf_len=16M")
# The guest's console (kernel and init messages) on our output too.
[ "${DMQ_VM_VERBOSE:-0}" = 1 ] && opts+=(--verbose)
# Extra kernel parameters for an experiment (DMQ_VM_APPEND="a=b c").
[ -n "${DMQ_VM_APPEND:-}" ] && opts+=(--append "$DMQ_VM_APPEND")
# The host's root reaches the guest over 9p, by default without a page
# cache: every exec and library load goes back to the host (a bare /bin/true
# cost 55 ms, python3 0.8 s). The guest only reads it and the host does not
# change it while the VM runs, so let the guest cache it (vng's own flags
# repeated: the last rootflags= wins). /bin/true 20 ms, python3 0.3 s.
[ "${DMQ_VM_ROOT_CACHE:-1}" = 1 ] &&
	opts+=(--append "rootflags=version=9p2000.L,trans=virtio,access=any,msize=524288,cache=loose")
run() {
	vng "${opts[@]}" -r "$KDIR/arch/x86/boot/bzImage" \
		--memory "${DMQ_VM_MEM:-4G}" --cpus "${DMQ_VM_CPUS:-2}" \
		--exec "$1" </dev/null 2>&1 | cat
	return "${PIPESTATUS[0]}"
}
[ -n "${DMQ_VM_RWDIR:-}" ] || { run "$*"; exit $?; }

# kill_tree PID: PID and everything it started (vng, virtme-run, QEMU).
kill_tree() {
	local c
	for c in $(pgrep -P "$1"); do kill_tree "$c"; done
	kill -TERM "$1" 2>/dev/null || true
}

# Now and then a guest never gets to the command (seen at a rate of ~1 in
# 10 boots on a busy host: QEMU spins at ~30% of a core, the command's
# first redirection never appears, nothing on the console). The command
# first leaves a mark in the results directory; a VM without one after
# DMQ_VM_BOOT_DEADLINE seconds is killed and booted again, twice at most.
alive=$DMQ_VM_RWDIR/.vm-alive
deadline=${DMQ_VM_BOOT_DEADLINE:-300}
[ "${DMQ_KERNEL:-}" = debug ] && deadline=${DMQ_VM_BOOT_DEADLINE:-2400}
for try in 1 2 3; do
	rm -f "$alive"
	run "touch '$alive'; $*" &
	pid=$!
	t=0
	while [ ! -e "$alive" ] && kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$deadline" ]; do
		sleep 1
		t=$((t + 1))
	done
	if [ -e "$alive" ] || ! kill -0 "$pid" 2>/dev/null || [ "$try" = 3 ]; then
		rc=0
		wait "$pid" || rc=$?
		rm -f "$alive"
		exit "$rc"
	fi
	echo "vm.sh: the guest did not start its command within ${deadline}s (boot $try of 3): booting again" >&2
	kill_tree "$pid"
	wait "$pid" || true
done
