# Shared settings for the tools/ scripts. Source it; do not run it.
# shellcheck shell=bash

DMQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DMQ_KSRC_TAR=${DMQ_KSRC_TAR:-/usr/src/linux-source-6.12.tar.xz}
DMQ_CACHE=${DMQ_CACHE:-/var/cache/dm-qcow2}
# Which test kernel: "debug" (KASAN, lockdep, ...: make check, kselftest) or
# "release" (make demo, bench). Callers set it; release when unset.
DMQ_KERNEL=${DMQ_KERNEL:-release}
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "error: $*" >&2; exit 1; }

# The kernel version the package holds (whatever 6.12.y it is today).
dmq_kernel_version() {
	dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null | sed 's/[^A-Za-z0-9.+-]/_/g'
}

# The config fragments of the variant, in merge order.
dmq_kernel_fragments() {
	echo "$DMQ_ROOT/tools/kernel.config"
	[ "$DMQ_KERNEL" = debug ] && echo "$DMQ_ROOT/tools/kernel-debug.config"
	return 0
}

# Cache key: kernel package version + hash of everything that shapes the build.
dmq_kernel_key() {
	local h
	# shellcheck disable=SC2046
	h=$(cat $(dmq_kernel_fragments) "$DMQ_ROOT/tools/build-kernel.sh" \
		<(rustc --version) <(clang --version | head -1) | sha256sum | cut -c1-12)
	echo "$(dmq_kernel_version)-$h"
}

dmq_kdir() {
	if [ -n "${KDIR:-}" ]; then echo "$KDIR"; return; fi
	local suffix=""
	[ "$DMQ_KERNEL" = debug ] && suffix="-debug"
	echo "$DMQ_CACHE/linux-$(dmq_kernel_key)$suffix"
}
