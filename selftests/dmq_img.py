#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Image helpers for the dm-qcow2 selftests.

Subcommands:
  header IMG                    print the qcow2 header fields as JSON
  patch IMG FIELD=VAL ...       patch header fields in place (big-endian);
                                FIELD|=VAL ors bits in, FIELD+=VAL adds
  fill OUT LEN KIND SEED [OFF]  write LEN bytes of deterministic data that
                                would sit at guest offset OFF (default 0)
  write IMG [-f FMT] SPEC ...   run one qemu-io with one write per SPEC
  cmp DEV RAW [options]         compare ranges of DEV with the same ranges
                                of RAW: O_DIRECT single reads (512-aligned)
                                and buffered reads (any byte offset)
  entry IMG KIND WHERE [OP VAL] print (and patch: OP is =, |= or +=) a
                                metadata entry as "FILE_OFFSET VALUE" (hex):
                                KIND l1 (WHERE: index), l2 or l2bitmap
                                (WHERE: guest offset; the second word of an
                                extended entry), reft (WHERE: index)
  badread DEV RAW --bad OFF:LEN read all of DEV with O_DIRECT: the bad
                                ranges must fail with EIO (4 KiB at a time),
                                the rest must equal RAW
  phys FILE OFF                 the device byte offset of FILE's byte OFF
                                (FIEMAP, after a sync of FILE)

Sizes accept k/M/G suffixes (powers of two) and sums: "2M+512", "64k-1k".

Data kinds (KIND in fill, first SPEC field in write):
  t      text records that encode their guest offset and the seed
         (compressible, and a misplaced read shows up as a mismatch)
  r      pseudo-random bytes from (seed, guest offset) (incompressible)
  P0xNN  one byte pattern (qemu-io -P)
  z      qemu-io write -z            (zeroes, may become a zero cluster)
  zu     qemu-io write -z -u         (zeroes, unmapping allowed)
  ct/cr  qemu-io write -c with t/r data (compressed; cluster aligned only)

SPEC is KIND:OFF:LEN[:SEED]; SEED defaults to the SPEC's index + 1.
"""

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

QCOW2_MAGIC = 0x514649FB

# name: (offset, struct format)
HEADER_FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    # version 3 only
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
V2_FIELDS = ("magic", "version", "backing_file_offset", "backing_file_size",
             "cluster_bits", "size", "crypt_method", "l1_size",
             "l1_table_offset", "refcount_table_offset",
             "refcount_table_clusters", "nb_snapshots", "snapshots_offset")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
          "t": 1 << 40}


def parse_size(text):
    """'2M+512' -> 2097664; accepts k/M/G/T suffixes, '+' and '-'."""
    text = text.strip()
    if not text:
        raise ValueError("empty size")
    total = 0
    for sign, num, unit in re.findall(r"([+-]?)\s*(0x[0-9a-fA-F]+|\d+)\s*([a-zA-Z]?)",
                                      text):
        if unit.lower() not in _UNITS:
            raise ValueError("bad size unit in %r" % text)
        val = int(num, 0) * _UNITS[unit.lower()]
        total += -val if sign == "-" else val
    if re.sub(r"([+-]?)\s*(0x[0-9a-fA-F]+|\d+)\s*([a-zA-Z]?)", "", text).strip():
        raise ValueError("cannot parse size %r" % text)
    return total


def read_header(path):
    with open(path, "rb") as f:
        buf = f.read(112)
    if len(buf) < 72:
        raise ValueError("%s: too short for a qcow2 header" % path)
    hdr = {}
    for name, (off, fmt) in HEADER_FIELDS.items():
        if off + struct.calcsize(fmt) <= len(buf):
            hdr[name] = struct.unpack_from(fmt, buf, off)[0]
    if hdr.get("version", 0) < 3:
        hdr = {k: v for k, v in hdr.items() if k in V2_FIELDS}
    return hdr


def virtual_size(path):
    """Virtual size in bytes from the qcow2 header, or None if not qcow2."""
    try:
        hdr = read_header(path)
    except (OSError, ValueError):
        return None
    if hdr.get("magic") != QCOW2_MAGIC:
        return None
    return hdr["size"]


def patch_header(path, assignments):
    with open(path, "r+b") as f:
        buf = bytearray(f.read(112))
        for item in assignments:
            m = re.fullmatch(r"([a-z_0-9]+)\s*(\|=|\+=|=)\s*(\S+)", item)
            if not m:
                raise ValueError("bad assignment %r" % item)
            name, op, val = m.group(1), m.group(2), int(m.group(3), 0)
            if name not in HEADER_FIELDS:
                raise ValueError("unknown header field %r" % name)
            off, fmt = HEADER_FIELDS[name]
            if off + struct.calcsize(fmt) > len(buf):
                raise ValueError("file too short for field %r" % name)
            old = struct.unpack_from(fmt, buf, off)[0]
            if op == "|=":
                val |= old
            elif op == "+=":
                val += old
            struct.pack_into(fmt, buf, off, val)
        f.seek(0)
        f.write(buf)


def _entry_pos(path, kind, where):
    """(file offset, current value) of a metadata entry of IMG."""
    hdr = read_header(path)
    cs = 1 << hdr["cluster_bits"]
    ext = bool(hdr.get("incompatible_features", 0) & 16)
    ebytes = 16 if ext else 8
    with open(path, "rb") as f:
        def be64(off):
            f.seek(off)
            b = f.read(8)
            if len(b) != 8:
                raise ValueError("%s: no entry at %#x (past the end)" % (path, off))
            return struct.unpack(">Q", b)[0]
        if kind == "l1":
            idx = where
            if idx >= hdr["l1_size"]:
                raise ValueError("L1 index %d >= l1_size %d" % (idx, hdr["l1_size"]))
            pos = hdr["l1_table_offset"] + 8 * idx
        elif kind in ("l2", "l2bitmap"):
            per_l2 = cs // ebytes
            l1e = be64(hdr["l1_table_offset"] + 8 * (where // (per_l2 * cs)))
            l2 = l1e & 0x00FFFFFFFFFFFE00
            if not l2:
                raise ValueError("no L2 table for guest offset %#x" % where)
            pos = l2 + ((where // cs) % per_l2) * ebytes
            if kind == "l2bitmap":
                if not ext:
                    raise ValueError("l2bitmap: not an extended-L2 image")
                pos += 8
        elif kind == "refb":
            # the refcount of cluster WHERE (64-bit refcounts only)
            if hdr.get("refcount_order", 4) != 6:
                raise ValueError("refb: only for refcount_bits=64 images")
            per_blk = cs // 8
            rte = be64(hdr["refcount_table_offset"] + 8 * (where // per_blk))
            blk = rte & ~0x1FF
            if not blk:
                raise ValueError("no refcount block for cluster %d" % where)
            pos = blk + 8 * (where % per_blk)
        elif kind == "reft":
            if where >= hdr["refcount_table_clusters"] * cs // 8:
                raise ValueError("refcount table index %d out of range" % where)
            pos = hdr["refcount_table_offset"] + 8 * where
        else:
            raise ValueError("unknown entry kind %r" % kind)
        return pos, be64(pos)


def cmd_entry(args):
    pos, val = _entry_pos(args.image, args.kind, parse_size(args.where))
    if args.op:
        new = int(args.value, 0)
        if args.op == "|=":
            new |= val
        elif args.op == "+=":
            new += val
        elif args.op != "=":
            raise ValueError("bad operator %r" % args.op)
        with open(args.image, "r+b") as f:
            f.seek(pos)
            f.write(struct.pack(">Q", new & (2**64 - 1)))
        val = new
    print("%#x %#x" % (pos, val & (2**64 - 1)))
    return 0


def cmd_badread(args):
    """Every 4 KiB block of DEV: in a bad range, EIO; elsewhere RAW's bytes.
    Also one read across each bad range's edges must fail."""
    import errno
    blk = 4096
    bad = []
    for r in args.bad:
        off, length = r.split(":")
        bad.append((parse_size(off), parse_size(length)))
    with open(args.raw, "rb") as rf:
        raw = rf.read()
    size = len(raw)
    fd = os.open(args.dev, os.O_RDONLY | os.O_DIRECT)
    nerr = nok = 0
    fails = []

    def isbad(off):
        return any(o <= off < o + n for o, n in bad)

    def read(off, length):
        try:
            return _direct_read(fd, off, length), None
        except OSError as e:
            return None, e
    try:
        chunk = 1 << 20
        for base in range(0, size, chunk):
            n = min(chunk, size - base)
            got, e = read(base, n)
            if not any(o < base + n and base < o + ln for o, ln in bad):
                if e is None and got == raw[base:base + n]:
                    nok += n // blk
                    continue
            elif e is None or e.errno != errno.EIO:
                # one bio over good and bad clusters fails as a whole
                fails.append("read %#x+%#x over a bad range: %s" %
                             (base, n, "no EIO" if e is None else e))
            for off in range(base, base + n, blk):
                got, e = read(off, blk)
                if isbad(off):
                    if e is not None and e.errno == errno.EIO:
                        nerr += 1
                    else:
                        fails.append("block %#x (bad range): %s" %
                                     (off, "read %d bytes" % len(got) if e is None else e))
                elif e is not None:
                    fails.append("block %#x: %s" % (off, e))
                elif got != raw[off:off + blk]:
                    fails.append("block %#x differs from %s" % (off, args.raw))
                else:
                    nok += 1
                if len(fails) >= 10:
                    break
        for o, ln in bad:
            for edge in (o, o + ln):
                lo, hi = max(0, edge - blk), min(size, edge + blk)
                if lo < o + ln and o < hi:
                    got, e = read(lo, hi - lo)
                    if e is None or e.errno != errno.EIO:
                        fails.append("read %#x+%#x across an edge of bad range %#x+%#x: %s"
                                     % (lo, hi - lo, o, ln, "no EIO" if e is None else e))
    finally:
        os.close(fd)
    for f in fails:
        print("badread: " + f)
    print("badread: %d blocks EIO, %d blocks equal to %s, %d problems" %
          (nerr, nok, args.raw, len(fails)))
    if not nerr:
        print("badread: no EIO at all")
        return 1
    return 1 if fails else 0


def cmd_phys(args):
    import fcntl
    FS_IOC_FIEMAP = 0xC020660B
    FIEMAP_FLAG_SYNC = 1
    off = parse_size(args.offset)
    hdr = struct.pack("=QQIIII", off, 1, FIEMAP_FLAG_SYNC, 0, 1, 0)
    buf = bytearray(hdr + bytes(56))
    with open(args.file, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
    mapped = struct.unpack_from("=I", buf, 20)[0]
    if mapped < 1:
        raise ValueError("%s: byte %#x is not mapped" % (args.file, off))
    logical, physical, length = struct.unpack_from("=QQQ", buf, 32)
    flags = struct.unpack_from("=I", buf, 32 + 40)[0]
    # FIEMAP_EXTENT_UNKNOWN | DELALLOC | ENCODED | NOT_ALIGNED | DATA_INLINE
    if flags & (0x2 | 0x4 | 0x8 | 0x100 | 0x200) or not logical <= off < logical + length:
        raise ValueError("%s: byte %#x has no plain extent (flags %#x)" % (args.file, off, flags))
    print(physical + off - logical)
    return 0


REC = 32  # text record size


def text_data(length, seed, base):
    """Records '<seed>@<offset of record>' padded to 32 bytes, sliced so
    that byte i of the result is the byte at guest offset base + i."""
    first = base // REC
    last = (base + length + REC - 1) // REC
    out = bytearray()
    for rec in range(first, last):
        line = "s%04x@%013x dm-qcow2 ..." % (seed & 0xFFFF, rec * REC)
        out += line.encode()[:REC - 1].ljust(REC - 1, b".") + b"\n"
    start = base - first * REC
    return bytes(out[start:start + length])


def rand_data(length, seed, base):
    """Pseudo-random bytes; 64-byte blocks keyed by (seed, guest offset)."""
    first = base // 64
    last = (base + length + 63) // 64
    out = bytearray()
    key = b"dmq%d:" % seed
    # blake2b is fast and deterministic everywhere
    for blk in range(first, last):
        out += hashlib.blake2b(key + blk.to_bytes(8, "little"),
                               digest_size=64).digest()
    start = base - first * 64
    return bytes(out[start:start + length])


def gen_data(kind, length, seed, base):
    if kind == "t":
        return text_data(length, seed, base)
    if kind == "r":
        return rand_data(length, seed, base)
    m = re.fullmatch(r"P(0x[0-9a-fA-F]+|\d+)", kind)
    if m:
        return bytes([int(m.group(1), 0) & 0xFF]) * length
    raise ValueError("unknown data kind %r" % kind)


def qemu_io_cmds(specs, tmpdir):
    """Translate SPECs into qemu-io -c commands, writing data files."""
    cmds = []
    for idx, spec in enumerate(specs):
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise ValueError("bad write spec %r (KIND:OFF:LEN[:SEED])" % spec)
        kind = parts[0]
        off = parse_size(parts[1])
        length = parse_size(parts[2])
        seed = int(parts[3], 0) if len(parts) == 4 else idx + 1
        if off < 0 or length <= 0:
            raise ValueError("bad offset/length in %r" % spec)
        if kind == "z":
            cmds.append("write -q -z %d %d" % (off, length))
            continue
        if kind == "zu":
            cmds.append("write -q -z -u %d %d" % (off, length))
            continue
        if kind.startswith("P"):
            val = int(kind[1:], 0)
            cmds.append("write -q -P 0x%x %d %d" % (val, off, length))
            continue
        flags = ""
        if kind in ("ct", "cr"):
            flags = "-c "
            kind = kind[1:]
        data = gen_data(kind, length, seed, off)
        path = os.path.join(tmpdir, "w%d.bin" % idx)
        with open(path, "wb") as f:
            f.write(data)
        cmds.append("write -q %s-s %s %d %d" % (flags, path, off, length))
    return cmds


def cmd_write(args):
    with tempfile.TemporaryDirectory(prefix="dmq-io-",
                                     dir=os.path.dirname(os.path.abspath(args.image))) as tmp:
        cmds = qemu_io_cmds(args.specs, tmp)
        argv = [args.qemu_io, "-f", args.format]
        for c in cmds:
            argv += ["-c", c]
        argv.append(args.image)
        if args.verbose:
            print("+ " + " ".join(argv), file=sys.stderr)
        res = subprocess.run(argv, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        # qemu-io reports errors on stdout and may still exit 0
        out = res.stdout.strip()
        if res.returncode != 0 or out:
            print(out, file=sys.stderr)
            print("dmq_img.py: qemu-io failed on %s (rc=%d)" %
                  (args.image, res.returncode), file=sys.stderr)
            return 1
    return 0


def cmd_fill(args):
    length = parse_size(args.length)
    base = parse_size(args.offset) if args.offset else 0
    data = gen_data(args.kind, length, int(args.seed, 0), base)
    mode = "r+b" if os.path.exists(args.out) and args.at is not None else "wb"
    with open(args.out, mode) as f:
        if args.at is not None:
            f.seek(parse_size(args.at))
        f.write(data)
    return 0


def _logical_block_size(fd):
    """BLKSSZGET of a block device; 512 for anything else."""
    import fcntl
    import stat
    import struct
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return 512
    return struct.unpack("i", fcntl.ioctl(fd, 0x1268, b"\0" * 4))[0]


def _direct_read(fd, off, length):
    """One pread of LENGTH bytes at OFF into a page-aligned buffer."""
    import mmap
    buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
    try:
        got = os.preadv(fd, [memoryview(buf)[:length]], off)
        return bytes(buf[:got])
    finally:
        buf.close()


def _first_diff(a, b):
    step = 4096
    for base in range(0, len(a), step):
        if a[base:base + step] != b[base:base + step]:
            return next(i for i in range(base, min(base + step, len(a)))
                        if a[i] != b[i])
    return len(a)


def cmp_ranges(size, cluster, extra, nrandom, seed, lbs=512):
    """The ranges to compare: (offset, length, direct?). Direct reads only
    where offset and length are multiples of LBS, the device's logical
    block size (the others are read buffered only)."""
    import random
    c = cluster
    ranges = []

    def add(off, length, direct):
        if off < 0 or length <= 0 or off + length > size:
            return
        if direct and (off % lbs or length % lbs):
            direct = False
        ranges.append((off, length, direct))

    for off, length in ((0, 512), (0, 4096), (c - 512, 1024),
                        (c - 1536, 4608), (2 * c - 4096, 8192),
                        (3 * c + 512, 512), (size - 512, 512),
                        (size - 4096, 4096),
                        ((size // 2) // 512 * 512 - 2560, 6144),
                        (c - 2048, min(3 * c, 1 << 20) + 4096),
                        (0, min(size, 4 << 20))):
        add(off, length, True)
    for off, length in ((c - 100, 300), (5 * c + 7, 5000),
                        (size - 333, 333), (c // 2 + 1, c),
                        (7, 9000)):
        add(off, length, False)
    for off, length in extra:
        add(off, length, True)
        add(off + 1, length - 1, False)
    rnd = random.Random(seed)
    nclusters = max(1, size // c)
    for i in range(nrandom):
        # half of them start within a few sectors of a cluster boundary
        if i % 2 == 0:
            base = rnd.randrange(nclusters) * c
            off = base + rnd.randint(-8, 8) * 512
        else:
            off = rnd.randrange(0, max(1, size // 512)) * 512
        length = rnd.choice((512, 1024, 4096, 8192, 65536,
                             rnd.randint(1, 64) * 512,
                             min(2 * c + 4096, 4 << 20)))
        off = max(0, min(off, size - length))
        add(off // lbs * lbs, length, True)
        boff = rnd.randrange(0, max(1, size - 1))
        add(boff, min(rnd.randint(1, 3 * c), size - boff, 1 << 20), False)
    return ranges


def cmd_cmp(args):
    cluster = parse_size(args.cluster)
    extra = []
    for r in args.range:
        off, length = r.split(":")
        extra.append((parse_size(off), parse_size(length)))
    with open(args.raw, "rb") as rf:
        rf.seek(0, 2)
        size = rf.tell()
    dfd = os.open(args.dev, os.O_RDONLY | os.O_DIRECT)
    ranges = cmp_ranges(size, cluster, extra, args.random, args.seed, _logical_block_size(dfd))
    bfd = os.open(args.dev, os.O_RDONLY)
    rfd = os.open(args.raw, os.O_RDONLY)
    bad = 0
    try:
        for off, length, direct in ranges:
            want = os.pread(rfd, length, off)
            for mode in (("direct", "buffered") if direct else ("buffered",)):
                try:
                    if mode == "direct":
                        got = _direct_read(dfd, off, length)
                    else:
                        got = os.pread(bfd, length, off)
                except OSError as e:
                    print("cmp: %s read %d+%d: %s" % (mode, off, length, e))
                    bad += 1
                    continue
                if got == want:
                    continue
                bad += 1
                if len(got) != len(want):
                    print("cmp: %s read %d+%d: short read (%d bytes)" %
                          (mode, off, length, len(got)))
                    continue
                first = _first_diff(got, want)
                print("cmp: %s read %d+%d differs at byte %d (device offset "
                      "%d, cluster %d + %d): got %s want %s" %
                      (mode, off, length, first, off + first,
                       (off + first) // cluster, (off + first) % cluster,
                       got[first:first + 16].hex(),
                       want[first:first + 16].hex()))
                if bad >= 10:
                    print("cmp: giving up after %d mismatches" % bad)
                    return 1
    finally:
        for fd in (dfd, bfd, rfd):
            os.close(fd)
    if args.verbose or bad:
        print("cmp: %d ranges, %d bad" % (len(ranges), bad))
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("header")
    p.add_argument("image")
    p.add_argument("field", nargs="?")

    p = sub.add_parser("patch")
    p.add_argument("image")
    p.add_argument("assignments", nargs="+")

    p = sub.add_parser("fill")
    p.add_argument("out")
    p.add_argument("length")
    p.add_argument("kind")
    p.add_argument("seed")
    p.add_argument("offset", nargs="?",
                   help="guest offset the data is keyed to (default 0)")
    p.add_argument("--at", help="write into OUT at this offset (no truncation)")

    p = sub.add_parser("write")
    p.add_argument("image")
    p.add_argument("specs", nargs="+")
    p.add_argument("-f", "--format", default="qcow2")
    p.add_argument("--qemu-io", default=os.environ.get("QEMU_IO", "qemu-io"))
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("cmp")
    p.add_argument("dev")
    p.add_argument("raw")
    p.add_argument("--cluster", default="64k")
    p.add_argument("--range", action="append", default=[],
                   help="OFF:LEN to check as well (repeatable)")
    p.add_argument("--random", type=int, default=48,
                   help="number of seeded random ranges (default 48)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("entry")
    p.add_argument("image")
    p.add_argument("kind", choices=("l1", "l2", "l2bitmap", "reft", "refb"))
    p.add_argument("where")
    p.add_argument("op", nargs="?", choices=("=", "|=", "+="))
    p.add_argument("value", nargs="?")

    p = sub.add_parser("badread")
    p.add_argument("dev")
    p.add_argument("raw")
    p.add_argument("--bad", action="append", default=[],
                   help="OFF:LEN that must fail with EIO (repeatable)")

    p = sub.add_parser("phys")
    p.add_argument("file")
    p.add_argument("offset")

    p = sub.add_parser("size")
    p.add_argument("text")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "header":
            hdr = read_header(args.image)
            if args.field:
                print(hdr[args.field])
            else:
                print(json.dumps(hdr, indent=1))
            return 0
        if args.cmd == "patch":
            patch_header(args.image, args.assignments)
            return 0
        if args.cmd == "fill":
            return cmd_fill(args)
        if args.cmd == "write":
            return cmd_write(args)
        if args.cmd == "cmp":
            return cmd_cmp(args)
        if args.cmd == "entry":
            if bool(args.op) != bool(args.value):
                raise ValueError("entry: give both OP and VALUE, or neither")
            return cmd_entry(args)
        if args.cmd == "badread":
            return cmd_badread(args)
        if args.cmd == "phys":
            return cmd_phys(args)
        if args.cmd == "size":
            print(parse_size(args.text))
            return 0
    except (OSError, ValueError, KeyError) as e:
        print("dmq_img.py: %s" % e, file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
