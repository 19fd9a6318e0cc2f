#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Benchmarks inside the VM: fio on a tmpfs, dm-qcow2 beside a raw file
(O_DIRECT) and beside the userspace peers serving the same qcow2 image
(qemu-nbd + nbd.ko, rublk + ublk_drv when present), all in one run.
Prints a table (bench.txt in OUTDIR) and writes bench.json there for the
host's chart (tools/bench-chart.py). No assertions: numbers only.

usage: bench-guest.py ROOT OUTDIR
       bench-guest.py --status-loop DM_NAME SECONDS   (the poller below)

For each job and peer: IOPS and MB/s (fio jobs) or time and MB/s (timed
jobs), the p50/p99 completion latency of the QD1 jobs (fio's clat, from
submission to completion) and their p50/p99 latency in all (fio's lat:
the submitting system call's time too, where a target that starts the
I/O on the submitter's CPU spends it), the guest's CPU
time (/proc/stat, both vCPUs, every process: fio, the target's workers,
qemu-nbd or rublk) during fio's I/O phase per I/O, or during a timed job,
and dm-qcow2's rate and CPU divided by each column's. A job or peer that
fails prints "failed" and why; the rest goes on.

The jobs (DMQ_BENCH_JOBS, comma-separated names, picks a subset):
  4k-randread, 4k-randwrite          libaio, iodepth 32, one fio job
  4k-randread-2jobs, -randwrite-2jobs the same with numjobs 2 (2 vCPUs)
  4k-randread-qd1, 4k-randwrite-qd1  iodepth 1, with p50/p99 latency
                                     (completion, and in all)
  4k-randwrite-fua, -fua-qd1,        4k random writes opened O_DSYNC
  -fua-2jobs                         (fio --sync=dsync): through libaio
                                     each is one REQ_FUA write, as a
                                     journaling guest's log writes are;
                                     at iodepth 32, 1 (with latency), and
                                     32 with numjobs 2
  4k-randwrite-fsync-qd1             4k random writes at iodepth 1, each
                                     followed by fdatasync (fio
                                     --fdatasync=1): on the device an
                                     empty flush, as a guest's fsync of
                                     data already written sends
  1M-read, 1M-write                  sequential, iodepth 32
  4k-first-write, 64k-first-write    on an empty image, against a sparse
                                     raw file (and a written one beside)
  4k-cow-write      4k random writes into an empty top over a fully
                    written base, one write at the start of each cluster
                    in random order (each copies the rest of its cluster
                    up from the base), against the written raw file; once
                    every cluster had its write (8192 of 64 KiB in 512
                    MiB), fio starts over and the writes land in place
  4k-cow-randrw     the same with half of the I/Os reads (fio's randrw,
                    one random map for both: a pass over the clusters
                    writes about half of them, so copy-on-write writes
                    go on into later passes): reads of clusters not
                    copied up yet come from the base, between the
                    copy-on-write writes
  4k-randread-base  4k random reads (iodepth 32) through an empty top over
                    a fully written base (a guest booting from a template
                    image), against the written raw file; -2jobs with
                    numjobs 2, -qd1 at iodepth 1 (with latency)
  sparse-randread   4k random reads over a DMQ_BENCH_SPARSE_GB (64) GiB
                    image with DMQ_BENCH_SPARSE_TOUCH_MB (2048) MiB of
                    clusters written at random (the raw file: the same
                    clusters of a sparse file): metadata cache misses
  discard           a timed whole-device blkdiscard of a fully written
                    DMQ_BENCH_DISCARD_MB (1024) MiB image; raw is a loop
                    device over the written raw file (the loop driver
                    punches holes in the file, as the block layer brings
                    the discard to the target), and "raw-punch" beside it
                    is `fallocate --punch-hole` on the file itself
  merge-depth0, merge-depth1  (dm-qcow2 only) a timed backward merge of a
                    delta holding DMQ_BENCH_MERGE_MB (512) MiB into an
                    empty base (merge_backward start, eventfd and progress
                    until stage=ready, complete), at depth 0 (the top) and
                    depth 1 (below an empty top; the merged delta is then
                    open read-only, so it is copied, not moved, as
                    `dm-qcow2 merge` does it), against `cp
                    --sparse=always` of the delta's file plus `sync` of
                    the copy on the same file system ("cp")
  merge-reads       (dm-qcow2 only) 4k random reads (iodepth 32) on the
                    device during the backward merge of merge-depth0:
                    their rate while the merge copies (start to
                    stage=ready) against their rate in the seconds before
                    it ("alone"), from the device's completed reads
                    (/sys/block/dm-N/stat); the merge's time is in the note
  status-under-fio  (dm-qcow2 only) see below

"loop" is the kernel's loop device with direct I/O over the same raw file
(not in the discard job, where raw is one already): the cost of a block
device stacked on a file, beside the raw file's ceiling.

DMQ_BENCH_PEERS (raw, loop, dm-qcow2, qemu-nbd, rublk) picks peers; an absent
one (rublk not installed) is skipped. DMQ_BENCH_SIZE_MB (512) is the
image of the fio jobs, DMQ_BENCH_RUNTIME (8) seconds per fio run,
DMQ_BENCH_CLUSTER (64k) the cluster size. DMQ_BENCH_FS=ext4 puts the
images on ext4 over a loop device (a sparse file on a tmpfs) instead of
the tmpfs itself: there direct I/O is asynchronous and fsync reaches a
block device, so the cost of the target's ordered metadata commit shows.
DMQ_BENCH_MODULE loads another dm-qcow2.ko (an A/B of two builds).
DMQ_BENCH_PERF=1 profiles every fio run: `perf record -a -e cpu-clock`
(both vCPUs, every task) around it, and a flat report by task and symbol
saved as perf-JOB-PEER-N.txt (make bench copies them to bench-perf/).
Its own cost is in that run's rates and CPU: for a profile, not a table.
DMQ_BENCH_PERF=g also records call chains and adds the callers of the
symbols above 2% of the samples to each report.

DMQ_BENCH_ROUNDS (1) runs the fio, sparse and discard jobs that many times
on each peer, the peers taking turns (raw, dm-qcow2, raw, dm-qcow2, ...)
so that a slow minute of the host hits both. Each peer's line is its
median round (by rate); dm-qcow2's ratio to a column is the median of the
rounds' paired ratios (round i against round i), and a table of their
lowest and highest shows the spread. Under TCG on a shared 2-core host one
run's ratio can move by 20% or more from the next.

The job "status-under-fio" runs 4k random reads in DMQ_BENCH_STATUS_ROUNDS
(3) rounds
of three: alone, with a process asking for the device's status 1000 times
a second (DM_TABLE_STATUS ioctls, as `dmsetup status` does, without a fork
and exec per call; DMQ_BENCH_STATUS_RATE), and with the same poller on a
dm-zero device instead (what the poller itself costs the 2 vCPUs). The
target's share is the second against the third.
"""

import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT, OUT = sys.argv[1], sys.argv[2]
WORK = "/tmp/dmq-bench"
SIZE = int(os.environ.get("DMQ_BENCH_SIZE_MB", "512"))
RUNTIME = int(os.environ.get("DMQ_BENCH_RUNTIME", "8"))
CLUSTER = os.environ.get("DMQ_BENCH_CLUSTER", "64k")
FS = os.environ.get("DMQ_BENCH_FS", "tmpfs")
MODULE = os.environ.get("DMQ_BENCH_MODULE", f"{ROOT}/dm-qcow2.ko")
DISCARD_MB = int(os.environ.get("DMQ_BENCH_DISCARD_MB", "1024"))
MERGE_MB = int(os.environ.get("DMQ_BENCH_MERGE_MB", "512"))
SPARSE_GB = int(os.environ.get("DMQ_BENCH_SPARSE_GB", "64"))
SPARSE_TOUCH_MB = int(os.environ.get("DMQ_BENCH_SPARSE_TOUCH_MB", "2048"))
STATUS_ROUNDS = int(os.environ.get("DMQ_BENCH_STATUS_ROUNDS", "3"))
STATUS_RATE = int(os.environ.get("DMQ_BENCH_STATUS_RATE", "1000"))
ROUNDS = max(1, int(os.environ.get("DMQ_BENCH_ROUNDS", "1")))
PERF = os.environ.get("DMQ_BENCH_PERF", "0")
PERF = PERF if PERF in ("1", "g") else None
MERGE_TIMEOUT = 1800  # seconds to stage=ready


@dataclass(frozen=True)
class Job:
    name: str
    kind: str                # fio, sparse, discard, merge, merge-reads, status
    rw: str = "randread"
    bs: str = "4k"
    allocated: bool = True   # fio jobs: on a fully written image
    backing: bool = False    # fio jobs: on an empty top over a written base
    iodepth: int = 32
    numjobs: int = 1
    depth: int = 0           # merge: the merged delta (0 = top)
    fua: bool = False        # fio jobs: O_DSYNC, so every write is REQ_FUA
    fsync: bool = False      # fio jobs: an fdatasync after every write


JOBS = [
    Job("4k-randread", "fio"),
    Job("4k-randwrite", "fio", "randwrite"),
    Job("4k-randread-2jobs", "fio", numjobs=2),
    Job("4k-randwrite-2jobs", "fio", "randwrite", numjobs=2),
    Job("4k-randread-qd1", "fio", iodepth=1),
    Job("4k-randwrite-qd1", "fio", "randwrite", iodepth=1),
    Job("4k-randwrite-fua", "fio", "randwrite", fua=True),
    Job("4k-randwrite-fua-qd1", "fio", "randwrite", iodepth=1, fua=True),
    Job("4k-randwrite-fua-2jobs", "fio", "randwrite", numjobs=2, fua=True),
    Job("4k-randwrite-fsync-qd1", "fio", "randwrite", iodepth=1, fsync=True),
    Job("1M-read", "fio", "read", "1M"),
    Job("1M-write", "fio", "write", "1M"),
    Job("4k-first-write", "fio", "randwrite", allocated=False),
    Job("64k-first-write", "fio", "randwrite", "64k", allocated=False),
    Job("4k-cow-write", "fio", "randwrite", allocated=False, backing=True),
    Job("4k-cow-randrw", "fio", "randrw", allocated=False, backing=True),
    Job("4k-randread-base", "fio", allocated=False, backing=True),
    Job("4k-randread-base-2jobs", "fio", allocated=False, backing=True, numjobs=2),
    Job("4k-randread-base-qd1", "fio", allocated=False, backing=True, iodepth=1),
    Job("sparse-randread", "sparse"),
    Job("discard", "discard"),
    Job("merge-depth0", "merge", depth=0),
    Job("merge-depth1", "merge", depth=1),
    Job("merge-reads", "merge-reads"),
    Job("status-under-fio", "status"),
]


@dataclass
class Result:
    """One job on one peer. rate() is what the ratios compare."""
    iops: float = None
    mbps: float = None
    secs: float = None       # timed jobs: wall time
    cpu_s: float = None      # guest CPU time (not idle) while it ran
    ios: int = None          # fio jobs: I/Os completed
    ctxt: int = None         # fio jobs: the guest's context switches in its I/O phase
    p50_us: float = None     # QD1: completion latency (fio's clat)
    p99_us: float = None
    lat50_us: float = None   # QD1: latency in all, submission included (fio's lat)
    lat99_us: float = None
    note: str = ""
    error: str = None
    rounds: list = None      # every round's rate (DMQ_BENCH_ROUNDS > 1)

    def rate(self):
        return self.iops if self.iops is not None else self.mbps

    def cpu_us_per_io(self):
        if self.cpu_s is None or not self.ios:
            return None
        return self.cpu_s * 1e6 / self.ios

    def ctxt_per_io(self):
        if self.ctxt is None or not self.ios:
            return None
        return self.ctxt / self.ios


class BenchError(Exception):
    pass


DM_IOCTL_SIZE = 312          # struct dm_ioctl
DM_TABLE_STATUS = (3 << 30) | (DM_IOCTL_SIZE << 16) | (0xfd << 8) | 12


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


def describe(e):
    """One line saying why a step failed."""
    if isinstance(e, subprocess.CalledProcessError):
        out = (e.stdout or "").strip().replace("\n", " | ")
        return f"`{e.cmd}` exited {e.returncode}: {out[-300:]}"
    return f"{type(e).__name__}: {e}"


def busy_of(cpu_line):
    """Seconds not idle in a /proc/stat "cpu" line (user, nice, system,
    irq, softirq, steal; guest time is inside user already)."""
    v = [int(x) for x in cpu_line.split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def busy_seconds():
    """CPU time the guest spent not idle so far, all CPUs."""
    with open("/proc/stat") as f:
        return busy_of(f.readline())


def timed(fn, *args):
    """Runs FN(*ARGS); returns (its value, wall seconds, guest CPU seconds)."""
    c0, t0 = busy_seconds(), time.monotonic()
    value = fn(*args)
    return value, time.monotonic() - t0, busy_seconds() - c0


def cluster_bytes():
    units = {"k": 1 << 10, "m": 1 << 20}
    c = CLUSTER.lower()
    return int(c[:-1]) * units[c[-1]] if c[-1] in units else int(c)


def fio_cmd(dev, job, size):
    # exec_prerun/postrun: fio saves their output in b.prerun.txt and
    # b.postrun.txt in its directory (the last job's, with numjobs 2).
    # A copy-on-write job writes each cluster once, at its start, in random
    # order (fio's random map), so that its writes are first writes until
    # every cluster had one. Reads through a top read anywhere.
    cow = job.backing and job.rw != "randread"
    spread = f"--blockalign={CLUSTER}" if cow else "--norandommap"
    # At QD1 also the latency in all: a target may do the I/O's work in the
    # submitting system call (fio's slat), which clat alone leaves out.
    if job.iodepth == 1:
        spread += " --lat_percentiles=1"
    # O_DSYNC with direct AIO: block/fops.c sends each write as REQ_FUA
    # (no flush); a file gets the file system's O_DSYNC write.
    if job.fua:
        spread += " --sync=dsync"
    # fdatasync(2) after each write: on the device an empty REQ_PREFLUSH
    # bio (blkdev_fsync), on a file the file system's data sync.
    if job.fsync:
        spread += " --fdatasync=1"
    return (f"fio --name=b --filename={dev} --direct=1 --ioengine=libaio "
            f"--iodepth={job.iodepth} --numjobs={job.numjobs} --rw={job.rw} "
            f"--bs={job.bs} --runtime={RUNTIME} --time_based --size={size} "
            f"--randrepeat=0 {spread} --group_reporting --output-format=json "
            f"'--exec_prerun={STAT_LINES}' '--exec_postrun={STAT_LINES}'")


# The /proc/stat lines fio's exec_prerun and exec_postrun save: CPU time
# (all CPUs) and context switches.
STAT_LINES = 'grep -E "^(cpu|ctxt) " /proc/stat'


def io_phase_stat(d):
    """The guest's CPU seconds and context switches between fio's prerun
    and postrun snapshots in directory D (its I/O, without its start and
    exit); each None if not there."""
    def lines(path):
        with open(path) as f:
            return {ln.split()[0]: ln for ln in f if ln.strip()}
    try:
        pre, post = lines(f"{d}/b.prerun.txt"), lines(f"{d}/b.postrun.txt")
    except OSError:
        return None, None
    cpu = ctxt = None
    try:
        if "cpu" in pre and "cpu" in post:
            cpu = busy_of(post["cpu"]) - busy_of(pre["cpu"])
        if "ctxt" in pre and "ctxt" in post:
            ctxt = int(post["ctxt"].split()[1]) - int(pre["ctxt"].split()[1])
    except (IndexError, ValueError):
        pass
    return cpu, ctxt


def fast_bios(dev):
    """dm-qcow2's count of bios served without its worker (`fast_bios` in
    its status), or None for another device."""
    if dev != "/dev/mapper/bench":
        return None
    r = sh("dmsetup status bench", check=False)
    m = re.search(r"fast_bios=(\d+)", r.stdout)
    return int(m.group(1)) if m else None


def peer_of(dev):
    """Which peer serves DEV (for the names of profiles)."""
    for prefix, name in (("/dev/mapper/", "dm-qcow2"), ("/dev/loop", "loop"),
                         ("/dev/nbd", "qemu-nbd"), ("/dev/ublk", "rublk")):
        if dev.startswith(prefix):
            return name
    return "raw"


def perf_report(data, job, dev):
    """Saves a flat profile of perf record's DATA in OUT as
    perf-JOB-PEER-N.txt: a summary (samples by kind of task, and those in
    the code of the dm_qcow2 module), then by symbol over all tasks, then
    by task and symbol. Returns the summary."""
    n = 1
    while os.path.exists(f"{OUT}/perf-{job.name}-{peer_of(dev)}-{n}.txt"):
        n += 1
    out = f"{OUT}/perf-{job.name}-{peer_of(dev)}-{n}.txt"

    def rows(sort):
        r = sh(f"perf report -i {data} --stdio --no-children -q -g none --sort {sort} "
               "--percent-limit 0", check=False)
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) >= 2 and f[0].endswith("%"):
                try:
                    yield float(f[0][:-1]), f[1:]
                except ValueError:
                    pass
    # Tasks by kind: a kworker's name changes with what it runs, and one
    # created during the run keeps kthreadd's name in perf's view (its
    # samples are a worker's: the loop device's __memcpy, say).
    kinds = {}
    for pct, f in rows("comm"):
        comm = " ".join(f)
        kind = ("idle" if comm.startswith("swapper") else
                "kworker" if comm == "kthreadd" else
                re.sub(r"[/:].*", "", comm) if comm.startswith(("kworker", "ksoftirqd"))
                else comm)
        kinds[kind] = kinds.get(kind, 0) + pct
    with open("/proc/kallsyms") as k:
        module = {ln.split()[2] for ln in k if ln.rstrip().endswith("[dm_qcow2]")}
    own = sum(pct for pct, f in rows("sym") if f[-1] in module)
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:5]
    summary = (", ".join(f"{k} {v:.0f}%" for k, v in top) +
               f"; dm_qcow2's code {own:.1f}%")
    with open(out, "w") as f:
        f.write(f"# {job.name} on {peer_of(dev)}: cpu-clock samples of both vCPUs by task: "
                f"{summary}\n")
    sh(f"perf report -i {data} --stdio --no-children -g none --sort dso,sym --percent-limit 0.3 "
       f">> {out} 2>&1", check=False)
    sh(f"perf report -i {data} --stdio --no-children --sort comm,dso,sym "
       f"--percent-limit 0.3 -g none >> {out} 2>&1", check=False)
    if PERF == "g":
        sh(f"perf report -i {data} --stdio --no-children --sort sym --percent-limit 2 "
           f"-g caller,0.5,callee --max-stack 24 >> {out} 2>&1", check=False)
    return summary


def fio(dev, job, size):
    """fio on DEV as JOB says, SIZE (fio's syntax) of it: a Result."""
    d = tempfile.mkdtemp(prefix="dmq-fio.")
    f0 = fast_bios(dev)
    cmd = fio_cmd(dev, job, size)
    if PERF:
        g = "-g " if PERF == "g" else ""
        cmd = f"perf record -q -N -B -a {g}-e cpu-clock -F 999 -o {d}/perf.data -- {cmd}"
    try:
        r, _, cpu = timed(lambda: sh(cmd, check=False, cwd=d))
        phase_cpu, ctxt = io_phase_stat(d)
        cpu = phase_cpu or cpu
        profile = None
        if PERF:
            # A profile that fails leaves the run's figures standing.
            try:
                profile = perf_report(f"{d}/perf.data", job, dev)
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                profile = f"no profile ({describe(e)})"
    finally:
        shutil.rmtree(d, ignore_errors=True)
    f1 = fast_bios(dev)
    if r.returncode != 0:
        raise BenchError(f"fio exited {r.returncode}: {r.stdout[-300:]}")
    # raw_decode: perf record may print after fio's JSON.
    j = json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{"):])[0]
    # A mixed job's rate is its reads' and writes' together.
    sides = [j["jobs"][0][rw] for rw in ("read", "write")
             if rw in job.rw or job.rw.endswith("rw")]
    side = sides[0]
    res = Result(iops=sum(x["iops"] for x in sides),
                 mbps=sum(x["bw_bytes"] for x in sides) / 1e6,
                 cpu_s=cpu, ios=sum(x["total_ios"] for x in sides), ctxt=ctxt)
    if job.iodepth == 1:
        res.p50_us, res.p99_us = p50_p99_us(side["clat_ns"])
        res.lat50_us, res.lat99_us = p50_p99_us(side["lat_ns"])
    if f0 is not None and f1 is not None and res.ios:
        # Bios the fast path served (lanes, zeroes answered in map) per fio
        # I/O: 1.00 is all of them (a larger I/O may be more than one bio).
        res.note = f"fast_bios/IOs {(f1 - f0) / res.ios:.2f}"
    if profile:
        res.note = "; ".join(x for x in (res.note, f"perf: {profile}") if x)
    return res


def p50_p99_us(lat):
    """A fio latency block's p50 and p99 in microseconds (None if absent)."""
    pct = lat.get("percentile", {})
    return tuple(pct.get(k, 0) / 1e3 or None for k in ("50.000000", "99.000000"))


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


def make_image(path, allocated, mb=SIZE, backing=None):
    sh(f"rm -f {path}")
    b = f"-b {backing} -F qcow2 " if backing else ""
    sh(f"qemu-img create -q -f qcow2 -o cluster_size={CLUSTER} {b}{path} {mb}M")
    if allocated:
        sh(f"qemu-io -f qcow2 -c 'write -P 0x5a 0 {mb}M' {path}")


def make_raw(path, allocated, mb=SIZE):
    """The raw file, like the image: written in full for the jobs on an
    allocated image, sparse (as `qemu-img create -f raw` or `truncate`
    leave it) for first writes, which then allocate in the host file system
    for the raw file too."""
    if allocated:
        sh(f"rm -f {path}; dd if=/dev/zero of={path} bs=1M count={mb} status=none")
    else:
        sh(f"rm -f {path}; truncate -s {mb}M {path}")


def timed_result(mib, secs, cpu, note=""):
    """A timed job's Result: MIB handled in SECS."""
    return Result(secs=secs, mbps=mib * 1.048576 / max(secs, 1e-6), cpu_s=cpu, note=note)


def allocated_mb(path):
    return os.stat(path).st_blocks * 512 / (1 << 20)


def drop_caches():
    sh("sync; echo 3 > /proc/sys/vm/drop_caches", check=False)


class Peer:
    """A way to serve an image as a block device."""

    def __init__(self, name):
        self.name = name

    def up(self, img, block=False):
        raise NotImplementedError

    def down(self):
        pass


class Raw(Peer):
    """The raw file itself for fio; a loop device over it where a block
    device is needed (blkdiscard)."""

    loop = None

    def up(self, img, block=False):
        if not block:
            return img
        self.loop = sh(f"losetup -f --show {img}").stdout.strip()
        return self.loop

    def down(self):
        if self.loop:
            sh(f"losetup -d {self.loop}", check=False)
            self.loop = None


class Loop(Raw):
    """The kernel's own block device over the same raw file: a loop device
    with direct I/O (`losetup --direct-io=on`). What any block device
    stacked on a file costs here (bio, queue hop, kiocb), beside which the
    raw file (fio on the file itself, no block layer) is a ceiling."""

    def up(self, img, block=False):
        self.loop = sh(f"losetup -f --show --direct-io=on {img}").stdout.strip()
        return self.loop


class DmQcow2(Peer):
    below = ()  # the deltas under the image, base first (set by a job's prepare)

    def up(self, img, block=False):
        chain = " ".join([*self.below, img])
        sh(f"{ROOT}/selftests/dmq_open.py --rw bench {chain}")
        return "/dev/mapper/bench"

    def down(self):
        sh("dmsetup remove --retry bench", check=False)
        self.below = ()


class QemuNbd(Peer):
    def up(self, img, block=False):
        load_module("nbd", "nbds_max=2")
        # --discard=unmap: discards free the image's clusters (qemu-nbd
        # ignores them by default), as dm-qcow2 does.
        sh(f"qemu-nbd -c /dev/nbd0 -f qcow2 --cache=none --aio=native "
           f"--discard=unmap {img}")
        wait_for("/sys/block/nbd0/pid")
        return "/dev/nbd0"

    def down(self):
        sh("qemu-nbd -d /dev/nbd0", check=False)
        time.sleep(0.5)


class Rublk(Peer):
    def __init__(self, name, exe):
        super().__init__(name)
        self.exe = exe

    def up(self, img, block=False):
        load_module("ublk_drv")
        sh(f"{self.exe} add qcow2 --file {img}")
        wait_for("/dev/ublkb0")
        return "/dev/ublkb0"

    def down(self):
        sh(f"{self.exe} del -a", check=False)


def result_line(job_name, peer, r):
    if r.error:
        return f"{job_name:20} {peer:11} failed: {r.error}"
    parts = []
    if r.iops is not None:
        parts.append(f"{r.iops:10.0f} IOPS")
    if r.secs is not None:
        parts.append(f"{r.secs:8.2f} s")
    if r.mbps is not None:
        parts.append(f"{r.mbps:9.1f} MB/s")
    if r.p50_us is not None:
        parts.append(f"p50 {r.p50_us:.0f} us p99 {r.p99_us or 0:.0f} us")
    if r.lat50_us is not None:
        parts.append(f"in all p50 {r.lat50_us:.0f} us p99 {r.lat99_us or 0:.0f} us")
    if r.cpu_us_per_io() is not None:
        parts.append(f"CPU {r.cpu_us_per_io():.1f} us/IO")
    elif r.cpu_s is not None:
        parts.append(f"CPU {r.cpu_s:.2f} s")
    if r.ctxt_per_io() is not None:
        parts.append(f"{r.ctxt_per_io():.2f} cs/IO")
    if r.note:
        parts.append(r.note)
    return f"{job_name:20} {peer:11} " + ", ".join(parts)


def attempt(fn, *args):
    """FN(*ARGS) as a Result; a failure becomes a Result saying why."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- any failure is reported, the rest goes on
        return Result(error=describe(e))


def on_each_peer(job, peers, prepare, measure, block=False, finish=None, turns=True):
    """For each peer: PREPARE(img, peer) makes the file, the peer serves it
    (a block device if BLOCK), MEASURE(dev, img) gives the Result, the peer
    goes down, FINISH(img, result) may add to it. {peer name: Result}.
    ROUNDS times, the peers taking turns (all of a peer's rounds in a row
    unless TURNS), each peer's median round kept (see `median_round`)."""
    img = f"{WORK}/img"
    runs = {p.name: [] for p in peers}
    order = ([p for _ in range(ROUNDS) for p in peers] if turns
             else [p for p in peers for _ in range(ROUNDS)])
    for p in order:
        def one():
            try:
                prepare(img, p)
                # What qemu-io and dd wrote is still dirty in the page cache:
                # written back now, not range by range by the direct I/O of
                # the run (nor by the flusher, 30 s on).
                drop_caches()
                return measure(p.up(img, block), img)
            finally:
                p.down()
        r = attempt(one)
        if finish and not r.error:
            attempt(finish, img, r)
        runs[p.name].append(r)
        log(result_line(job.name, p.name, r))
    return {name: median_round(rs) for name, rs in runs.items()}


def median_round(rs):
    """The round of median rate (the lower middle one of an even count),
    with every round's rate in `rounds`; a failed round fails the peer."""
    bad = [r for r in rs if r.error]
    if bad:
        return bad[0]
    if len(rs) == 1:
        return rs[0]
    by_rate = sorted(rs, key=lambda r: r.rate() or 0)
    m = by_rate[(len(rs) - 1) // 2]
    m.rounds = [r.rate() for r in rs]
    return m


def run_fio_job(job, peers):
    """A fio job on each peer, on a fresh image each; first writes also on
    a written raw file ("raw-written")."""
    def prepare(img, p):
        if isinstance(p, Raw):
            make_raw(img, job.allocated or job.backing)
        elif job.backing:
            # qemu-nbd and rublk open the base from the top's header.
            base = f"{WORK}/base"
            make_image(base, True)
            make_image(img, False, backing=base)
            if isinstance(p, DmQcow2):
                p.below = (base,)
        else:
            make_image(img, job.allocated)
    res = on_each_peer(job, peers, prepare, lambda dev, img: fio(dev, job, f"{SIZE}M"))
    if job.backing:
        sh(f"rm -f {WORK}/base", check=False)
    if not job.allocated and not job.backing and any(type(p) is Raw for p in peers):
        # Against a written raw file (no allocation in the host file system
        # at all): the figure older tables compared with.
        def written():
            img = f"{WORK}/img"
            make_raw(img, True)
            drop_caches()
            return fio(img, job, f"{SIZE}M")
        res["raw-written"] = attempt(written)
        log(result_line(job.name, "raw-written", res["raw-written"]))
    return res


def touched_offsets():
    """SPARSE_TOUCH_MB of clusters of the SPARSE_GB image, at random (the
    same ones every run), in random order."""
    cs = cluster_bytes()
    total = (SPARSE_GB << 30) // cs
    n = min(total, (SPARSE_TOUCH_MB << 20) // cs)
    return [c * cs for c in random.Random(14).sample(range(total), n)]


def make_sparse_image(path, offsets):
    """A SPARSE_GB image with a cluster written at each offset (one
    qemu-io reading the writes from stdin)."""
    sh(f"rm -f {path}")
    sh(f"qemu-img create -q -f qcow2 -o cluster_size={CLUSTER} {path} {SPARSE_GB}G")
    cs = cluster_bytes()
    cmds = "".join(f"write -q -P 0x5a {off} {cs}\n" for off in offsets)
    sh(f"qemu-io -f qcow2 {path} >/dev/null", input=cmds)
    if allocated_mb(path) < len(offsets) * cs / (1 << 20):
        raise BenchError(f"qemu-io left only {allocated_mb(path):.0f} MiB in {path}")


def make_sparse_raw(path, offsets):
    sh(f"rm -f {path}; truncate -s {SPARSE_GB}G {path}")
    cs = cluster_bytes()
    data = b"\x5a" * cs
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_sparse_job(job, peers):
    """4k random reads over the whole sparse image; the qcow2 image is
    built once for all its peers (they only read it)."""
    offsets = touched_offsets()
    built = {"kind": None}

    def prepare(img, p):
        kind = "raw" if isinstance(p, Raw) else "qcow2"
        if built["kind"] == kind:
            return
        built["kind"] = None
        (make_sparse_raw if kind == "raw" else make_sparse_image)(img, offsets)
        built["kind"] = kind
    # The peers' rounds in a row: each image is built once.
    return on_each_peer(job, peers, prepare, lambda dev, img: fio(dev, job, f"{SPARSE_GB}G"),
                        turns=False)


def discard_device(dev, img):
    """A timed blkdiscard of all of DEV."""
    before = allocated_mb(img)
    _, secs, cpu = timed(sh, f"blkdiscard {dev}")
    return timed_result(DISCARD_MB, secs, cpu, f"file {before:.0f} MiB allocated before")


def note_allocated_after(img, r):
    r.note += f", {allocated_mb(img):.0f} MiB after"


def punch_raw_file():
    """`fallocate --punch-hole` over a written raw file, timed."""
    img = f"{WORK}/img"
    make_raw(img, True, DISCARD_MB)
    drop_caches()
    _, secs, cpu = timed(sh, f"fallocate --punch-hole --offset 0 --length {DISCARD_MB}MiB {img}")
    return timed_result(DISCARD_MB, secs, cpu, f"{allocated_mb(img):.0f} MiB allocated after")


def run_discard_job(job, peers):
    def prepare(img, p):
        if isinstance(p, Raw):
            make_raw(img, True, DISCARD_MB)
        else:
            make_image(img, True, DISCARD_MB)
    # raw is a loop device here already (see the job's description).
    peers = [p for p in peers if not isinstance(p, Loop)]
    res = on_each_peer(job, peers, prepare, discard_device, block=True,
                       finish=note_allocated_after)
    if any(type(p) is Raw for p in peers):
        res["raw-punch"] = attempt(punch_raw_file)
        log(result_line(job.name, "raw-punch", res["raw-punch"]))
    return res


def dm_message(name, msg, **kw):
    return sh(f"dmsetup message {name} 0 -- {msg}", **kw).stdout.strip()


def merge_chain(depth):
    """An empty base, the delta with MERGE_MB written, and at depth 1 an
    empty top above it; the specs for dmq_open.py (the base read-write:
    it receives the merge)."""
    base, delta, top = (f"{WORK}/{n}" for n in ("base", "delta", "top"))
    make_image(base, False, MERGE_MB)
    make_image(delta, True, MERGE_MB, backing=base)
    if depth == 0:
        return delta, [f"rw:{base}", f"rw:{delta}"]
    make_image(top, False, MERGE_MB, backing=delta)
    return delta, [f"rw:{base}", f"ro:{delta}", f"rw:{top}"]


def wait_merge_ready(efd):
    """Until progress says stage=ready: wakes on the eventfd (or every
    0.2 s without one) and asks for progress."""
    end = time.monotonic() + MERGE_TIMEOUT
    while True:
        p = dm_message("bench", "merge_backward progress")
        if "stage=ready" in p:
            return
        if "stage=copying" not in p:
            raise BenchError(f"merge_backward progress: {p}")
        if time.monotonic() > end:
            raise BenchError(f"no stage=ready after {MERGE_TIMEOUT} s: {p}")
        if efd is None:
            time.sleep(0.2)
        elif select.select([efd], [], [], 1.0)[0]:
            os.read(efd, 8)


def merge_backward(depth):
    """start (with an eventfd), wait for ready, complete."""
    efd = os.eventfd(0) if hasattr(os, "eventfd") else None
    try:
        fd_arg = -1 if efd is None else efd
        dm_message("bench", f"merge_backward start {fd_arg} {depth}",
                   pass_fds=() if efd is None else (efd,))
        wait_merge_ready(efd)
        dm_message("bench", "merge_backward complete")
    finally:
        if efd is not None:
            os.close(efd)


def merge_on_dm_qcow2(depth, specs):
    drop_caches()
    sh(f"{ROOT}/selftests/dmq_open.py --rw bench {' '.join(specs)}")
    try:
        _, secs, cpu = timed(merge_backward, depth)
        # "0 LEN qcow2 <nr_images> v<version> <cluster sectors>"
        left = sh("dmsetup table bench").stdout.split()[3]
    finally:
        dm_message("bench", "merge_backward cancel", check=False)
        sh("dmsetup remove --retry bench", check=False)
    return timed_result(MERGE_MB, secs, cpu, f"{len(specs)} images, {left} after")


def cp_delta(delta):
    """`cp --sparse=always` of the delta's file, and `sync` of the copy."""
    copy = f"{WORK}/copy"
    drop_caches()
    try:
        _, secs, cpu = timed(sh, f"cp --sparse=always {delta} {copy} && sync {copy}")
        size = allocated_mb(copy)
    finally:
        sh(f"rm -f {copy}", check=False)
    return timed_result(MERGE_MB, secs, cpu, f"{size:.0f} MiB allocated in the copy")


def run_merge_job(job, peers):
    """dm-qcow2 only: the merge of the delta, and cp of the same file."""
    if not any(isinstance(p, DmQcow2) for p in peers):
        log(f"{job.name}: dm-qcow2 not among the peers, skipped")
        return {}
    res = {}
    try:
        delta, specs = merge_chain(job.depth)
    except Exception as e:  # noqa: BLE001
        log(f"{job.name:20} failed: building the chain: {describe(e)}")
        return {"dm-qcow2": Result(error=describe(e))}
    res["cp"] = attempt(cp_delta, delta)
    log(result_line(job.name, "cp", res["cp"]))
    res["dm-qcow2"] = attempt(merge_on_dm_qcow2, job.depth, specs)
    log(result_line(job.name, "dm-qcow2", res["dm-qcow2"]))
    sh(f"rm -f {WORK}/base {WORK}/delta {WORK}/top", check=False)
    return res


def reads_done(dev):
    """Reads DEV (a /dev/mapper name) completed so far, and when."""
    name = os.path.basename(os.path.realpath(dev))
    with open(f"/sys/block/{name}/stat") as f:
        return int(f.read().split()[0]), time.monotonic()


def reads_rate(a, b):
    return (b[0] - a[0]) / max(b[1] - a[1], 1e-6)


def merge_with_reads(specs):
    """fio's random reads on the device: their rate for RUNTIME seconds
    alone, then during a backward merge at depth 0 (to stage=ready).
    {"alone": Result, "dm-qcow2": Result}."""
    drop_caches()
    dev = "/dev/mapper/bench"
    sh(f"{ROOT}/selftests/dmq_open.py --rw bench {' '.join(specs)}")
    reader, d = None, tempfile.mkdtemp(prefix="dmq-fio.")
    try:
        # Runs until stopped below (the merge's length is not known).
        cmd = fio_cmd(dev, Job("merge-reads", "fio"), f"{MERGE_MB}M").replace(
            f"--runtime={RUNTIME}", f"--runtime={MERGE_TIMEOUT}")
        reader = subprocess.Popen("exec " + cmd, shell=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, cwd=d)
        time.sleep(2)
        a = reads_done(dev)
        time.sleep(RUNTIME)
        b = reads_done(dev)
        _, secs, cpu = timed(merge_backward, 0)
        c = reads_done(dev)
        if reader.poll() is not None:
            raise BenchError(f"fio ended early ({reader.returncode})")
    finally:
        if reader:
            reader.terminate()
            reader.wait()
        shutil.rmtree(d, ignore_errors=True)
        dm_message("bench", "merge_backward cancel", check=False)
        sh("dmsetup remove --retry bench", check=False)
    return {"alone": Result(iops=reads_rate(a, b)),
            "dm-qcow2": Result(iops=reads_rate(b, c), secs=secs, cpu_s=cpu,
                               note=f"merge of {MERGE_MB} MiB under reads: {secs:.2f} s")}


def run_merge_reads_job(job, peers):
    """dm-qcow2 only: reads during a merge against reads alone."""
    if not any(isinstance(p, DmQcow2) for p in peers):
        log(f"{job.name}: dm-qcow2 not among the peers, skipped")
        return {}
    try:
        _, specs = merge_chain(0)
        res = merge_with_reads(specs)
    except Exception as e:  # noqa: BLE001
        res = {"dm-qcow2": Result(error=describe(e))}
    for col, r in res.items():
        log(result_line(job.name, col, r))
    sh(f"rm -f {WORK}/base {WORK}/delta {WORK}/top", check=False)
    return res


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else None


STATUS_KINDS = (("alone", None), ("status poller on it", "bench"),
                ("status poller on dm-zero", "bench-zero"))


def fio_beside_poller(job, dev, target):
    """fio on DEV, with the status poller on dm device TARGET if any: IOPS
    (None if fio failed) and the poller's calls."""
    poller = None
    if target:
        poller = subprocess.Popen([sys.executable, __file__, "--status-loop", target,
                                   str(RUNTIME + 4)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
    r = attempt(fio, dev, job, f"{SIZE}M")
    calls = poller.communicate()[0].strip() if poller else "-"
    return (None if r.error else r.iops), calls


def status_rounds(job):
    """STATUS_ROUNDS rounds of the three kinds: {kind: [IOPS...]}."""
    img = f"{WORK}/img"
    make_image(img, True)
    drop_caches()
    p = DmQcow2("dm-qcow2")
    runs = {what: [] for what, _ in STATUS_KINDS}
    try:
        dev = p.up(img)
        sh(f"dmsetup create bench-zero --table '0 {SIZE * 2048} zero'")
        for _ in range(STATUS_ROUNDS):
            for what, target in STATUS_KINDS:
                iops, calls = fio_beside_poller(job, dev, target)
                if iops:
                    runs[what].append(iops)
                log(f"status-under-fio {what:26} " + (f"{iops:10.0f} IOPS" if iops else "failed") +
                    f", status calls {calls}")
    finally:
        sh("dmsetup remove --retry bench-zero", check=False)
        p.down()
    return runs


def status_under_fio(job):
    """fio on dm-qcow2 alone, beside a status poller on it, beside the same
    poller on a dm-zero device, in STATUS_ROUNDS alternating rounds (a slow
    drift of the host's load falls on all three alike): lines for the table
    with the median of each."""
    runs = status_rounds(job)
    med = {what: median(v) for what, v in runs.items()}
    lines = ["", f"status under fio: {job.bs} {job.rw} on dm-qcow2 (an allocated image), "
             f"median of {STATUS_ROUNDS} alternating rounds; the poller does {STATUS_RATE} "
             "DM_TABLE_STATUS ioctls a second"]
    for what, _ in STATUS_KINDS:
        m = med[what]
        lines.append(f"  {what:26} " + (f"{m:10.0f} IOPS" if m else "    failed") +
                     "   (" + ", ".join(f"{x:.0f}" for x in runs[what]) + ")")
    on, zero = med["status poller on it"], med["status poller on dm-zero"]
    if on and zero:
        lines.append(f"  poller on dm-qcow2 / poller on dm-zero: {on / zero:.3f}x "
                     "(what the target's status costs fio; the poller's own CPU is in both)")
    return lines


def work_mb():
    """The tmpfs's limit: the largest set of files a job keeps at once."""
    return max(SIZE * 3, DISCARD_MB * 2, MERGE_MB * 3, SPARSE_TOUCH_MB * 2) + 256


def mount_work():
    os.makedirs(WORK, exist_ok=True)
    mb = work_mb()
    if FS == "tmpfs":
        sh(f"mountpoint -q {WORK} || mount -t tmpfs -o size={mb}M tmpfs {WORK}")
        return
    back = WORK + ".backing"
    os.makedirs(back, exist_ok=True)
    sh(f"mountpoint -q {back} || mount -t tmpfs -o size={mb + 256}M tmpfs {back}")
    sh(f"truncate -s {mb}M {back}/disk")
    loop = sh(f"losetup -f --show {back}/disk").stdout.strip()
    sh(f"mkfs.ext4 -q -F {loop}")
    sh(f"mount -t ext4 {loop} {WORK}")


def pick_peers():
    try:
        sh(f"grep -q '^dm_qcow2 ' /proc/modules || insmod {MODULE}")
    except subprocess.CalledProcessError as e:
        log(f"loading dm-qcow2 failed: {describe(e)}")
    peers = [Raw("raw"), Loop("loop"), DmQcow2("dm-qcow2"), QemuNbd("qemu-nbd")]
    rublk = shutil.which("rublk") or "/root/.cargo/bin/rublk"
    if os.access(rublk, os.X_OK):
        peers.append(Rublk("rublk", rublk))
    else:
        log("rublk not installed: skipping that peer (make bench-deps)")
    if os.environ.get("DMQ_BENCH_PEERS"):
        want = os.environ["DMQ_BENCH_PEERS"].split(",")
        peers = [p for p in peers if p.name in want]
    return peers


def pick_jobs():
    if not os.environ.get("DMQ_BENCH_JOBS"):
        return JOBS
    want = os.environ["DMQ_BENCH_JOBS"].split(",")
    unknown = set(want) - {j.name for j in JOBS}
    if unknown:
        log(f"unknown jobs {', '.join(sorted(unknown))} (known: {', '.join(j.name for j in JOBS)})")
    return [j for j in JOBS if j.name in want]


RUNNERS = {"fio": run_fio_job, "sparse": run_sparse_job,
           "discard": run_discard_job, "merge": run_merge_job,
           "merge-reads": run_merge_reads_job}


def run_jobs(jobs, peers):
    """{job name: {column: Result}} and the status job's lines."""
    results, extra = {}, []
    for job in jobs:
        try:
            if job.kind == "status":
                extra += status_under_fio(job)
            else:
                results[job.name] = RUNNERS[job.kind](job, peers)
        except Exception as e:  # noqa: BLE001 -- the other jobs go on
            log(f"{job.name:20} failed: {describe(e)}")
            extra.append(f"{job.name}: failed: {describe(e)}")
    return results, extra


def paired(dm, r):
    """dm-qcow2's rate over R's in each round (round i against round i), or
    None if there were not several rounds of both."""
    if not dm.rounds or not r.rounds or len(dm.rounds) != len(r.rounds):
        return None
    if not all(dm.rounds) or not all(r.rounds):
        return None
    return [a / b for a, b in zip(dm.rounds, r.rounds)]


def ratio(dm, r):
    """dm-qcow2's rate over R's, as text ("-" where either is missing): the
    median of the rounds' paired ratios when there were several."""
    if not dm or not r or dm.error or r.error:
        return "-"
    pr = paired(dm, r)
    if pr:
        return f"{median(pr):.2f}x"
    a, b = (dm.iops, r.iops) if dm.iops is not None and r.iops is not None else (dm.mbps, r.mbps)
    return f"{a / b:.2f}x" if a and b else "-"


def spread(dm, r):
    """The lowest and highest paired ratio of the rounds, as text."""
    if not dm or not r or dm.error or r.error:
        return "-"
    pr = paired(dm, r)
    return f"{min(pr):.2f}-{max(pr):.2f}" if pr else "-"


def num(v, fmt):
    return "-" if v is None else format(v, fmt)


DETAIL_HDR = (f"{'job':20} {'column':11} {'IOPS':>9} {'MB/s':>8} {'time s':>7} "
              f"{'p50 us':>7} {'p99 us':>7} {'lat p50':>7} {'lat p99':>7} "
              f"{'CPU us/IO':>9} {'CPU s':>6} {'cs/IO':>6} {'dm/this':>8}")


def detail_row(job_name, col, r, dm):
    if r.error:
        return f"{job_name:20} {col:11} failed: {r.error}"
    row = (f"{job_name:20} {col:11} {num(r.iops, '.0f'):>9} {num(r.mbps, '.1f'):>8} "
           f"{num(r.secs, '.2f'):>7} {num(r.p50_us, '.0f'):>7} {num(r.p99_us, '.0f'):>7} "
           f"{num(r.lat50_us, '.0f'):>7} {num(r.lat99_us, '.0f'):>7} "
           f"{num(r.cpu_us_per_io(), '.1f'):>9} {num(r.cpu_s, '.2f'):>6} "
           f"{num(r.ctxt_per_io(), '.2f'):>6} "
           f"{ratio(dm, r) if col != 'dm-qcow2' else '':>8}")
    return row + (f"  {r.note}" if r.note else "")


def cpu_ratio(dm, r):
    """dm-qcow2's CPU per I/O (timed jobs: CPU seconds) over R's, as text."""
    if not dm or not r or dm.error or r.error:
        return "-"
    a, b = dm.cpu_us_per_io(), r.cpu_us_per_io()
    if a is None or b is None:
        a, b = dm.cpu_s, r.cpu_s
    return f"{a / b:.2f}x" if a and b else "-"


def summary_lines(results, cols, of=ratio):
    """Jobs by dm-qcow2's ratio to each column (OF: ratio or cpu_ratio)."""
    lines = [f"{'job':20} " + " ".join(f"{'dm/' + c:>13}" for c in cols)]
    for name, res in results.items():
        dm = res.get("dm-qcow2")
        lines.append(f"{name:20} " + " ".join(f"{of(dm, res.get(c)):>13}" for c in cols))
    return lines


def header(results):
    """What ran: fio's settings and the sizes of the jobs that ran."""
    h = (f"fio: libaio, iodepth 32 (1 for -qd1), numjobs 1 (2 for -2jobs), {RUNTIME}s a run, "
         f"{SIZE} MiB, cluster {CLUSTER}, {FS} in a TCG VM (2 vCPUs)")
    if ROUNDS > 1:
        h += f"; {ROUNDS} rounds of the fio, sparse and discard jobs (medians)"
    if "sparse-randread" in results:
        h += f"; sparse-randread {SPARSE_GB} GiB with {SPARSE_TOUCH_MB} MiB written"
    if "discard" in results:
        h += f"; discard {DISCARD_MB} MiB"
    if any(n.startswith("merge-") for n in results):
        h += f"; merges {MERGE_MB} MiB"
    return h


def table(peers, results):
    lines = [header(results), "", DETAIL_HDR]
    for name, res in results.items():
        for col, r in res.items():
            lines.append(detail_row(name, col, r, res.get("dm-qcow2")))
    cols = [p.name for p in peers if p.name != "dm-qcow2"]
    cols += [c for c in ("raw-written", "raw-punch", "cp", "alone")
             if any(c in res for res in results.values())]
    lines += ["", "dm-qcow2's rate (IOPS, or MB/s for the timed jobs) divided by the column's:"]
    lines += summary_lines(results, cols)
    if ROUNDS > 1:
        lines += ["", f"Lowest and highest of the {ROUNDS} rounds' paired ratios "
                  "(the ratios above are their medians):"]
        lines += summary_lines(results, cols, spread)
    lines += ["", "dm-qcow2's CPU per I/O (timed jobs: CPU seconds) divided by the column's:"]
    lines += summary_lines(results, cols, cpu_ratio)
    lines += ["", *LEGEND]
    return lines


LEGEND = [
    "CPU: guest CPU time not idle (/proc/stat, both vCPUs, every process: fio, the",
    "  target's workers, qemu-nbd/rublk) between fio's exec_prerun and exec_postrun",
    "  snapshots (its I/O phase), per I/O; for the timed jobs (discard, merge-*) while",
    "  they ran (time s; MB/s = image size / time).",
    "cs/IO: the guest's context switches (/proc/stat ctxt, both vCPUs) in the same",
    "  phase, per I/O: the hand-offs between tasks (fio, workers, servers) an I/O costs.",
    "loop: losetup --direct-io=on over the same raw file (the kernel's own block",
    "  device on a file; the raw file is fio on the file, no block layer at all).",
    "raw: a written file for the jobs on an allocated image, a sparse one for first",
    "  writes (raw-written: a written one); discard: blkdiscard of a loop device over",
    "  the written raw file (raw-punch: fallocate --punch-hole on the file itself).",
    "merge-*: dm-qcow2 merge_backward start..ready..complete (its fsyncs included);",
    "  cp: cp --sparse=always of the delta's file + sync of the copy, same file system,",
    "  page cache dropped before each. qemu-nbd: --cache=none --aio=native --discard=unmap.",
    "p50/p99 (QD1 jobs): completion latency, fio's clat (from the I/O's submission to",
    "  its completion); lat p50/p99: latency in all, fio's lat (the submitting system",
    "  call's time too: a target that starts the I/O on the submitter's CPU spends it there).",
]


def write_outputs(peers, results, extra):
    text = "\n".join(table(peers, results) + extra)
    print(text)
    with open(f"{OUT}/bench.txt", "w") as f:
        f.write(text + "\n")
    data = {"fs": FS, "runtime": RUNTIME, "size_mb": SIZE, "cluster": CLUSTER, "rounds": ROUNDS,
            "peers": [p.name for p in peers],
            "jobs": {name: {col: asdict(r) for col, r in res.items()}
                     for name, res in results.items()}}
    with open(f"{OUT}/bench.json", "w") as f:
        json.dump(data, f, indent=1)


def main():
    global PERF
    mount_work()
    peers = pick_peers()
    jobs = pick_jobs()
    if PERF and not shutil.which("perf"):
        log("DMQ_BENCH_PERF: no perf (make bench-deps installs linux-perf): no profiles")
        PERF = None
    results, extra = run_jobs(jobs, peers)
    write_outputs(peers, results, extra)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--status-loop":
        status_loop(sys.argv[2], float(sys.argv[3]))
    else:
        main()
