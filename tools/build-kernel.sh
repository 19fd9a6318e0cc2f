#!/usr/bin/env bash
# Build the test kernel (Debian's linux-source-6.12 + tools/kernel.config,
# plus tools/kernel-debug.config when DMQ_KERNEL=debug; LLVM=1) into a cache
# directory keyed by version + config hash. Reuses a finished build; a
# half-finished one is resumed (make is incremental).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ -r "$DMQ_KSRC_TAR" ] || die "$DMQ_KSRC_TAR missing: run 'make deps' first"
KDIR=$(dmq_kdir)
if [ -f "$KDIR/.dmq-built" ]; then
	echo "kernel: cached at $KDIR"
	exit 0
fi
mkdir -p "$KDIR"
start=$(date +%s)
if [ ! -f "$KDIR/Makefile" ]; then
	echo "kernel: extracting $DMQ_KSRC_TAR into $KDIR"
	tar -xaf "$DMQ_KSRC_TAR" -C "$KDIR" --strip-components=1
fi
cd "$KDIR"
if [ ! -f .dmq-configured ]; then
	make -s LLVM=1 x86_64_defconfig
	# shellcheck disable=SC2046
	scripts/kconfig/merge_config.sh -m .config $(dmq_kernel_fragments) >/dev/null
	make -s LLVM=1 olddefconfig
	# Every option a fragment sets must have stuck (an unmet dependency
	# drops it silently).
	# shellcheck disable=SC2046
	missing=$(grep -hE '^CONFIG_[A-Z0-9_]+=' $(dmq_kernel_fragments) |
		while read -r l; do grep -qxF "$l" .config || echo "$l"; done)
	[ -z "$missing" ] || die "config options that did not stick: $missing"
	if ! grep -q '^CONFIG_RUST=y' .config; then
		make LLVM=1 rustavailable || true
		die "CONFIG_RUST did not stick: see 'make LLVM=1 rustavailable' above"
	fi
	touch .dmq-configured
fi
jobs=$(( $(nproc) + 1 ))
echo "kernel ($DMQ_KERNEL): building in $KDIR with -j$jobs (tens of minutes on a cold cache)"
make -s LLVM=1 -j"$jobs" all
touch .dmq-built
echo "kernel: built in $(( $(date +%s) - start ))s"
