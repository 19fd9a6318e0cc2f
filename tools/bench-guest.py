#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Benchmarks inside the VM: fio on a tmpfs, dm-qcow2 beside a raw file
(O_DIRECT) and beside the userspace peers serving the same qcow2 image
(qemu-nbd + nbd.ko, rublk + ublk_drv when present). Prints a table of IOPS
and MB/s with ratios to raw and to each peer. No assertions: numbers only.

usage: bench-guest.py ROOT OUTDIR
       bench-guest.py --status-loop DM_NAME SECONDS   (the poller below)

DMQ_BENCH_FS=ext4 puts the images on ext4 over a loop device (a sparse
file on a tmpfs) instead of the tmpfs itself: there direct I/O is
asynchronous and fsync reaches a block device, so the cost of the target's
ordered metadata commit shows. DMQ_BENCH_JOBS (comma-separated job names)
and DMQ_BENCH_PEERS (peer names) pick a subset; DMQ_BENCH_MODULE another
dm-qcow2.ko (an A/B of two builds).

The job "status-under-fio" (dm-qcow2 only) runs 4k random reads four
times: alone, with a process asking for the device's status 1000 times a
second (DM_TABLE_STATUS ioctls, as `dmsetup status` does, without a fork
and exec per call; DMQ_BENCH_STATUS_RATE), with the same poller on a
dm-zero device instead (what the poller itself costs the 2 vCPUs), and
alone again. The target's share is the second against the third.
"""

import json
import os
import shutil
import subprocess
import sys
import time

ROOT, OUT = sys.argv[1], sys.argv[2]
WORK = "/tmp/dmq-bench"
SIZE = int(os.environ.get("DMQ_BENCH_SIZE_MB", "512"))
RUNTIME = int(os.environ.get("DMQ_BENCH_RUNTIME", "8"))
CLUSTER = os.environ.get("DMQ_BENCH_CLUSTER", "64k")
FS = os.environ.get("DMQ_BENCH_FS", "tmpfs")
MODULE = os.environ.get("DMQ_BENCH_MODULE", f"{ROOT}/dm-qcow2.ko")

JOBS = [
    # name, rw, bs, on a fully allocated image?
    ("4k-randread", "randread", "4k", True),
    ("4k-randwrite", "randwrite", "4k", True),
    ("1M-read", "read", "1M", True),
    ("1M-write", "write", "1M", True),
    ("4k-first-write", "randwrite", "4k", False),
    ("64k-first-write", "randwrite", "64k", False),
    ("status-under-fio", "randread", "4k", True),
]

DM_IOCTL_SIZE = 312          # struct dm_ioctl
DM_TABLE_STATUS = (3 << 30) | (DM_IOCTL_SIZE << 16) | (0xfd << 8) | 12


STATUS_RATE = int(os.environ.get("DMQ_BENCH_STATUS_RATE", "1000"))


def status_loop(name, secs):
    """Asks for the status of dm device NAME, STATUS_RATE times a second
    (in bursts every 10 ms), until SECS pass; prints the calls made. A fixed
    rate, not a tight loop: the poller costs the same CPU beside either
    device, so the difference is what one call costs."""
    import fcntl
    import struct
    size = 16384
    fd = os.open("/dev/mapper/control", os.O_RDWR)
    burst = max(1, STATUS_RATE // 100)
    n, start = 0, time.time()
    end = start + secs
    while True:
        now = time.time()
        if now >= end:
            break
        due = int((now - start) * STATUS_RATE)
        if n >= due:
            time.sleep(0.01)
            continue
        for _ in range(min(burst, due - n)):
            buf = bytearray(size)
            # version 4.0.0, data_size, data_start; name at offset 48
            struct.pack_into("=3III", buf, 0, 4, 0, 0, size, DM_IOCTL_SIZE)
            buf[48:48 + len(name)] = name.encode()
            fcntl.ioctl(fd, DM_TABLE_STATUS, buf)
            n += 1
    print(n)


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, shell=True, check=check, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def log(msg):
    print(msg, flush=True)


def fio(dev, rw, bs):
    r = sh(f"fio --name=b --filename={dev} --direct=1 --ioengine=libaio "
           f"--iodepth=32 --rw={rw} --bs={bs} --runtime={RUNTIME} --time_based "
           f"--size={SIZE}M --randrepeat=0 --norandommap --group_reporting "
           f"--output-format=json", check=False)
    if r.returncode != 0:
        log(f"fio failed on {dev}: {r.stdout[-500:]}")
        return None
    j = json.loads(r.stdout[r.stdout.index("{"):])
    job = j["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"], side["bw_bytes"] / 1e6


def load_module(name, args=""):
    """modprobe, else insmod the copy bench.sh put in OUT (the VM's
    /lib/modules lacks the test kernel's modules, and the kernel cache
    directory is not visible in the VM)."""
    if sh(f"grep -q '^{name} ' /proc/modules", check=False).returncode == 0:
        return
    if sh(f"modprobe {name} {args}", check=False).returncode == 0:
        return
    sh(f"insmod {OUT}/{name}.ko {args}")


def wait_for(path, seconds=10):
    """Waits for a device node or sysfs file a server creates."""
    for _ in range(seconds * 10):
        if os.path.exists(path):
            return
        time.sleep(0.1)


def make_image(path, allocated):
    sh(f"rm -f {path}")
    sh(f"qemu-img create -q -f qcow2 -o cluster_size={CLUSTER} {path} {SIZE}M")
    if allocated:
        sh(f"qemu-io -f qcow2 -c 'write -P 0x5a 0 {SIZE}M' {path}")


def make_raw(path, allocated):
    """The raw file, like the image: written in full for the jobs on an
    allocated image, sparse (as `qemu-img create -f raw` or `truncate`
    leave it) for first writes, which then allocate in the host file system
    for the raw file too."""
    if allocated:
        sh(f"rm -f {path}; dd if=/dev/zero of={path} bs=1M count={SIZE} status=none")
    else:
        sh(f"rm -f {path}; truncate -s {SIZE}M {path}")


class Peer:
    """A way to serve an image as a block device."""

    def __init__(self, name):
        self.name = name

    def up(self, img):
        raise NotImplementedError

    def down(self):
        pass


class Raw(Peer):
    def up(self, img):
        return img  # fio on the file itself


class DmQcow2(Peer):
    def up(self, img):
        sh(f"{ROOT}/selftests/dmq_open.py --rw bench {img}")
        return "/dev/mapper/bench"

    def down(self):
        sh("dmsetup remove bench", check=False)


class QemuNbd(Peer):
    def up(self, img):
        load_module("nbd", "nbds_max=2")
        sh(f"qemu-nbd -c /dev/nbd0 -f qcow2 --cache=none --aio=native {img}")
        wait_for("/sys/block/nbd0/pid")
        return "/dev/nbd0"

    def down(self):
        sh("qemu-nbd -d /dev/nbd0", check=False)
        time.sleep(0.5)


class Rublk(Peer):
    def __init__(self, name, exe):
        super().__init__(name)
        self.exe = exe

    def up(self, img):
        load_module("ublk_drv")
        sh(f"{self.exe} add qcow2 --file {img}")
        wait_for("/dev/ublkb0")
        return "/dev/ublkb0"

    def down(self):
        sh(f"{self.exe} del -a", check=False)


STATUS_ROUNDS = int(os.environ.get("DMQ_BENCH_STATUS_ROUNDS", "3"))


def status_under_fio(rw, bs):
    """fio on dm-qcow2 alone, beside a status poller on it, beside the same
    poller on a dm-zero device, in STATUS_ROUNDS alternating rounds (a slow
    drift of the host's load falls on all three alike): lines for the table
    with the median of each."""
    img = f"{WORK}/img"
    make_image(img, True)
    p = DmQcow2("dm-qcow2")
    secs = RUNTIME + 4
    kinds = (("alone", None), ("status poller on it", "bench"), ("status poller on dm-zero", "bench-zero"))
    runs = {what: [] for what, _ in kinds}
    try:
        dev = p.up(img)
        sh(f"dmsetup create bench-zero --table '0 {SIZE * 2048} zero'")
        for _ in range(STATUS_ROUNDS):
            for what, target in kinds:
                poller = None
                if target:
                    poller = subprocess.Popen([sys.executable, __file__, "--status-loop", target, str(secs)],
                                              stdout=subprocess.PIPE, text=True)
                    time.sleep(0.5)
                r = fio(dev, rw, bs)
                calls = poller.communicate()[0].strip() if poller else "-"
                if r:
                    runs[what].append(r[0])
                log(f"status-under-fio {what:26} " + (f"{r[0]:10.0f} IOPS" if r else "failed") +
                    f", status calls {calls}")
    finally:
        sh("dmsetup remove bench-zero", check=False)
        p.down()

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if v else None

    med = {what: median(v) for what, v in runs.items()}
    lines = ["", f"status under fio: {bs} {rw} on dm-qcow2 (an allocated image), "
             f"median of {STATUS_ROUNDS} alternating rounds; the poller does {STATUS_RATE} "
             "DM_TABLE_STATUS ioctls a second"]
    for what, _ in kinds:
        m = med[what]
        lines.append(f"  {what:26} " + (f"{m:10.0f} IOPS" if m else "    failed") +
                     "   (" + ", ".join(f"{x:.0f}" for x in runs[what]) + ")")
    on, zero = med["status poller on it"], med["status poller on dm-zero"]
    if on and zero:
        lines.append(f"  poller on dm-qcow2 / poller on dm-zero: {on / zero:.3f}x "
                     "(what the target's status costs fio; the poller's own CPU is in both)")
    return lines


def mount_work():
    os.makedirs(WORK, exist_ok=True)
    if FS == "tmpfs":
        sh(f"mountpoint -q {WORK} || mount -t tmpfs -o size={SIZE * 3 + 256}M tmpfs {WORK}")
        return
    back = WORK + ".backing"
    os.makedirs(back, exist_ok=True)
    sh(f"mountpoint -q {back} || mount -t tmpfs -o size={SIZE * 3 + 512}M tmpfs {back}")
    sh(f"truncate -s {SIZE * 3 + 256}M {back}/disk")
    loop = sh(f"losetup -f --show {back}/disk").stdout.strip()
    sh(f"mkfs.ext4 -q -F {loop}")
    sh(f"mount -t ext4 {loop} {WORK}")


def main():
    mount_work()
    sh(f"grep -q '^dm_qcow2 ' /proc/modules || insmod {MODULE}")
    peers = [Raw("raw"), DmQcow2("dm-qcow2"), QemuNbd("qemu-nbd")]
    rublk = shutil.which("rublk") or "/root/.cargo/bin/rublk"
    if os.access(rublk, os.X_OK):
        peers.append(Rublk("rublk", rublk))
    else:
        log("rublk not installed: skipping that peer (make bench-deps)")
    if os.environ.get("DMQ_BENCH_PEERS"):
        want = os.environ["DMQ_BENCH_PEERS"].split(",")
        peers = [p for p in peers if p.name in want]
    jobs = JOBS
    if os.environ.get("DMQ_BENCH_JOBS"):
        want = os.environ["DMQ_BENCH_JOBS"].split(",")
        jobs = [j for j in JOBS if j[0] in want]

    results = {}
    extra = []
    for name, rw, bs, allocated in jobs:
        if name == "status-under-fio":
            extra += status_under_fio(rw, bs)
            continue
        for p in peers:
            img = f"{WORK}/img"
            if isinstance(p, Raw):
                make_raw(img, allocated)
            else:
                make_image(img, allocated)
            try:
                dev = p.up(img)
                results[(name, p.name)] = fio(dev, rw, bs)
            except subprocess.CalledProcessError as e:
                log(f"{p.name}: {e.cmd}: {e.stdout[-300:] if e.stdout else ''}")
                results[(name, p.name)] = None
            finally:
                p.down()
            r = results[(name, p.name)]
            log(f"{name:16} {p.name:10} " + (f"{r[0]:10.0f} IOPS {r[1]:9.1f} MB/s" if r else "failed"))
            if isinstance(p, Raw) and not allocated:
                # Also against a written raw file (no allocation in the host
                # file system at all): the figure older tables compared with.
                make_raw(img, True)
                r = fio(img, rw, bs)
                results[(name, "raw-written")] = r
                log(f"{name:16} {'raw-written':10} " + (f"{r[0]:10.0f} IOPS {r[1]:9.1f} MB/s" if r else "failed"))

    names = [p.name for p in peers]
    lines = [f"fio: libaio, iodepth 32, {RUNTIME}s per job, {SIZE} MiB, "
             f"cluster {CLUSTER}, {FS} in a TCG VM (2 vCPUs)", ""]
    hdr = f"{'job':16} " + " ".join(f"{n:>20}" for n in names)
    hdr += "  " + " ".join(f"{'dm/' + n:>12}" for n in names if n != "dm-qcow2")
    lines += [hdr]
    for name, *_ in jobs:
        if name == "status-under-fio":
            continue
        row = f"{name:16} "
        for n in names:
            r = results.get((name, n))
            row += f"{(f'{r[0]:.0f}/{r[1]:.1f}MB' if r else '-'):>20} "
        dm = results.get((name, "dm-qcow2"))
        for n in names:
            if n == "dm-qcow2":
                continue
            r = results.get((name, n))
            row += f" {(f'{dm[0] / r[0]:.2f}x' if dm and r and r[0] else '-'):>12}"
        lines.append(row)
    lines.append("")
    lines.append("cells: IOPS/MB/s; ratios: dm-qcow2 IOPS divided by the column's IOPS")
    lines.append("raw: a written file for the jobs on an allocated image, a sparse one for first writes")
    for name, *_ in jobs:
        w, dm = results.get((name, "raw-written")), results.get((name, "dm-qcow2"))
        if w and dm and w[0]:
            lines.append(f"{name}: dm-qcow2 / a written raw file (overwrites, no allocation): {dm[0] / w[0]:.2f}x")
    lines += extra
    text = "\n".join(lines)
    print(text)
    with open(f"{OUT}/bench.txt", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--status-loop":
        status_loop(sys.argv[2], float(sys.argv[3]))
    else:
        main()
