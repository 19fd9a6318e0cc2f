#!/usr/bin/env bash
# The test suite: host tests (cargo) and the kselftests inside the VM.
#   tools/check.sh all|host|kselftest [test-name...]
# Ends with one line 'N passed, N failed' (', N skipped' when any skipped);
# exits non-zero if anything failed or nothing ran.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
cd "$DMQ_ROOT"

what=${1:-all}
shift || true
pass=0 fail=0 skip=0

host_tests() {
	echo "== host tests (cargo test)"
	local log; log=$(mktemp)
	cargo test --workspace 2>&1 | tee "$log"
	local rc=${PIPESTATUS[0]}
	local p f
	p=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | paste -sd+ | bc)
	f=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | paste -sd+ | bc)
	pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0}))
	if [ "$rc" != 0 ] && [ "${f:-0}" = 0 ]; then
		echo "cargo test failed (rc=$rc) without a failed test: counting one failure"
		fail=$((fail + 1))
	fi
	rm -f "$log"
}

kselftests() {
	local tests=("$@")
	if [ ${#tests[@]} -eq 0 ]; then
		mapfile -t tests < <(sed -n '/^TEST_PROGS/,/^$/p' selftests/Makefile | grep -oE '[A-Za-z0-9_]+\.sh')
	fi
	local out; out=$(mktemp -d /tmp/dmq-ksft.XXXXXX)
	echo "== kselftests in the VM: ${tests[*]}"
	DMQ_VM_RWDIR=$out tools/vm.sh "KDIR=$(dmq_kdir) $DMQ_ROOT/tools/guest-tests.sh $out ${tests[*]}"
	local rc=$?
	for t in "${tests[@]}"; do
		local log=$out/$t.log
		if [ ! -f "$log" ]; then
			echo "$t: no output (VM rc=$rc)"; fail=$((fail + 1)); continue
		fi
		cat "$log"
		local tot
		tot=$(grep -E '^# Totals: pass:[0-9]+ fail:[0-9]+' "$log" | tail -1)
		if [ -z "$tot" ]; then
			echo "$t: no KTAP totals (rc=$(cat "$out/$t.rc" 2>/dev/null)): counting one failure"
			fail=$((fail + 1)); continue
		fi
		local p f s x
		# " pass:" and " fail:" with the space: not "xpass:"/"xfail:".
		p=$(sed -E 's/.* pass:([0-9]+).*/\1/' <<<"$tot")
		f=$(sed -E 's/.* fail:([0-9]+).*/\1/' <<<"$tot")
		x=$(sed -nE 's/.* error:([0-9]+).*/\1/p' <<<"$tot")
		s=$(sed -nE 's/.* skip:([0-9]+).*/\1/p' <<<"$tot")
		pass=$((pass + p)); fail=$((fail + f + ${x:-0})); skip=$((skip + ${s:-0}))
	done
	rm -rf "$out"
}

case "$what" in
host) host_tests ;;
kselftest) kselftests "$@" ;;
all) host_tests; kselftests "$@" ;;
*) die "usage: $0 all|host|kselftest [test...]" ;;
esac

line="$pass passed, $fail failed"
[ "$skip" -gt 0 ] && line+=", $skip skipped"
echo "$line"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
