#!/usr/bin/env bash
# make bench: fio in the VM on tmpfs, dm-qcow2 beside a raw file and the
# userspace peers (qemu-nbd, rublk). Prints the table; asserts nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
out=$(mktemp -d /tmp/dmq-bench-out.XXXXXX)
KDIR=$(dmq_kdir)
cp "$KDIR/drivers/block/nbd.ko" "$KDIR/drivers/block/ublk_drv.ko" "$out/"
env=
for v in DMQ_BENCH_FS DMQ_BENCH_JOBS DMQ_BENCH_PEERS DMQ_BENCH_MODULE DMQ_BENCH_SIZE_MB DMQ_BENCH_RUNTIME DMQ_BENCH_CLUSTER DMQ_BENCH_STATUS_ROUNDS DMQ_BENCH_STATUS_RATE; do
	[ -n "${!v:-}" ] && env+="$v=${!v} "
done
DMQ_VM_RWDIR=$out "$DMQ_ROOT/tools/vm.sh" \
	"${env}python3 $DMQ_ROOT/tools/bench-guest.py $DMQ_ROOT $out > $out/log 2>&1" || true
cat "$out/log"
[ -s "$out/bench.txt" ] || die "benchmark produced no table"
cp "$out/bench.txt" "$DMQ_ROOT/bench-last.txt"
echo "(table saved in bench-last.txt)"
