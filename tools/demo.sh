#!/usr/bin/env bash
# The main job: build a 3-deep qcow2 chain holding an ext4 file system on the
# host (compressed base, overlays with only the changed clusters), boot the
# test kernel in a VM, map the chain with the dm-qcow2 command (chain found
# from the headers), mount it and show files; then map it writable, write
# files, merge the top into the image below it while mounted (dm-qcow2
# merge), and read them back on the host with
# QEMU's own qcow2 code (qemu-img) after a clean qemu-img check.
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
for i in base mid; do sha256sum < $i.qcow2 > $i.sha0; done
sha256sum content/random.bin | cut -d' ' -f1 > random.sha

echo "== building the dm-qcow2 command (cargo build --release -p dm-qcow2)"
(cd "$DMQ_ROOT" && cargo build --release -q -p dm-qcow2)
tool=$DMQ_ROOT/target/release/dm-qcow2

cat > guest.sh <<GUEST
set -e
insmod $DMQ_ROOT/dm-qcow2.ko
cd $work
echo "--- dm-qcow2 connect --read-only --name demo top.qcow2"
$tool connect --read-only --name demo top.qcow2
$tool list
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
$tool disconnect demo
echo "--- now writable: dm-qcow2 connect --name demo top.qcow2"
$tool connect --name demo top.qcow2
mount /dev/mapper/demo mnt
echo "Written through dm-qcow2 in the VM." > mnt/written.txt
head -c 2M /dev/urandom > mnt/new.bin
sha256sum < mnt/new.bin | cut -d' ' -f1 > new.sha
sync
echo "--- merging the top into mid while mounted: dm-qcow2 merge demo"
$tool merge demo
echo "dmsetup table: \$(dmsetup table demo) (one image less)"
echo "img 1 is now: \$(dmsetup message demo 0 get_img_name 1)"
echo "--- written.txt, still mounted: \$(cat mnt/written.txt)"
echo "Written after the merge." > mnt/after-merge.txt
umount mnt
$tool status demo
$tool disconnect demo
rmmod dm_qcow2
echo DEMO-OK > $work/result
GUEST

echo "== booting the test kernel (TCG) and mapping the chain"
DMQ_VM_RWDIR=$work "$DMQ_ROOT/tools/vm.sh" "bash $work/guest.sh > $work/guest.log 2>&1" || true
cat guest.log 2>/dev/null || true
[ "$(cat result 2>/dev/null)" = DEMO-OK ] || { echo "== demo: FAILED"; exit 1; }

echo "== back on the host: QEMU reads what the kernel wrote (the top merged into mid)"
for i in top mid; do qemu-img check $i.qcow2 | head -1 | sed "s/^/$i.qcow2: /"; done
[ "$(sha256sum < base.qcow2)" = "$(cat base.sha0)" ] && echo "base.qcow2 unchanged"
qemu-img convert -O raw mid.qcow2 after.raw
echo "written.txt via qemu-img + debugfs: $(debugfs -R 'cat written.txt' after.raw 2>/dev/null)"
echo "after-merge.txt: $(debugfs -R 'cat after-merge.txt' after.raw 2>/dev/null)"
debugfs -R 'dump new.bin new.out' after.raw >/dev/null 2>&1
[ "$(sha256sum < new.out | cut -d' ' -f1)" = "$(cat new.sha)" ] || { echo "== demo: new.bin differs"; exit 1; }
echo "new.bin (2 MiB written in the VM) matches its checksum"
echo "== demo: OK"
