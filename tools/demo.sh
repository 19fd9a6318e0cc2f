#!/usr/bin/env bash
# The main job: build a 3-deep qcow2 chain holding an ext4 file system on the
# host (compressed base, overlays with only the changed clusters), boot the
# test kernel in a VM, map the chain with dmsetup, mount it and show files.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

work=$(mktemp -d /tmp/dmq-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "== building the image chain in $work"
mkdir -p content
echo "Hello from the qcow2 base image." > content/hello.txt
head -c 4M /dev/urandom > content/random.bin
mkfs.ext4 -q -F -L dmq-demo -d content base.raw 64M
qemu-img convert -q -c -O qcow2 base.raw base.qcow2        # compressed clusters

cp base.raw mid.raw
echo "Added in the middle delta." > added-mid.txt
debugfs -w -R "write added-mid.txt added-mid.txt" mid.raw >/dev/null 2>&1
qemu-img convert -q -O qcow2 -B base.qcow2 -F qcow2 mid.raw mid.qcow2

cp mid.raw top.raw
echo "Hello, overwritten in the top delta." > hello.txt
debugfs -w -R "rm hello.txt" top.raw >/dev/null 2>&1
debugfs -w -R "write hello.txt hello.txt" top.raw >/dev/null 2>&1
qemu-img convert -q -O qcow2 -B mid.qcow2 -F qcow2 top.raw top.qcow2

for i in base mid top; do
	printf '%-12s %s\n' "$i.qcow2" "$(qemu-img info --output=json $i.qcow2 |
		python3 -c 'import json,sys; j=json.load(sys.stdin); print("virtual", j["virtual-size"], "bytes, file", j["actual-size"], "bytes, backing", j.get("backing-filename","-"))')"
done
want=$(sha256sum < top.raw | cut -d' ' -f1)
sha256sum content/random.bin | cut -d' ' -f1 > random.sha

cat > guest.sh <<GUEST
set -e
insmod $DMQ_ROOT/dm-qcow2.ko
cd $work
$DMQ_ROOT/selftests/dmq_open.py demo base.qcow2 mid.qcow2 top.qcow2
echo "dmsetup table: \$(dmsetup table demo)"
echo "img 2 is: \$(dmsetup message demo 0 get_img_name 2)"
got=\$(sha256sum < /dev/mapper/demo | cut -d' ' -f1)
echo "device sha256 \$got (qemu-img: $want)"
[ "\$got" = "$want" ]
mkdir -p mnt
mount -o ro /dev/mapper/demo mnt
echo "--- ls -l of the mounted chain"
ls -l mnt
echo "--- hello.txt:   \$(cat mnt/hello.txt)"
echo "--- added-mid.txt: \$(cat mnt/added-mid.txt)"
[ "\$(sha256sum < mnt/random.bin | cut -d' ' -f1)" = "\$(cat random.sha)" ] &&
	echo "--- random.bin matches its checksum"
umount mnt
dmsetup remove demo
rmmod dm_qcow2
echo DEMO-OK > $work/result
GUEST

echo "== booting the test kernel (TCG) and mapping the chain"
DMQ_VM_RWDIR=$work "$DMQ_ROOT/tools/vm.sh" "bash $work/guest.sh > $work/guest.log 2>&1" || true
cat guest.log 2>/dev/null || true
if [ "$(cat result 2>/dev/null)" = DEMO-OK ]; then
	echo "== demo: OK"
else
	echo "== demo: FAILED"; exit 1
fi
