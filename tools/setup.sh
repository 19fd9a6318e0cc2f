#!/usr/bin/env bash
# One-time (idempotent) setup of a Debian 12 machine, as root: packages, the
# Rust pieces the kernel build needs, and virtme-ng. The test kernels are
# built (or reused from the cache) by the make targets that need them.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BINDGEN_VERSION=0.71.1
VNG_VERSION=1.42

[ "$(id -u)" = 0 ] || die "run as root"
export DEBIAN_FRONTEND=noninteractive

apt_pkgs=(linux-source-6.12 clang lld llvm libclang-dev flex bison bc libelf-dev
	libssl-dev cpio busybox-static kmod qemu-utils udev dmsetup fio python3
	python3-pip xz-utils zstd e2fsprogs xfsprogs util-linux libdevmapper-dev pkg-config
	debhelper dh-dkms dkms patch rsync)

missing=()
for p in "${apt_pkgs[@]}" qemu-system-x86; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	apt-get update -qq
	# Some images carry qemu-utils from bookworm-backports; qemu-system-x86
	# must then come from there too, or apt refuses the mix.
	qemu_target=()
	if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
		if ! apt-cache policy 2>/dev/null | grep -q bookworm-backports; then
			cat > /etc/apt/sources.list.d/dm-qcow2-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
			apt-get update -qq
		fi
		qemu_target=(-t bookworm-backports)
	fi
	apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
	apt-get install -y -qq --no-install-recommends "${qemu_target[@]}" qemu-system-x86 >/dev/null
fi

command -v rustup >/dev/null || die "rustup not found: install the Rust toolchain with rustup first"
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
if [ "$(bindgen --version 2>/dev/null | awk '{print $2}')" != "$BINDGEN_VERSION" ]; then
	cargo install --locked --quiet bindgen-cli --version "$BINDGEN_VERSION"
fi
if [ "$(vng --version 2>/dev/null | awk '{print $2}')" != "$VNG_VERSION" ]; then
	python3 -m pip install -q "virtme-ng==$VNG_VERSION" 2>/dev/null ||
		python3 -m pip install -q --break-system-packages "virtme-ng==$VNG_VERSION"
fi

echo "setup: done"
