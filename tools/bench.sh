#!/usr/bin/env bash
# make bench: fio and timed jobs in the VM on tmpfs, dm-qcow2 beside a raw
# file and the userspace peers (qemu-nbd, rublk). Prints the table (saved in
# bench-last.txt, the numbers in bench-last.json) and draws bench-last.svg
# with matplotlib when it is installed; asserts nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
out=$(mktemp -d /tmp/dmq-bench-out.XXXXXX)
KDIR=$(dmq_kdir)
cp "$KDIR/drivers/block/nbd.ko" "$KDIR/drivers/block/ublk_drv.ko" "$out/"
env=
for v in DMQ_BENCH_FS DMQ_BENCH_JOBS DMQ_BENCH_PEERS DMQ_BENCH_MODULE DMQ_BENCH_SIZE_MB \
	DMQ_BENCH_RUNTIME DMQ_BENCH_CLUSTER DMQ_BENCH_STATUS_ROUNDS DMQ_BENCH_STATUS_RATE \
	DMQ_BENCH_DISCARD_MB DMQ_BENCH_MERGE_MB DMQ_BENCH_SPARSE_GB DMQ_BENCH_SPARSE_TOUCH_MB \
	DMQ_BENCH_ROUNDS DMQ_BENCH_PERF; do
	[ -n "${!v:-}" ] && env+="$v=${!v} "
done
# sparse-randread keeps 2 GiB in the tmpfs: more memory than the tests' 4G.
DMQ_VM_MEM=${DMQ_VM_MEM:-6G} DMQ_VM_RWDIR=$out "$DMQ_ROOT/tools/vm.sh" \
	"${env}python3 $DMQ_ROOT/tools/bench-guest.py $DMQ_ROOT $out > $out/log 2>&1" || true
cat "$out/log"
[ -s "$out/bench.txt" ] || die "benchmark produced no table"
cp "$out/bench.txt" "$DMQ_ROOT/bench-last.txt"
echo "(table saved in bench-last.txt)"
# DMQ_BENCH_PERF=1: the profiles of the fio runs.
if compgen -G "$out/perf-*.txt" >/dev/null; then
	rm -rf "$DMQ_ROOT/bench-perf"
	mkdir -p "$DMQ_ROOT/bench-perf"
	cp "$out"/perf-*.txt "$DMQ_ROOT/bench-perf/"
	echo "(profiles saved in bench-perf/)"
fi
[ -s "$out/bench.json" ] || exit 0
cp "$out/bench.json" "$DMQ_ROOT/bench-last.json"

# The chart, with Debian's matplotlib (python3-matplotlib) or any python3's.
py=
for p in /usr/bin/python3 python3; do
	if command -v "$p" >/dev/null && "$p" -c 'import matplotlib' 2>/dev/null; then
		py=$p
		break
	fi
done
if [ -z "$py" ]; then
	echo "no chart: matplotlib is not installed (apt-get install python3-matplotlib, or make bench-deps)"
	exit 0
fi
if "$py" "$DMQ_ROOT/tools/bench-chart.py" "$out/bench.json" "$DMQ_ROOT/bench-last.svg"; then
	echo "(chart saved in bench-last.svg)"
else
	echo "the chart failed (the table above stands)"
fi
