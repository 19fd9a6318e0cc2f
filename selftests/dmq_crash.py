#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Workload and crash-state checker of qcow2_crash.sh (see there).

usage:
  dmq_crash.py workload STATE --mnt DIR --lw NAME --prefix PFX [options]
  dmq_crash.py check STATE LOG --work DIR --prefix PFX [options]

`workload` maps the chain base<-mid<-top (C) and the internal-snapshot
image grow.qcow2 (G) that the shell put on the file system under test,
runs epochs of concurrent O_DIRECT writes (some of them FUA: Linux AIO
with RWF_DSYNC, which sends REQ_FUA and no flush, each followed by a
dm-log-writes mark of its own once it completed),
write-zeroes (BLKZEROOUT) and discards (BLKDISCARD) on both devices, ends
each epoch with an fsync of the devices and a dm-log-writes mark (every
sixth also with a sync run: operations at queue depth 1 each followed by
fdatasync, or FUA writes, each with a mark of its own; some of those empty
flushes must have been committed by an express lane and some FUA writes
served by the fast path, status express_flushes and fast_fua), merges mid into base (merge_backward at
depth 1) while writing, takes a snapshot by reload (a new overlay over.qcow2)
and writes on. A third table (F, fs.qcow2) holds an ext4 (default mkfs) on
which each epoch writes a file and fsyncs it: its journal commits are
REQ_PREFLUSH|REQ_FUA writes. Every operation that completed is recorded in STATE (JSON:
offset, length, kind, the seed of its data, its sha256) with the number of
operations acknowledged and fsync'ed at each mark. At the end the live
devices must read exactly the model.

`check` builds crash states from the log with dmq_replay.py: the prefix at
every FLUSH/FUA entry and every mark (sampled when there are more than half
the budget), and random entries with a seeded random subset of the writes
since the last FLUSH/FUA. Each state is a copy of the data device; on it:
mount (replays the journal), umount, fsck -fn must be clean; mounted
read-only, `qemu-img check` of every image must find no corruption (leaks
are allowed), fresh read-only tables over the chain must read, per 512-byte
sector, the data of the operations fsync'ed before the last mark and of the
FUA writes whose own mark the state includes, or the data of one of the
operations issued before the next mark (a write not yet flushed may or may
not be there), or what was there before; the images
below the top must be unchanged (byte for byte, or, for the two deltas of
the merge, through the base<-mid view: mid's clusters move into base), and the internal snapshot of
grow.qcow2 must hold its data. Through fresh tables (not with --reader qemu)
the ext4 in fs.qcow2 must mount (its journal replayed into an overlay),
hold every file fsync'ed before the last mark, and fsck clean.
"""

import argparse
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import dmq_replay  # noqa: E402

HERE = os.path.dirname(os.path.realpath(__file__))
PYTHON = os.environ.get("PYTHON", sys.executable or "python3")
DMSETUP = os.environ.get("DMSETUP", "dmsetup")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
SECTOR = 512
MIB = 1 << 20
BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKZEROOUT = 0x127f  # _IO(0x12, 127)
MARK_PREFIX = "dmq-"
FUA_MARK = MARK_PREFIX + "fua-"  # + the FUA write's number
FUA_SHARE = 0.15  # of the writes
SYNC_RUN = 40     # operations of a sync run (Workload.sync_run)
SYNC_EVERY = 6    # epochs: a sync run after the 1st, the 7th, ...

C_SIZE = 32 * MIB       # virtual size of base, mid, top, over
C_CLUSTER = 64 * 1024
G_REGION = 16 * MIB     # the part of grow.qcow2 the workload writes
G_CLUSTER = 4096
SNAP_DATA = 4 * MIB     # grow.qcow2's snapshot s1: 0x11 over 0..4M
F_FILE_MAX = 256 * 1024  # the largest file written into F's ext4


class Fail(Exception):
    pass


def log(*a):
    print(*a, flush=True)


def run(cmd, check=True, **kw):
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, **kw)
    if check and res.returncode != 0:
        raise Fail("%s failed (rc=%d): %s" % (" ".join(cmd), res.returncode,
                                              res.stdout.strip()[-2000:]))
    return res


def op_data(op):
    """The bytes an operation leaves (zeroes for write-zeroes/discard)."""
    if op["kind"] == "w":
        return random.Random(op["seed"]).randbytes(op["len"])
    return bytes(op["len"])


def sha(b):
    return hashlib.sha256(b).hexdigest()


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(MIB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_direct(path, length, off=0):
    """length bytes from off with O_DIRECT, in 1 MiB reads."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MIB)
    out = bytearray()
    try:
        pos = off
        while pos < off + length:
            n = min(MIB, off + length - pos)
            got = os.preadv(fd, [memoryview(buf)[:n]], pos)
            if got != n:
                raise Fail("%s: short read at %d (%d of %d)" % (path, pos, got, n))
            out += buf[:n]
            pos += n
    finally:
        buf.close()
        os.close(fd)
    return out


# ------------------------------------------------------------ devices

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_CTL_GET_FREE = 0x4C82
MS_RDONLY = 1
_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                            use_errno=True)
    return _libc


# Linux AIO system calls (io_setup, io_destroy, io_getevents, io_submit)
AIO_NR = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PWRITE = 1


def fua_write(fd, buf, length, off):
    """Writes length bytes of the mmap buf at off with REQ_FUA and no
    flush: an asynchronous (Linux AIO) O_DIRECT write with RWF_DSYNC, for
    which block/fops.c sets REQ_FUA and nothing more (a synchronous one
    gets an fsync of the device after it, generic_write_sync: a flush
    that would make any write durable). Returns the bytes written."""
    import ctypes
    lc = libc()
    setup, destroy, getevents, submit = AIO_NR[os.uname().machine]
    ctx = ctypes.c_ulong(0)
    if lc.syscall(setup, 1, ctypes.byref(ctx)) != 0:
        raise OSError(ctypes.get_errno(), "io_setup")
    data = ctypes.c_char.from_buffer(buf)
    try:
        # struct iocb (little endian): data, key, rw_flags, opcode,
        # reqprio, fildes, buf, nbytes, offset, reserved2, flags, resfd
        cb = ctypes.create_string_buffer(struct.pack(
            "<QIiHhIQQqQII", 0, 0, os.RWF_DSYNC, IOCB_CMD_PWRITE, 0, fd,
            ctypes.addressof(data), length, off, 0, 0, 0), 64)
        cbs = (ctypes.c_void_p * 1)(ctypes.addressof(cb))
        if lc.syscall(submit, ctx, 1, cbs) != 1:
            raise OSError(ctypes.get_errno(), "io_submit")
        ev = ctypes.create_string_buffer(32)
        while True:
            n = lc.syscall(getevents, ctx, 1, 1, ev, None)
            if n == 1:
                break
            if n < 0 and ctypes.get_errno() != errno.EINTR:
                raise OSError(ctypes.get_errno(), "io_getevents")
        res = struct.unpack("<QQqq", ev.raw)[2]
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res
    finally:
        del data
        lc.syscall(destroy, ctx)


class Loop:
    """A loop device over a file, by ioctl (a crash state costs less
    without a losetup process under TCG)."""

    def __init__(self, path):
        # Another process (the other file system's checker, losetup) may
        # take the free device between GET_FREE and SET_FD (EBUSY), or
        # have it half torn down (ENXIO): take the next free one, as
        # losetup does.
        for attempt in range(50):
            ctl = os.open("/dev/loop-control", os.O_RDWR)
            try:
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            self.dev = "/dev/loop%d" % n
            try:
                self.fd = os.open(self.dev, os.O_RDWR)
            except OSError as e:
                if e.errno != errno.ENXIO or attempt == 49:
                    raise
                time.sleep(0.01)
                continue
            f = os.open(path, os.O_RDWR)
            try:
                fcntl.ioctl(self.fd, LOOP_SET_FD, f)
                return
            except OSError as e:
                os.close(self.fd)
                if e.errno != errno.EBUSY or attempt == 49:
                    raise
            finally:
                os.close(f)
            time.sleep(0.01)

    def close(self):
        try:
            fcntl.ioctl(self.fd, LOOP_CLR_FD, 0)
        finally:
            os.close(self.fd)


def mount(dev, mnt, fs, ro=False):
    """mount(2); returns None or the error text."""
    import ctypes
    r = libc().mount(dev.encode(), mnt.encode(), fs.encode(),
                     ctypes.c_ulong(MS_RDONLY if ro else 0), None)
    if r != 0:
        e = ctypes.get_errno()
        return "mount %s%s: %s" % ("-o ro " if ro else "", dev, os.strerror(e))
    return None


def umount(mnt):
    import ctypes
    if libc().umount2(mnt.encode(), 0) != 0:
        return "umount %s: %s" % (mnt, os.strerror(ctypes.get_errno()))
    return None

def dev_node(name):
    path = "/dev/mapper/" + name
    for i in range(40):
        if os.path.exists(path):
            return path
        if i == 3:
            run([DMSETUP, "mknodes", name], check=False)
        time.sleep(0.1)
    raise Fail("no device node for %s" % name)


def dm_map(name, specs, rw=False, dmsetup=None):
    cmd = [PYTHON, os.path.join(HERE, "dmq_open.py"), name] + specs
    if rw:
        cmd.append("--rw")
    if dmsetup:
        cmd += ["--dmsetup", dmsetup]
    res = run(cmd, check=False)
    if res.returncode != 0:
        raise Fail("mapping %s (%s) failed (rc=%d): %s" %
                   (name, " ".join(specs), res.returncode, res.stdout.strip()))
    return dev_node(name)


def dm_map_ro(name, paths):
    """A read-only table over paths (base first), without dmq_open.py's
    start-up cost (the checker maps three tables per crash state)."""
    fds = []
    try:
        for p in paths:
            fds.append(os.open(p, os.O_RDONLY | os.O_DIRECT))
        # the size from a buffered open: a 32-byte read on an O_DIRECT
        # descriptor is EINVAL
        with open(paths[-1], "rb") as f:
            hdr = f.read(32)
        size = struct.unpack_from(">Q", hdr, 24)[0]
        table = "0 %d qcow2 %s" % (size // SECTOR, " ".join(map(str, fds)))
        res = subprocess.run([DMSETUP, "create", name, "--readonly", "--table",
                              table], pass_fds=fds, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    finally:
        for fd in fds:
            os.close(fd)
    if res.returncode != 0:
        raise Fail("mapping %s (%s) failed (rc=%d): %s" % (
            name, " ".join(os.path.basename(p) for p in paths),
            res.returncode, res.stdout.strip()))
    return dev_node(name)


def dm_remove(name):
    res = run([DMSETUP, "remove", "--retry", name], check=False)
    if res.returncode != 0:
        raise Fail("dmsetup remove %s: %s" % (name, res.stdout.strip()))


def dm_msg(name, *words):
    return run([DMSETUP, "message", name, "0", "--"] + list(words)).stdout.strip()


def dmesg_tail(n=15):
    res = run(["dmesg"], check=False)
    return "\n".join(res.stdout.splitlines()[-n:])


# ------------------------------------------------------------ workload

class Workload:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.ops = []
        self.marks = []
        self.lock = threading.Lock()
        self.mnt = args.mnt
        self.cname = args.prefix + "c"
        self.gname = args.prefix + "g"
        self.fname = args.prefix + "f"
        self.fmnt = os.path.join(args.workdir, "fmnt")
        self.files = []
        self.fds = {}
        self.phase = "pre"
        self.model = {}
        self.info = {}
        self.nfua = 0
        self.nsync = 0

    def img(self, name):
        return os.path.join(self.mnt, name)

    def mark(self, name):
        full = MARK_PREFIX + name
        run([DMSETUP, "message", self.a.lw, "0", "mark", full])
        self.marks.append({"name": full, "nops": len(self.ops),
                           "nfiles": len(self.files),
                           "phase": self.phase, "time": time.time()})

    def write_file(self, f, errors):
        """The new file f in F's ext4, fsync'ed (a journal commit: a
        REQ_PREFLUSH|REQ_FUA record after the blocks it commits)."""
        try:
            data = random.Random(f["seed"]).randbytes(f["len"])
            fd = os.open(os.path.join(self.fmnt, f["name"]),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            # the directory entry too
            d = os.open(self.fmnt, os.O_RDONLY)
            try:
                os.fsync(d)
            finally:
                os.close(d)
        except OSError as e:
            errors.append("file %s: %s" % (f["name"], e))
            return
        f["sha256"] = sha(data)
        with self.lock:
            self.files.append(f)

    def open_devs(self):
        for d, name in (("c", self.cname), ("g", self.gname)):
            self.fds[d] = os.open(dev_node(name), os.O_RDWR | os.O_DIRECT)

    def close_devs(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def fsync(self):
        for fd in self.fds.values():
            os.fsync(fd)

    def pick(self, dev, busy):
        """A random operation on dev not overlapping busy (same epoch)."""
        r = self.rng
        for _ in range(50):
            k = r.random()
            if dev == "c":
                size = C_SIZE
                if k < 0.70:
                    kind = "w"
                    ln = r.randrange(1, 385) * SECTOR
                    off = r.randrange(0, (size - ln) // SECTOR + 1) * SECTOR
                elif k < 0.85:
                    kind = "z"
                    ln = r.randrange(1, 257) * SECTOR
                    off = r.randrange(0, (size - ln) // SECTOR + 1) * SECTOR
                else:
                    kind = "d"
                    n = r.randrange(1, 5)
                    ln = n * C_CLUSTER
                    off = r.randrange(0, size // C_CLUSTER - n + 1) * C_CLUSTER
            else:
                size = G_REGION
                kind = "w" if k < 0.92 else "z"
                ln = r.randrange(1, 513) * SECTOR
                off = r.randrange(0, (size - ln) // SECTOR + 1) * SECTOR
            if all(off + ln <= b or b + bl <= off for b, bl in busy):
                busy.append((off, ln))
                op = {"dev": dev, "kind": kind, "off": off, "len": ln,
                      "seed": r.getrandbits(48)}
                if kind == "w" and r.random() < FUA_SHARE:
                    op["fua"] = True
                return op
        return None

    def pick_fua(self, dev, busy):
        """A FUA write over the range of an earlier write on dev, not
        overlapping busy: mostly in place (clusters the top owns), where
        the write's data is all the FUA bio has to make durable."""
        r = self.rng
        done = [op for op in self.ops if op["dev"] == dev and op["kind"] == "w"]
        for _ in range(20 if done else 0):
            old = r.choice(done)
            off, ln = old["off"], old["len"]
            if all(off + ln <= b or b + bl <= off for b, bl in busy):
                busy.append((off, ln))
                return {"dev": dev, "kind": "w", "off": off, "len": ln,
                        "seed": r.getrandbits(48), "fua": True}
        return None

    def do_op(self, op, errors):
        fd = self.fds[op["dev"]]
        try:
            if op["kind"] == "w":
                data = op_data(op)
                buf = mmap.mmap(-1, (len(data) + 4095) & ~4095)
                buf[:len(data)] = data
                if op.get("fua"):
                    n = fua_write(fd, buf, len(data), op["off"])
                else:
                    n = os.pwritev(fd, [memoryview(buf)[:len(data)]], op["off"])
                buf.close()
                if n != len(data):
                    raise OSError("short write %d of %d" % (n, len(data)))
            else:
                req = BLKZEROOUT if op["kind"] == "z" else BLKDISCARD
                fcntl.ioctl(fd, req, struct.pack("QQ", op["off"], op["len"]))
            if op.get("sync"):
                # a guest's fsync of what it wrote: an empty flush
                os.fdatasync(fd)
            if op.get("fua") or op.get("sync"):
                # durable now: whatever the log holds after this mark
                # must show it
                with self.lock:
                    self.nfua += 1
                    op["fua_mark"] = FUA_MARK + str(self.nfua)
                run([DMSETUP, "message", self.a.lw, "0", "mark", op["fua_mark"]])
        except Exception as e:  # noqa: BLE001 (a thread must report it)
            errors.append("%s: %s" % (op, e))
            return
        op["sha256"] = sha(op_data(op))
        with self.lock:
            op["id"] = len(self.ops)
            self.ops.append(op)
            self.apply_model(op)

    def apply_model(self, op):
        m = self.model[op["dev"]]
        m[op["off"]:op["off"] + op["len"]] = op_data(op)

    def epoch(self, nops):
        busy = {"c": [], "g": []}
        batch = []
        for _ in range(nops):
            dev = "c" if self.rng.random() < 0.65 else "g"
            if self.rng.random() < FUA_SHARE:
                op = self.pick_fua(dev, busy[dev])
            else:
                op = self.pick(dev, busy[dev])
            if op:
                batch.append(op)
        errors = []
        threads = [threading.Thread(target=self.do_op, args=(op, errors))
                   for op in batch]
        f = {"name": "f%d" % len(self.files), "seed": self.rng.getrandbits(48),
             "len": self.rng.randrange(1, F_FILE_MAX + 1)}
        threads.append(threading.Thread(target=self.write_file, args=(f, errors)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise Fail("I/O failed during the workload:\n" + "\n".join(errors) +
                       "\n" + dmesg_tail())
        self.fsync()

    def sync_run(self, dev):
        """SYNC_RUN operations on dev at queue depth 1 (mostly writes over
        earlier ones: clusters the top owns), each followed by fdatasync
        and a mark of its own (durable from there), as a guest that syncs
        every write, or (half the writes) a FUA write and its mark. Each
        fdatasync is an empty flush that finds the table idle: once
        STREAM_IDLE idle bios came in a row, the target's express lane
        commits it itself (status express_flushes). A FUA write in place
        while the top's metadata is durable (after the last sync) takes the
        fast path: an fsync of the image once its data landed (status
        fast_fua)."""
        r = self.rng
        for _ in range(SYNC_RUN):
            busy = []
            op = self.pick_fua(dev, busy) if r.random() < 0.8 else None
            op = op or self.pick(dev, busy)
            if not op:
                continue
            if op["kind"] == "w" and r.random() < 0.5:
                op["fua"] = True
            else:
                op.pop("fua", None)
                op["sync"] = True
            errors = []
            self.do_op(op, errors)
            if errors:
                raise Fail("I/O failed in a sync run:\n" + "\n".join(errors) +
                           "\n" + dmesg_tail())
            self.nsync += 1

    def counters(self, names):
        """The status counters express_flushes and fast_fua of the tables
        names, summed."""
        n = {"express_flushes": 0, "fast_fua": 0}
        for name in names:
            out = run([DMSETUP, "status", name]).stdout
            kv = dict(w.split("=", 1) for w in out.split() if "=" in w)
            for k in n:
                n[k] += int(kv.get(k, "0"))
        return n

    def progress(self):
        out = dm_msg(self.cname, "merge_backward", "progress")
        kv = dict(w.split("=", 1) for w in out.split() if "=" in w)
        return out, kv

    def grow_header(self):
        hdr = struct.unpack(">Q", open(self.img("grow.qcow2"), "rb").read(56)[48:56])[0]
        return hdr

    def run(self):
        a = self.a
        c0 = bytearray(open(a.c_initial, "rb").read())
        if len(c0) != C_SIZE:
            raise Fail("%s: %d bytes, want %d" % (a.c_initial, len(c0), C_SIZE))
        g0 = bytearray(G_REGION)
        g0[:SNAP_DATA] = b"\x11" * SNAP_DATA
        self.info["c_initial"] = a.c_initial
        self.info["mid_view"] = a.mid_view
        self.info["grow_rt0"] = self.grow_header()
        for f in ("base.qcow2", "mid.qcow2"):
            self.info[f] = file_sha(self.img(f))
        # base read-write: it receives the merge; mid read-write too, so
        # that the merge moves its clusters (dropped from mid once copied)
        dm_map(self.cname, ["rw:" + self.img("base.qcow2"),
                            "rw:" + self.img("mid.qcow2"), self.img("top.qcow2")], rw=True)
        dm_map(self.gname, [self.img("grow.qcow2")], rw=True)
        # F: ext4 as a user makes it (mkfs discards the device first)
        fdev = dm_map(self.fname, [self.img("fs.qcow2")], rw=True)
        run(["mkfs.ext4", "-q", "-F", fdev])
        os.makedirs(self.fmnt, exist_ok=True)
        err = mount(fdev, self.fmnt, "ext4")
        if err:
            raise Fail(err)
        os.sync()
        self.open_devs()
        if read_direct(dev_node(self.cname), C_SIZE) != c0:
            raise Fail("the chain does not read like qemu-img convert before any write")
        if read_direct(dev_node(self.gname), G_REGION) != g0:
            raise Fail("grow.qcow2 does not read its data before any write")
        self.model = {"c": c0, "g": g0}
        self.mark("start")
        r = self.rng
        e = 0
        t0 = time.time()

        def epochs(n):
            nonlocal e
            for _ in range(n):
                self.epoch(r.randrange(2, a.ops_per_epoch + 1))
                e += 1
                if e % SYNC_EVERY == 1:
                    self.sync_run("c" if r.random() < 0.5 else "g")
                self.mark("e%d" % e)
                if a.verbose:
                    log("%s epoch %d: %d ops, phase %s" % (
                        time.strftime("%T"), e, len(self.ops), self.phase))
                rt = self.grow_header()
                if rt != self.info["grow_rt0"] and "grow_epoch" not in self.info:
                    self.info["grow_epoch"] = e
                    log("refcount table of grow.qcow2 moved in epoch %d "
                        "(%#x -> %#x)" % (e, self.info["grow_rt0"], rt))

        epochs(a.epochs)
        # merge mid into base while writing to the top
        dm_msg(self.cname, "merge_backward", "start", "-1", "1")
        self.phase = "merging"
        self.mark("merge-start")
        ready = False
        t1 = time.time()
        while time.time() < t1 + a.merge_timeout:
            epochs(1)
            out, kv = self.progress()
            if kv.get("stage") == "ready":
                ready = True
                break
            if kv.get("stage") not in ("copying",):
                raise Fail("merge: %s\n%s" % (out, dmesg_tail()))
        if not ready:
            raise Fail("merge not ready after %d s: %s" % (a.merge_timeout, out))
        dm_msg(self.cname, "merge_backward", "complete")
        self.fsync()
        self.phase = "merged"
        self.mark("merged")
        log("merge: complete after %d epochs" % e)
        epochs(a.epochs // 2)
        # snapshot by reload: suspend, new overlay over the top, reload
        # (a new table of C: its counters start from 0)
        before = self.counters([self.cname])
        self.close_devs()
        run([DMSETUP, "suspend", self.cname])
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
             "cluster_size=%d" % C_CLUSTER, "-b", "top.qcow2",
             "-F", "qcow2", self.img("over.qcow2"), str(C_SIZE)])
        run(["sync", "-f", self.img("over.qcow2")])
        wrapper = os.path.join(a.workdir, "dmsetup-reload")
        with open(wrapper, "w") as f:
            f.write('#!/bin/sh\n[ "$1" = create ] || exit 90\nshift\n'
                    'exec "${DMSETUP:-dmsetup}" reload "$@"\n')
        os.chmod(wrapper, 0o755)
        dm_map(self.cname, [self.img("base.qcow2"), self.img("top.qcow2"),
                            self.img("over.qcow2")], rw=True, dmsetup=wrapper)
        run([DMSETUP, "resume", self.cname])
        self.info["top.qcow2"] = file_sha(self.img("top.qcow2"))
        self.phase = "reloaded"
        self.open_devs()
        self.mark("reload")
        epochs(a.epochs // 2)
        self.fsync()
        self.mark("done")
        cnt = self.counters([self.cname, self.gname])
        for k in cnt:
            cnt[k] += before[k]
        self.info["counters"] = cnt
        log("workload: %d operations (%d FUA writes, %d in sync runs at "
            "queue depth 1; %d empty flushes committed by an express lane, %d FUA "
            "writes synced by the fast path) in %d epochs, %.1f s" % (
                len(self.ops), self.nfua - self.nsync, self.nsync,
                cnt["express_flushes"], cnt["fast_fua"], e, time.time() - t0))
        # else the crash states would not cover those paths
        if cnt["express_flushes"] == 0:
            raise Fail("no empty flush of a sync run was committed by an "
                       "express lane (status express_flushes)")
        if cnt["fast_fua"] == 0:
            raise Fail("no FUA write took the fast path (status fast_fua)")
        for d, name, ln in (("c", self.cname, C_SIZE), ("g", self.gname, G_REGION)):
            got = read_direct(dev_node(name), ln)
            if got != self.model[d]:
                bad = first_diff(got, self.model[d])
                raise Fail("live device %s differs from the model at %#x" % (d, bad))
        log("live devices read exactly the model")
        for f in self.files:
            with open(os.path.join(self.fmnt, f["name"]), "rb") as fh:
                if sha(fh.read()) != f["sha256"]:
                    raise Fail("F: file %s differs" % f["name"])
        err = umount(self.fmnt)
        if err:
            raise Fail(err)
        log("F: %d files read back, ext4 unmounted" % len(self.files))
        if "grow_epoch" not in self.info:
            raise Fail("the refcount table of grow.qcow2 did not move")
        self.close_devs()
        dm_remove(self.cname)
        dm_remove(self.gname)
        dm_remove(self.fname)

    def save(self, path):
        with open(path, "w") as f:
            json.dump({"ops": self.ops, "marks": self.marks, "info": self.info,
                       "files": self.files,
                       "seed": self.a.seed}, f)


def first_diff(a, b):
    for i in range(0, min(len(a), len(b)), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            return next(j for j in range(i, i + 4096) if a[j] != b[j])
    return min(len(a), len(b))


def cmd_workload(args):
    w = Workload(args)
    try:
        w.run()
    except Fail as e:
        w.save(args.state)
        log("FAIL: %s" % e)
        return 1
    w.save(args.state)
    log("%d marks, state in %s" % (len(w.marks), args.state))
    return 0


# ------------------------------------------------------------- checks

def snapshot_region(path, name, length):
    """The first `length` bytes of internal snapshot `name` of a qcow2
    image without backing file (python, from the snapshot's L1 table)."""
    with open(path, "rb") as f:
        hdr = f.read(104)
        cbits = struct.unpack_from(">I", hdr, 20)[0]
        nsnap = struct.unpack_from(">I", hdr, 60)[0]
        soff = struct.unpack_from(">Q", hdr, 64)[0]
        cs = 1 << cbits
        f.seek(soff)
        l1off = l1size = None
        for _ in range(nsnap):
            h = f.read(40)
            o, sz, idl, nl = struct.unpack_from(">QIHH", h, 0)
            extra = struct.unpack_from(">I", h, 36)[0]
            rest = f.read(extra + idl + nl)
            nm = rest[extra + idl:].decode("utf-8", "replace")
            pad = (-(40 + extra + idl + nl)) % 8
            f.read(pad)
            if nm == name:
                l1off, l1size = o, sz
        if l1off is None:
            raise Fail("%s: no snapshot %s" % (path, name))
        per_l2 = cs // 8
        out = bytearray(length)
        f.seek(l1off)
        l1 = struct.unpack(">%dQ" % l1size, f.read(8 * l1size))
        runs = []  # (guest offset, host offset, length), coalesced
        ncl = length // cs
        for t in range((ncl + per_l2 - 1) // per_l2):
            l2off = l1[t] & 0x00fffffffffffe00
            if not l2off:
                continue
            f.seek(l2off)
            l2 = struct.unpack(">%dQ" % per_l2, f.read(cs))
            for i in range(min(per_l2, ncl - t * per_l2)):
                e = l2[i]
                if e & (1 << 62):
                    raise Fail("%s: compressed cluster in the snapshot" % path)
                host = e & 0x00fffffffffffe00
                if e & 1 or not host:
                    continue
                g = (t * per_l2 + i) * cs
                if runs and runs[-1][0] + runs[-1][2] == g and \
                        runs[-1][1] + runs[-1][2] == host:
                    runs[-1][2] += cs
                else:
                    runs.append([g, host, cs])
        for g, host, n in runs:
            f.seek(host)
            out[g:g + n] = f.read(n).ljust(n, b"\0")
        return out


def sparse_copy(src, dst):
    """Copy src to a new dst, holes stay holes (tmpfs: SEEK_DATA/HOLE)."""
    if os.path.exists(dst):
        os.unlink(dst)  # a new inode: nothing cached from the last state
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = os.fstat(fi).st_size
        os.ftruncate(fo, size)
        pos = 0
        while pos < size:
            try:
                d = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fi, d, os.SEEK_HOLE)
            n = h - d
            while n > 0:
                c = os.copy_file_range(fi, fo, n, d, d)
                if c <= 0:
                    raise Fail("copy_file_range %s: %d" % (src, c))
                d += c
                n -= c
            pos = h
    finally:
        os.close(fi)
        os.close(fo)


class State:
    __slots__ = ("at", "barrier", "kept", "kind", "seed", "key")

    def __init__(self, at, barrier, kept, kind, seed=None):
        self.at = at
        self.barrier = barrier
        self.kept = kept
        self.kind = kind
        self.seed = seed
        self.key = (barrier, tuple(kept))


class Checker:
    def __init__(self, args):
        self.a = args
        st = json.load(open(args.state))
        self.ops = st["ops"]
        self.marks = st["marks"]
        self.files = st.get("files", [])
        self.info = st["info"]
        self.log = dmq_replay.Log(args.log)
        self.work = args.work
        self.mnt = os.path.join(args.work, "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.clean = os.path.join(args.work, "clean.img")
        self.cur = os.path.join(args.work, "state.img")
        self.size = args.dev_size
        self.checked_imgs = {}  # sha256 of an image file -> None or error
        self.view_ok = set()  # sha256 of base.qcow2 files that read right
        self.opdata = {}
        self.failures = []
        self.loop = None
        self.mounted = False
        self.maps = []
        # the workload's marks in the log
        self.mark_at = []
        names = {m["name"]: m for m in self.marks}
        for e in self.log.entries:
            if e.is_mark and e.mark in names:
                self.mark_at.append((e.index, names[e.mark]))
        if not self.mark_at or self.mark_at[0][1]["name"] != MARK_PREFIX + "start":
            raise Fail("the log has no %sstart mark" % MARK_PREFIX)
        if len(self.mark_at) != len(self.marks):
            raise Fail("the log has %d of the workload's %d marks" %
                       (len(self.mark_at), len(self.marks)))
        self.names = names
        # where each FUA write's own mark is in the log
        self.fua_at = {}
        fua = {op["fua_mark"] for op in self.ops if "fua_mark" in op}
        for e in self.log.entries:
            if e.is_mark and e.mark in fua:
                self.fua_at[e.mark] = e.index
        if len(self.fua_at) != len(fua):
            raise Fail("the log has %d of the workload's %d FUA marks" %
                       (len(self.fua_at), len(fua)))
        # relative to the state file (the workload's working directory)
        sdir = os.path.dirname(os.path.abspath(args.state))
        self.c0 = open(os.path.join(sdir, self.info["c_initial"]), "rb").read()
        self.mid_view = open(os.path.join(sdir, self.info["mid_view"]), "rb").read()
        g0 = bytearray(G_REGION)
        g0[:SNAP_DATA] = b"\x11" * SNAP_DATA
        self.snap0 = bytes(g0)
        # durable models, advanced as the states move forward
        self.durable = {"c": bytearray(self.c0), "g": bytearray(g0)}
        self.ndurable = 0

    # ------------------------------------------------------ states

    def plan(self):
        a = self.a
        ents = self.log.entries
        start = self.mark_at[0][0]
        last = len(ents) - 1
        rng = random.Random(a.seed)
        prefix = [i for i in range(start, last + 1)
                  if ents[i].is_barrier or ents[i].is_mark]
        budget = a.states
        nprefix = len(prefix)
        if nprefix > budget // 2:
            # keep every epoch's mark, sample the barriers (and the FUA
            # writes' marks) evenly
            marks = [i for i in prefix if ents[i].is_mark and ents[i].mark in self.names]
            kept = set(marks)
            rest = [i for i in prefix if i not in kept]
            want = max(0, budget // 2 - len(marks))
            step = len(rest) / want if want else 0
            rest = [rest[int(k * step)] for k in range(want)] if want else []
            prefix = sorted(set(marks + rest))
        states = []
        seen = set()
        # the same image at a later entry is checked against more
        # acknowledged writes (after their mark): keep the last one
        for i in reversed(prefix):
            b = self.log.last_barrier(i)
            kept = [e.index for e in ents[b + 1:i + 1] if e.changes_data]
            s = State(i, b, kept, "prefix")
            if s.key not in seen:
                seen.add(s.key)
                states.append(s)
        # FUA states: after the mark of a FUA write (some of them, evenly),
        # at the last entry before the next FLUSH/FUA, with half the writes
        # since the last one: the FUA write must show whatever the disk
        # cache kept (it is durable once it completed)
        fua = sorted(self.fua_at.values())
        nfua = min(len(fua), max(1, budget // 6))
        for k in range(nfua):
            i = fua[len(fua) * k // nfua]
            while i < last and not ents[i + 1].is_barrier:
                i += 1
            sd = rng.getrandbits(32)
            b, kept = dmq_replay.crash_subset(self.log, i, sd, 0.5)
            s = State(i, b, kept, "fua", sd)
            if s.key not in seen:
                seen.add(s.key)
                states.append(s)
        # subset states: entries with data-changing writes since their
        # last barrier
        cand = [i for i in range(start + 1, last + 1)
                if ents[i].changes_data and not ents[i].is_barrier]
        tries = 0
        while len(states) < budget and cand and tries < budget * 20:
            tries += 1
            i = rng.choice(cand)
            sd = rng.getrandbits(32)
            b, kept = dmq_replay.crash_subset(self.log, i, sd,
                                              rng.choice((0.25, 0.5, 0.75)))
            s = State(i, b, kept, "subset", sd)
            if s.key in seen:
                continue
            seen.add(s.key)
            states.append(s)
        states.sort(key=lambda s: (s.barrier, s.at, s.kind))
        log("log: %d entries (%d FLUSH/FUA, %d marks); crash states from "
            "entry %d: %d prefix, %d after FUA writes, %d subset (seed %d)" %
            (len(ents), sum(1 for e in ents if e.is_barrier),
             sum(1 for e in ents if e.is_mark), start,
             sum(1 for s in states if s.kind == "prefix"),
             sum(1 for s in states if s.kind == "fua"),
             sum(1 for s in states if s.kind == "subset"), a.seed))
        return states

    def marks_around(self, at):
        """(last workload mark <= at, next one > at or None)"""
        prev = nxt = None
        for idx, m in self.mark_at:
            if idx <= at:
                prev = m
            elif nxt is None:
                nxt = m
        return prev, nxt

    # ------------------------------------------------------ model

    def data(self, op):
        d = self.opdata.get(op["id"])
        if d is None:
            d = op_data(op)
            self.opdata[op["id"]] = d
        return d

    def advance_model(self, n):
        if n < self.ndurable:
            raise Fail("model cannot go back (%d -> %d)" % (self.ndurable, n))
        for op in self.ops[self.ndurable:n]:
            self.durable[op["dev"]][op["off"]:op["off"] + op["len"]] = self.data(op)
        self.ndurable = n

    def compare(self, dev, got, maybe, fua=()):
        """Sectors of got that are neither durable data (with the data of
        the FUA writes fua over it) nor one of the maybe operations' data;
        returns a list of problem ranges."""
        exp = self.durable[dev]
        acked = [op for op in fua if op["dev"] == dev]
        if acked:
            exp = bytearray(exp)
            for op in acked:
                exp[op["off"]:op["off"] + op["len"]] = self.data(op)
        init = self.c0 if dev == "c" else self.snap0
        bad = []
        chunk = 64 * 1024
        for c in range(0, len(exp), chunk):
            if got[c:c + chunk] == exp[c:c + chunk]:
                continue
            for s in range(c, min(c + chunk, len(exp)), SECTOR):
                g = got[s:s + SECTOR]
                if g == exp[s:s + SECTOR]:
                    continue
                ok = False
                for op in maybe:
                    if op["dev"] == dev and op["off"] <= s < op["off"] + op["len"]:
                        o = s - op["off"]
                        if self.data(op)[o:o + SECTOR] == g:
                            ok = True
                            break
                if not ok:
                    what = ("zeroes" if g == bytes(SECTOR) else
                            "the initial data" if g == init[s:s + SECTOR] else
                            "other data")
                    want = ("the initial data (never written)"
                            if exp[s:s + SECTOR] == init[s:s + SECTOR]
                            else "a completed FUA write's data"
                            if any(op["off"] <= s < op["off"] + op["len"]
                                   for op in acked)
                            else "written data")
                    if bad and bad[-1][0] + bad[-1][1] == s and \
                            bad[-1][2] == what and bad[-1][3] == want:
                        bad[-1][1] += SECTOR
                    else:
                        bad.append([s, SECTOR, what, want])
        return bad

    # ------------------------------------------------------ one state

    def sh(self, cmd):
        return run(cmd, check=False)

    def cleanup(self):
        for name in self.maps:
            run([DMSETUP, "remove", "--retry", name], check=False)
        self.maps = []
        if self.mounted:
            if umount(self.mnt):
                run(["umount", self.mnt], check=False)
            self.mounted = False
        if self.loop:
            self.loop.close()
            self.loop = None

    def qcheck(self, path, errs, cache=False):
        """qemu-img check: corruptions fail, leaks (rc 3) do not; with
        cache, the file's sha256 is returned and a file seen before is not
        checked again."""
        h = None
        if cache:
            h = file_sha(path)
            if h in self.checked_imgs:
                if self.checked_imgs[h]:
                    errs.append(self.checked_imgs[h])
                return h
        res = self.sh([QEMU_IMG, "check", "-f", "qcow2", path])
        err = None
        if res.returncode == 3:
            pass  # leaked clusters only
        elif res.returncode != 0:
            lines = [ln for ln in res.stdout.splitlines()
                     if "ERROR" in ln or "corrupt" in ln.lower() or
                     "error" in ln.lower()]
            err = "qemu-img check %s: rc=%d (%s)\n      %s" % (
                os.path.basename(path), res.returncode,
                "2: corruptions" if res.returncode == 2 else "not a leak",
                "\n      ".join(lines[:12] or res.stdout.splitlines()[-6:]))
        if cache:
            self.checked_imgs[h] = err
        if err:
            errs.append(err)
        return h

    def check_fs(self, path, durable, errs):
        """F's ext4 in the crash state: mounted from an overlay (the
        journal replays into it), it holds the durable files, and fsck is
        clean."""
        ov = os.path.join(self.work, "fs-over.qcow2")
        fmnt = os.path.join(self.work, "fmnt")
        os.makedirs(fmnt, exist_ok=True)
        if os.path.exists(ov):
            os.unlink(ov)
        res = self.sh([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", path,
                       "-F", "qcow2", ov])
        if res.returncode != 0:
            errs.append("qemu-img create over fs.qcow2: %s" % res.stdout.strip())
            return
        name = self.a.prefix + "crf"
        try:
            node = dm_map(name, [path, ov], rw=True)
        except (Fail, OSError) as e:
            errs.append("fs.qcow2: %s\n%s" % (e, dmesg_tail(6)))
            return
        self.maps.append(name)
        err = mount(node, fmnt, "ext4")
        if err:
            errs.append("F: ext4 %s (journal replay)\n%s" % (err, dmesg_tail(6)))
        else:
            bad = []
            for f in durable:
                try:
                    with open(os.path.join(fmnt, f["name"]), "rb") as fh:
                        if sha(fh.read()) != f["sha256"]:
                            bad.append("%s differs" % f["name"])
                except OSError as e:
                    bad.append("%s: %s" % (f["name"], e.strerror))
            err = umount(fmnt)
            if err:
                errs.append(err)
            if bad:
                errs.append("F: %d of the %d files fsync'ed before the last "
                            "mark are wrong: %s" % (len(bad), len(durable),
                                                    ", ".join(bad[:6])))
            res = self.sh(["fsck.ext4", "-fn", node])
            if res.returncode != 0:
                errs.append("F: fsck after the journal replay: rc=%d\n      %s" % (
                    res.returncode, "\n      ".join(res.stdout.splitlines()[-12:])))
        run([DMSETUP, "remove", "--retry", name], check=False)
        self.maps.remove(name)
        os.unlink(ov)

    def read_chain(self, tag, specs, length, errs):
        if self.a.reader == "qemu":
            return self.read_chain_qemu(specs, length, errs)
        name = "%scr%s" % (self.a.prefix, tag)
        try:
            node = dm_map_ro(name, specs)
        except (Fail, OSError) as e:
            errs.append("%s\n%s" % (e, dmesg_tail(6)))
            return None
        self.maps.append(name)
        try:
            got = read_direct(node, length)
        except (Fail, OSError) as e:
            errs.append("reading %s: %s\n%s" % (" ".join(
                os.path.basename(s) for s in specs), e, dmesg_tail(6)))
            got = None
        run([DMSETUP, "remove", "--retry", name], check=False)
        self.maps.remove(name)
        return got

    def read_chain_qemu(self, specs, length, errs):
        """The chain read by QEMU (the host-side checker has no target),
        given explicitly like a table's (the images' own backing names are
        not followed: after the merge top.qcow2 still names mid.qcow2)."""
        opts = []
        for depth, path in enumerate(reversed(specs)):
            if "," in path:
                errs.append("%s: a comma in the path" % path)
                return None
            pre = "backing." * depth
            opts += ["%sdriver=qcow2" % pre, "%sfile.driver=file" % pre,
                     "%sfile.filename=%s" % (pre, path)]
        out = os.path.join(self.work, "read.raw")
        res = self.sh([QEMU_IMG, "dd", "--image-opts", "-U", "-O", "raw",
                       "bs=%d" % MIB, "count=%d" % (length // MIB),
                       "if=" + ",".join(opts), "of=" + out])
        if res.returncode != 0:
            errs.append("qemu-img dd %s: rc=%d: %s" % (
                os.path.basename(specs[-1]), res.returncode, res.stdout.strip()))
            return None
        with open(out, "rb") as f:
            got = f.read(length)
        os.unlink(out)
        if len(got) != length:
            errs.append("qemu-img dd %s: %d bytes, want %d" % (
                os.path.basename(specs[-1]), len(got), length))
            return None
        return got

    def check_state(self, s, prev, nxt):
        errs = []
        notes = []
        self.loop = Loop(self.cur)
        dev = self.loop.dev
        err = mount(dev, self.mnt, self.a.fs)
        if err:
            return ["%s (journal replay) failed\n%s" % (err, dmesg_tail(6))]
        self.mounted = True
        err = umount(self.mnt)
        if err:
            return [err]
        self.mounted = False
        if self.a.fs == "ext4":
            res = self.sh(["fsck.ext4", "-fn", dev])
        else:
            res = self.sh(["xfs_repair", "-n", dev])
        if res.returncode != 0:
            errs.append("fsck after the journal replay: rc=%d\n      %s" % (
                res.returncode, "\n      ".join(res.stdout.splitlines()[-12:])))
        err = mount(dev, self.mnt, self.a.fs, ro=True)
        if err:
            return errs + [err]
        self.mounted = True
        img = lambda n: os.path.join(self.mnt, n)  # noqa: E731
        phase, nphase = prev["phase"], (nxt or prev)["phase"]
        # the images below the top
        hmid = self.qcheck(img("mid.qcow2"), errs, cache=True)
        if nphase == "pre" and hmid != self.info["mid.qcow2"]:
            errs.append("mid.qcow2 changed before the merge started")
        hbase = self.qcheck(img("base.qcow2"), errs, cache=True)
        if nphase == "pre" and hbase != self.info["base.qcow2"]:
            errs.append("base.qcow2 changed before the merge started")
        self.qcheck(img("top.qcow2"), errs)
        self.qcheck(img("grow.qcow2"), errs)
        if phase == "reloaded":
            self.qcheck(img("over.qcow2"), errs)
            if file_sha(img("top.qcow2")) != self.info["top.qcow2"]:
                errs.append("top.qcow2 changed after the snapshot by reload")
        if errs:
            # metadata is damaged: still look at the data, it tells more
            notes.append("(image checks failed; data compared anyway)")
        maybe = self.ops[prev["nops"]:(nxt or prev)["nops"] if nxt else len(self.ops)]
        # FUA writes of the epoch that completed before the state's entry
        fua = [op for op in maybe
               if self.fua_at.get(op.get("fua_mark"), s.at + 1) <= s.at]
        self.advance_model(prev["nops"])
        if phase == "reloaded":
            chain = ["base.qcow2", "top.qcow2", "over.qcow2"]
        elif phase == "merged":
            chain = ["base.qcow2", "top.qcow2"]
        else:
            chain = ["base.qcow2", "mid.qcow2", "top.qcow2"]
        got = self.read_chain("c", [img(n) for n in chain], C_SIZE, errs)
        if got is not None:
            bad = self.compare("c", got, maybe, fua)
            if bad:
                n = sum(b[1] for b in bad) // SECTOR
                errs.append("chain %s: %d sectors (512 B) read wrong in %d "
                            "ranges:\n      %s" % (
                                "<-".join(chain), n, len(bad), "\n      ".join(
                                    "%#x+%#x: %s instead of %s" % tuple(b)
                                    for b in bad[:10])))
        if (phase != "pre" or nphase != "pre") and (hbase, hmid) not in self.view_ok:
            v = self.read_chain("v", [img("base.qcow2"), img("mid.qcow2")],
                                C_SIZE, errs)
            if v == self.mid_view:
                self.view_ok.add((hbase, hmid))
            if v is not None and v != self.mid_view:
                off = first_diff(v, self.mid_view)
                errs.append("base<-mid (below the top) reads other data than "
                            "before the merge at %#x (%s)" % (
                                off, "zeroes" if v[off:off + SECTOR] == bytes(SECTOR)
                                else "data"))
        got = self.read_chain("g", [img("grow.qcow2")], G_REGION, errs)
        if got is not None:
            bad = self.compare("g", got, maybe, fua)
            if bad:
                n = sum(b[1] for b in bad) // SECTOR
                errs.append("grow.qcow2: %d sectors read wrong in %d ranges:"
                            "\n      %s" % (n, len(bad), "\n      ".join(
                                "%#x+%#x: %s instead of %s" % tuple(b)
                                for b in bad[:10])))
        self.qcheck(img("fs.qcow2"), errs)
        if self.a.reader == "dm":
            self.check_fs(img("fs.qcow2"), self.files[:prev["nfiles"]], errs)
        try:
            snap = snapshot_region(img("grow.qcow2"), "s1", G_REGION)
            if snap != self.snap0:
                off = first_diff(snap, self.snap0)
                errs.append("grow.qcow2: internal snapshot s1 changed at %#x" % off)
        except (Fail, OSError, struct.error, IndexError, ValueError,
                OverflowError) as e:
            errs.append("grow.qcow2: cannot read snapshot s1: %s" % e)
        return errs

    def run(self):
        t0 = time.time()
        states = self.plan()
        ents = self.log.entries
        if os.path.exists(self.clean):
            os.unlink(self.clean)
        with open(self.clean, "wb") as f:
            f.truncate(self.size)
        rep = dmq_replay.Replayer(self.log, self.clean)
        nfail = 0
        shown = 0
        for k, s in enumerate(states):
            rep.advance(s.barrier)
            rep.sync()
            sparse_copy(self.clean, self.cur)
            w = dmq_replay.Replayer(self.log, self.cur)
            for i in s.kept:
                w.apply(ents[i])
            w.close()
            prev, nxt = self.marks_around(s.at)
            try:
                errs = self.check_state(s, prev, nxt)
            except Fail as e:
                errs = [str(e)]
            except OSError as e:
                # where the checker itself failed, not just errno's text
                import traceback
                errs = ["checker: %s\n%s" % (e, traceback.format_exc(limit=6))]
            finally:
                self.cleanup()
            nwin = sum(1 for e in ents[s.barrier + 1:s.at + 1] if e.changes_data)
            desc = ("state %d/%d: entry %d (%s%s), %s: through FLUSH/FUA entry "
                    "%d, then %d of the %d writes after it%s; after mark %s "
                    "(%d ops durable), before %s (%d ops issued)" % (
                        k + 1, len(states), s.at, ents[s.at].flag_text(),
                        " " + ents[s.at].mark if ents[s.at].is_mark else "",
                        s.kind, s.barrier, len(s.kept), nwin,
                        " (seed %d)" % s.seed if s.seed is not None else "",
                        prev["name"], prev["nops"],
                        nxt["name"] if nxt else "the end",
                        nxt["nops"] if nxt else len(self.ops)))
            if errs:
                nfail += 1
                if shown < self.a.show:
                    shown += 1
                    log("FAIL %s" % desc)
                    for e in errs:
                        log("    - " + e)
            elif self.a.verbose:
                log("ok   %s" % desc)
            if (k + 1) % 25 == 0:
                log("... %d/%d states, %d failed, %.0f s" %
                    (k + 1, len(states), nfail, time.time() - t0))
        rep.close()
        log("crash states: %d checked (%d prefix, %d after FUA writes, %d "
            "subset), %d failed, %.0f s" % (
                len(states), sum(1 for s in states if s.kind == "prefix"),
                sum(1 for s in states if s.kind == "fua"),
                sum(1 for s in states if s.kind == "subset"), nfail,
                time.time() - t0))
        return 1 if nfail else 0


def cmd_check(args):
    try:
        c = Checker(args)
        return c.run()
    except Fail as e:
        log("FAIL: %s" % e)
        return 1
    except dmq_replay.LogError as e:
        log("FAIL: log: %s" % e)
        return 1


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("workload")
    p.add_argument("state")
    p.add_argument("--mnt", required=True)
    p.add_argument("--lw", required=True, help="the log-writes dm name")
    p.add_argument("--prefix", required=True, help="dm name prefix")
    p.add_argument("--workdir", default=".")
    p.add_argument("--c-initial", required=True,
                   help="raw content of the chain before the workload")
    p.add_argument("--mid-view", required=True,
                   help="raw content of base<-mid before the workload")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--ops-per-epoch", type=int, default=8)
    p.add_argument("--merge-timeout", type=int, default=600)
    p.add_argument("--verbose", action="store_true")
    p = sub.add_parser("check")
    p.add_argument("state")
    p.add_argument("log")
    p.add_argument("--work", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--dev-size", type=int, required=True)
    p.add_argument("--fs", default="ext4")
    p.add_argument("--states", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--show", type=int, default=10,
                   help="print the details of this many failed states")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--reader", choices=("dm", "qemu"), default="dm",
                   help="read the chains through fresh qcow2 tables (dm, "
                   "in the VM) or with qemu-img (qemu: the host-side check)")
    args = ap.parse_args(argv)
    if args.cmd == "workload":
        return cmd_workload(args)
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
