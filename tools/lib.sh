# Shared settings for the tools/ scripts. Source it; do not run it.
# shellcheck shell=bash

DMQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DMQ_KSRC_TAR=${DMQ_KSRC_TAR:-/usr/src/linux-source-6.12.tar.xz}
DMQ_CACHE=${DMQ_CACHE:-/var/cache/dm-qcow2}
export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "error: $*" >&2; exit 1; }

# The kernel version the package holds (whatever 6.12.y it is today).
dmq_kernel_version() {
	dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null | sed 's/[^A-Za-z0-9.+-]/_/g'
}

# Cache key: kernel package version + hash of everything that shapes the build.
dmq_kernel_key() {
	local h
	h=$(cat "$DMQ_ROOT/tools/kernel.config" "$DMQ_ROOT/tools/build-kernel.sh" \
		<(rustc --version) <(clang --version | head -1) | sha256sum | cut -c1-12)
	echo "$(dmq_kernel_version)-$h"
}

dmq_kdir() {
	if [ -n "${KDIR:-}" ]; then echo "$KDIR"; return; fi
	echo "$DMQ_CACHE/linux-$(dmq_kernel_key)"
}
