# SPDX-License-Identifier: GPL-2.0
#
# TAP lines for the packaging tests (scripts/test-*.sh), sourced:
#   . scripts/tap.sh NAME     makes $tmp (/tmp/dmq-NAME.XXXXXX, removed on exit
#                             unless the script sets its own EXIT trap)
#   result RC TEXT            "ok N - TEXT" when RC is 0, else "not ok N - TEXT"
#   tap_done WHAT [NOTE]      "# WHAT: P passed, F failed[ NOTE]"; status 0 if none failed
n=0 failed=0
tmp=$(mktemp -d "/tmp/dmq-$1.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

result() {
	n=$((n + 1))
	if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=$((failed + 1)); fi
}

tap_done() {
	echo "# $1: $((n - failed)) passed, $failed failed${2:+ $2}"
	[ "$failed" = 0 ]
}
