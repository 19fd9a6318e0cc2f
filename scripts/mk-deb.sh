#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# make deb: dm-qcow2-dkms_<version>_all.deb and dm-qcow2-tools_<version>_<arch>.deb
# (debhelper + dh-dkms; one source package) into OUT:
#   scripts/mk-deb.sh [OUT]     (default: out/deb)
# The version is 0.1.0.git<commit date>.<short hash> of HEAD (DMQ_VERSION
# overrides); the sources are the module's build files (module-files.sh)
# and the cargo workspace of the command. The command builds in this
# checkout's target/ (DMQ_CARGO_TARGET_DIR: another), so a second `make deb`
# recompiles nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/out/deb}" && cd "${1:-$root/out/deb}" && pwd)
ver=${DMQ_VERSION:-0.1.0.git$(git -C "$root" log -1 --format=%cd --date=format:%Y%m%d).$(git -C "$root" rev-parse --short HEAD)}
stage=$(mktemp -d /tmp/dmq-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
src=$stage/dm-qcow2-$ver
"$root/scripts/module-files.sh" "$src"
# the command's crates (the workspace: the format crate, not its fuzzer)
git -C "$root" ls-files -- Cargo.toml Cargo.lock tools/dm-qcow2 drivers/qcow2-format |
	grep -v '^drivers/qcow2-format/fuzz/' | (cd "$root" && tar -cf - -T -) | tar -xf - -C "$src"
export DMQ_CARGO_TARGET_DIR=${DMQ_CARGO_TARGET_DIR:-$root/target}
cp "$root/packaging/dkms.conf" "$src/"
cp -r "$root/packaging/debian" "$src/"
cat >"$src/debian/changelog" <<CL
dm-qcow2 ($ver) unstable; urgency=medium

  * Built from $(git -C "$root" rev-parse HEAD).

 -- dm-qcow2 developers <dm-qcow2@localhost>  $(date -R)
CL
(cd "$src" && dpkg-buildpackage -b -us -uc --no-pre-clean >"$stage/build.log" 2>&1) || {
	cat "$stage/build.log"; exit 1;
}
mv "$stage"/*.deb "$out/"
echo "$out/dm-qcow2-dkms_${ver}_all.deb"
echo "$out/dm-qcow2-tools_${ver}_$(dpkg --print-architecture).deb"
