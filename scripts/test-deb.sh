#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# The Debian packages of `make deb` (scripts/mk-deb.sh), built into a temp
# dir and looked into, nothing installed:
#   scripts/test-deb.sh
# 1. both packages are built;
# 2. dm-qcow2-dkms holds the module's sources and dkms.conf under
#    /usr/src/dm-qcow2-<version>, and none of the command's;
# 3. dm-qcow2-tools holds the command, its manual pages (section 8) and the
#    bash, zsh and fish completions, with its shared libraries' dependencies;
# 4. the packaged command runs (--version); its pages say section 8.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
export PATH="$HOME/.cargo/bin:$PATH"
. "$here/tap.sh" debtest
ver=0.0.0.test
start=$(date +%s)
DMQ_VERSION=$ver "$here/mk-deb.sh" "$tmp/out" >"$tmp/build.log" 2>&1
rc=$?
dkms_deb=$tmp/out/dm-qcow2-dkms_${ver}_all.deb
tools_deb=$tmp/out/dm-qcow2-tools_${ver}_$(dpkg --print-architecture).deb
[ "$rc" = 0 ] && [ -f "$dkms_deb" ] && [ -f "$tools_deb" ]
rc=$?
[ "$rc" = 0 ] || tail -40 "$tmp/build.log"
result "$rc" "make deb: $(cd "$tmp/out" 2>/dev/null && ls ./*.deb | tr '\n' ' ')($(($(date +%s) - start)) s)"

dpkg-deb -c "$dkms_deb" 2>/dev/null | awk '{print $6}' >"$tmp/dkms.list"
missing=
for f in dkms.conf Kbuild Makefile drivers/dm_qcow2.rs drivers/qcow2_format.rs rust/dm.rs rust/shim.c scripts/preflight.sh; do
	grep -qx "./usr/src/dm-qcow2-$ver/$f" "$tmp/dkms.list" || missing+=" $f"
done
grep -q "/usr/src/dm-qcow2-$ver/\(tools\|Cargo\|drivers/qcow2-format\)" "$tmp/dkms.list" && missing+=" (the command's sources are in it)"
[ -z "$missing" ]
result $? "dm-qcow2-dkms: the module's sources under /usr/src/dm-qcow2-$ver${missing:+; wrong:$missing}"

dpkg-deb -c "$tools_deb" 2>/dev/null | awk '{print $6}' >"$tmp/tools.list"
missing=
for f in usr/sbin/dm-qcow2 usr/share/man/man8/dm-qcow2.8.gz usr/share/man/man8/dm-qcow2-merge.8.gz \
	usr/share/bash-completion/completions/dm-qcow2 usr/share/zsh/vendor-completions/_dm-qcow2 \
	usr/share/fish/vendor_completions.d/dm-qcow2.fish; do
	grep -qx "./$f" "$tmp/tools.list" || missing+=" $f"
done
deps=$(dpkg-deb -f "$tools_deb" Depends 2>/dev/null)
# dh_shlibdeps' view of the binary (the devicemapper crate speaks the
# ioctls itself: libdevmapper is a build dependency only)
case "$deps" in *libc6*) ;; *) missing+=" (Depends: '$deps' has no shared-library dependencies)" ;; esac
[ -z "$missing" ]
result $? "dm-qcow2-tools: command, man pages, completions, Depends: $deps${missing:+; missing:$missing}"

dpkg-deb -x "$tools_deb" "$tmp/x" 2>/dev/null
v=$("$tmp/x/usr/sbin/dm-qcow2" --version 2>&1)
th=$(zcat "$tmp/x/usr/share/man/man8/dm-qcow2-snapshot.8.gz" 2>/dev/null | grep -m1 '^\.TH')
[[ "$v" == dm-qcow2\ * ]] && [[ "$th" == *dm-qcow2-snapshot*\ 8* ]]
result $? "the packaged command runs ('$v'); its page is in section 8 ('$th')"

tap_done deb
