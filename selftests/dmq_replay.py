#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Replay a dm-log-writes log onto a device or file (a small replay-log).

usage:
  dmq_replay.py list LOG                      every entry, one a line
  dmq_replay.py replay LOG TARGET [--start N] [--end N | --end-mark NAME]
  dmq_replay.py crash LOG TARGET (--at N | --at-mark NAME) --seed S [--prob P]

The log format is the kernel's (drivers/md/dm-log-writes.c; described in
Documentation/admin-guide/device-mapper/log-writes.rst): a super block at
sector 0 (magic 0x6a736677736872, version 1, nr_entries, sectorsize), then
from byte `sectorsize` on, per entry, one sector holding the entry header
{le64 sector, nr_sectors, flags, data_len} (a MARK's name follows the header
in that sector) and, unless the entry is a DISCARD or a MARK, nr_sectors
sectors of the data written. Sectors count in units of `sectorsize`.

Flags: FLUSH (the writes logged before it are durable once it completed),
FUA (durable when it completed), DISCARD (logged like a write), MARK (a name
given with `dmsetup message <dev> 0 mark <name>`), METADATA (REQ_META).

dm-log-writes logs a non-FUA write only at the next flush (it splices the
writes completed before the flush was issued in front of it), a FUA write
and a mark when they complete. So a crash at entry N leaves everything up to
the last FLUSH or FUA entry B <= N on disk, and any subset of the writes
between B and N (a disk cache may persist any of them, in any order):
`crash` replays exactly that, the subset drawn with the given seed.

Entries are numbered from 0; "up to N" includes entry N. `replay` writes
entries start..end in order (start: the target already holds the entries
before it). DISCARD entries zero the range (a hole punched in a regular file,
BLKZEROOUT on a block device, else zeroes written), as loop devices and the
qcow2 target do. WRITE_ZEROES bios are logged with no data (the log area is
left as it was: zeroes in a fresh log file). The target is written with
pwrite and fsync'ed at the end. Python 3 standard library only; also
importable (Log, Replayer, crash_state).
"""

import argparse
import ctypes
import ctypes.util
import fcntl
import os
import random
import stat
import struct
import sys

MAGIC = 0x6a736677736872
VERSION = 1
FLUSH = 1 << 0
FUA = 1 << 1
DISCARD = 1 << 2
MARK = 1 << 3
METADATA = 1 << 4
FLAG_NAMES = ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"),
              (MARK, "MARK"), (METADATA, "META"))
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA
ENTRY = struct.Struct("<QQQQ")
SUPER = struct.Struct("<QQQI")
BLKZEROOUT = 0x127f  # _IO(0x12, 127)
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


class LogError(Exception):
    pass


class Entry:
    __slots__ = ("index", "sector", "nr_sectors", "flags", "data_len",
                 "hdr_off", "data_off", "mark")

    def __init__(self, index, sector, nr_sectors, flags, data_len, hdr_off,
                 data_off, mark):
        self.index = index
        self.sector = sector
        self.nr_sectors = nr_sectors
        self.flags = flags
        self.data_len = data_len
        self.hdr_off = hdr_off
        self.data_off = data_off
        self.mark = mark

    @property
    def is_mark(self):
        return bool(self.flags & MARK)

    @property
    def is_discard(self):
        return bool(self.flags & DISCARD)

    @property
    def is_barrier(self):
        """FLUSH or FUA: everything before it (FLUSH) or itself (FUA) is
        durable once it is in the log."""
        return bool(self.flags & (FLUSH | FUA))

    @property
    def changes_data(self):
        """A write or a discard of at least one sector."""
        return not self.is_mark and self.nr_sectors > 0

    def flag_text(self):
        t = [n for f, n in FLAG_NAMES if self.flags & f]
        return "|".join(t) if t else "WRITE"

    def __str__(self):
        s = "%d %s sector=%d nr=%d" % (self.index, self.flag_text(),
                                       self.sector, self.nr_sectors)
        if self.is_mark:
            s += " mark=%s" % self.mark
        return s


class Log:
    """A dm-log-writes log (a file or the log device), parsed at open."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        hdr = os.pread(self.fd, SUPER.size, 0)
        if len(hdr) < SUPER.size:
            raise LogError("%s: no super block" % path)
        magic, version, nr, ss = SUPER.unpack(hdr)
        if magic != MAGIC:
            raise LogError("%s: bad magic %#x (want %#x)" % (path, magic, MAGIC))
        if version != VERSION:
            raise LogError("%s: unknown log version %d" % (path, version))
        if ss < 512 or ss & (ss - 1) or ss > 65536:
            raise LogError("%s: bad sectorsize %d" % (path, ss))
        self.sectorsize = ss
        self.nr_entries = nr
        self.size = os.fstat(self.fd).st_size
        if stat.S_ISBLK(os.fstat(self.fd).st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.entries = []
        self.marks = {}
        off = ss
        for i in range(nr):
            raw = os.pread(self.fd, ss, off)
            if len(raw) < ENTRY.size:
                raise LogError("%s: entry %d at %d: past the end" % (path, i, off))
            sector, nsec, flags, dlen = ENTRY.unpack_from(raw)
            if flags & ~KNOWN_FLAGS:
                raise LogError("%s: entry %d: unknown flags %#x" % (path, i, flags))
            mark = None
            if flags & MARK:
                if dlen > ss - ENTRY.size:
                    raise LogError("%s: entry %d: mark too long" % (path, i))
                mark = raw[ENTRY.size:ENTRY.size + dlen].decode("utf-8", "replace")
                self.marks.setdefault(mark, i)
            data_off = off + ss
            nxt = data_off
            if not flags & (DISCARD | MARK):
                nxt += nsec * ss
            if nxt > self.size:
                raise LogError("%s: entry %d: data past the end of the log" % (path, i))
            self.entries.append(Entry(i, sector, nsec, flags, dlen, off,
                                      data_off, mark))
            off = nxt

    def close(self):
        os.close(self.fd)

    def mark_index(self, name):
        if name not in self.marks:
            raise LogError("%s: no mark named %r" % (self.path, name))
        return self.marks[name]

    def data(self, e):
        n = e.nr_sectors * self.sectorsize
        b = os.pread(self.fd, n, e.data_off)
        if len(b) != n:
            raise LogError("entry %d: short read of its data" % e.index)
        return b

    def last_barrier(self, n):
        """Index of the last FLUSH/FUA entry <= n, or -1."""
        for i in range(n, -1, -1):
            if self.entries[i].is_barrier:
                return i
        return -1


_libc = None


def _punch(fd, off, length):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                            use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                    ctypes.c_longlong, ctypes.c_longlong]
    r = _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        off, length)
    return r == 0


class Replayer:
    """Writes log entries onto TARGET (a file or a block device)."""

    def __init__(self, log, target, zero_chunk=1 << 20):
        self.log = log
        self.target = target
        self.fd = os.open(target, os.O_RDWR)
        self.is_blk = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.pos = -1  # entries 0..pos are on the target
        self.zero_chunk = zero_chunk

    def close(self):
        os.fsync(self.fd)
        os.close(self.fd)

    def sync(self):
        os.fsync(self.fd)

    def zero(self, off, length):
        if not self.is_blk and _punch(self.fd, off, length):
            return
        if self.is_blk:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", off, length))
                return
            except OSError:
                pass
        z = bytes(min(length, self.zero_chunk))
        while length > 0:
            n = min(length, len(z))
            os.pwrite(self.fd, z[:n], off)
            off += n
            length -= n

    def apply(self, e):
        if not e.changes_data:
            return
        ss = self.log.sectorsize
        if e.is_discard:
            self.zero(e.sector * ss, e.nr_sectors * ss)
        else:
            b = self.log.data(e)
            if os.pwrite(self.fd, b, e.sector * ss) != len(b):
                raise LogError("entry %d: short write to %s" % (e.index, self.target))

    def advance(self, n):
        """Apply entries pos+1..n (n >= pos)."""
        if n < self.pos:
            raise LogError("cannot go back from entry %d to %d" % (self.pos, n))
        for i in range(self.pos + 1, n + 1):
            self.apply(self.log.entries[i])
        self.pos = n


def crash_subset(log, at, seed, prob=0.5):
    """(B, kept): B = the last FLUSH/FUA entry <= at (-1: none), kept = a
    random subset (seeded) of the data-changing entries in (B, at]."""
    b = log.last_barrier(at)
    rng = random.Random(seed)
    kept = [e.index for e in log.entries[b + 1:at + 1]
            if e.changes_data and rng.random() < prob]
    return b, kept


def crash_state(log, target, at, seed, prob=0.5):
    """Replay onto a fresh TARGET the crash state at entry `at`."""
    b, kept = crash_subset(log, at, seed, prob)
    r = Replayer(log, target)
    r.advance(b)
    for i in kept:
        r.apply(log.entries[i])
    r.close()
    return b, kept


def _index(log, n, mark):
    if mark is not None:
        return log.mark_index(mark)
    if n is None:
        return len(log.entries) - 1
    if n < -1 or n >= len(log.entries):
        raise LogError("entry %d out of range (0..%d)" % (n, len(log.entries) - 1))
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="print the entries")
    p.add_argument("log")
    p.add_argument("--marks", action="store_true", help="marks only")
    p = sub.add_parser("replay", help="replay entries START..END")
    p.add_argument("log")
    p.add_argument("target")
    p.add_argument("--start", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--end", type=int)
    g.add_argument("--end-mark")
    p = sub.add_parser("crash", help="the crash state at an entry")
    p.add_argument("log")
    p.add_argument("target")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--at", type=int)
    g.add_argument("--at-mark")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--prob", type=float, default=0.5,
                   help="chance that each write after the barrier is kept")
    args = ap.parse_args(argv)
    try:
        log = Log(args.log)
        if args.cmd == "list":
            print("# %s: %d entries, sectorsize %d" %
                  (args.log, len(log.entries), log.sectorsize))
            for e in log.entries:
                if not args.marks or e.is_mark:
                    print(e)
        elif args.cmd == "replay":
            end = _index(log, args.end, args.end_mark)
            r = Replayer(log, args.target)
            r.pos = args.start - 1
            r.advance(end)
            r.close()
            print("replayed entries %d..%d" % (args.start, end))
        else:
            at = _index(log, args.at, args.at_mark)
            b, kept = crash_state(log, args.target, at, args.seed, args.prob)
            print("crash at entry %d (seed %d): entries 0..%d, then %s" %
                  (at, args.seed, b, " ".join(map(str, kept)) or "nothing"))
    except (LogError, OSError) as e:
        print("dmq_replay.py: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
