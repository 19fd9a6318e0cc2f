#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""A stand-in for dmsetup on hosts without device-mapper (host/run.sh).

It models the dm-qcow2 constructor checks the selftests expect, logs
"qcow2: <message> (<errno>)" lines to $FAKE_STATE/kmsg like the kernel
would, and "maps" a valid table as a regular file $FAKE_STATE/devs/NAME
holding `qemu-img convert -O raw` of the top image; a writable one is
converted back into the top image when removed. It only tests the
selftest scripts, never the target.
"""
import fcntl
import os
import stat
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), ".."))
import dmq_img  # noqa: E402

STATE = os.environ["FAKE_STATE"]
DEVS = os.path.join(STATE, "devs")
KMSG = os.path.join(STATE, "kmsg")
RW = os.path.join(STATE, "rw")  # NAME: top image of a writable "device"


class CtrError(Exception):
    def __init__(self, msg, err):
        super().__init__(msg)
        self.msg, self.err = msg, err


def klog(line):
    with open(KMSG, "a") as f:
        f.write("[    1.000000] " + line + "\n")


def check_image(fd, index, ntop, writable):
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise CtrError("Wrong fd", "-EBADF")
    if not stat.S_ISREG(st.st_mode):
        raise CtrError("Not a regular file", "-EINVAL")
    if not flags & os.O_DIRECT:
        raise CtrError("Image opened in cached mode, need O_DIRECT", "-EINVAL")
    acc = flags & os.O_ACCMODE
    if acc == os.O_WRONLY:
        raise CtrError("Image is not opened for reading", "-EACCES")
    if writable and index == ntop - 1 and acc != os.O_RDWR:
        raise CtrError("Top image is not opened for writing", "-EACCES")
    h = dmq_img.read_header("/proc/self/fd/%d" % fd)
    if h.get("magic") != dmq_img.QCOW2_MAGIC:
        raise CtrError("Bad qcow2 magic", "-EINVAL")
    if h["version"] not in (2, 3):
        raise CtrError("Unsupported qcow2 version", "-EINVAL")
    if not 9 <= h["cluster_bits"] <= 21:
        raise CtrError("Bad cluster_bits", "-EINVAL")
    cs = 1 << h["cluster_bits"]
    if h["l1_table_offset"] % cs:
        raise CtrError("Misaligned L1 table", "-EINVAL")
    if h["refcount_table_offset"] % cs:
        raise CtrError("Misaligned refcount table", "-EINVAL")
    if h["crypt_method"]:
        raise CtrError("Encrypted images are not supported", "-EOPNOTSUPP")
    inc = h.get("incompatible_features", 0)
    if inc & 2:
        raise CtrError("Image is marked corrupt", "-EOPNOTSUPP")
    if inc & 4:
        raise CtrError("External data files are not supported", "-EOPNOTSUPP")
    if inc & 8 or h.get("compression_type", 0):
        raise CtrError("Only zlib compression is supported", "-EOPNOTSUPP")
    if inc & ~0x1F:
        raise CtrError("Unknown incompatible features", "-EOPNOTSUPP")
    if cs < 4096:
        raise CtrError("Cluster size below PAGE_SIZE", "-EOPNOTSUPP")
    rbits = 1 << h.get("refcount_order", 4)
    limit = h["refcount_table_clusters"] * cs // 8 * (cs * 8 // rbits) * cs
    if st.st_size > limit:
        raise CtrError("File larger than its refcount table describes", "-EFBIG")
    return h


def create(name, readonly, table):
    words = table.split()
    if len(words) < 3 or words[2] != "qcow2":
        print("fake dmsetup: bad table %r" % table, file=sys.stderr)
        return 1
    length = int(words[1])
    fds = words[3:]
    try:
        if not fds:
            raise CtrError("No images given", "-EINVAL")
        hdrs = []
        for i, f in enumerate(fds):
            try:
                fd = int(f)
            except ValueError:
                raise CtrError("Wrong fd", "-EBADF")
            hdrs.append(check_image(fd, i, len(fds), not readonly))
        if hdrs[0]["backing_file_offset"]:
            raise CtrError("Base image has a backing file", "-ENOENT")
        for lo, hi in zip(hdrs, hdrs[1:]):
            if lo["cluster_bits"] != hi["cluster_bits"]:
                raise CtrError("Deltas differ in cluster size", "-EXDEV")
            if (lo.get("incompatible_features", 0) ^
                    hi.get("incompatible_features", 0)) & 16:
                raise CtrError("Deltas differ in extended L2", "-EXDEV")
            if lo["size"] > hi["size"]:
                raise CtrError("Lower delta larger than the one above it",
                               "-EBADSLT")
        if length * 512 > hdrs[-1]["size"]:
            raise CtrError("Top image smaller than the table", "-EBADSLT")
    except CtrError as e:
        klog("device-mapper: table: 253:0: qcow2: %s (%s)" % (e.msg, e.err))
        klog("device-mapper: ioctl: error adding target to table")
        print("device-mapper: reload ioctl on %s  failed: error" % name,
              file=sys.stderr)
        return 1
    top = os.readlink("/proc/self/fd/%s" % fds[-1])
    os.makedirs(DEVS, exist_ok=True)
    dev = os.path.join(DEVS, name)
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                    top, dev], check=True)
    os.truncate(dev, length * 512)
    if not readonly:  # written back into the top at remove
        os.makedirs(RW, exist_ok=True)
        with open(os.path.join(RW, name), "w") as f:
            f.write(top)
    corrupt = os.environ.get("FAKE_CORRUPT")
    if corrupt:  # flip a byte at this offset to check that tests notice
        with open(dev, "r+b") as f:
            f.seek(int(corrupt, 0))
            b = f.read(1)
            f.seek(int(corrupt, 0))
            f.write(bytes([(b[0] if b else 0) ^ 0xFF]))
    if os.environ.get("FAKE_WARN"):
        klog("WARNING: CPU: 0 PID: 1 at drivers/md/dm-qcow2 fake")
    return 0


def main(argv):
    args = [a for a in argv if a not in ("--retry", "--force", "-c",
                                         "--noheadings")]
    if not args:
        return 1
    cmd = args[0]
    if cmd == "version":
        print("Library version:   fake\nDriver version:    fake")
        return 0
    if cmd == "targets":
        print("qcow2            v0.0.0")
        print("striped          v1.6.0")
        return 0
    if cmd == "ls":
        names = sorted(os.listdir(DEVS)) if os.path.isdir(DEVS) else []
        if not names:
            print("No devices found")
        for n in names:
            print("%s\t(253:0)" % n)
        return 0
    if cmd == "mknodes":
        return 0
    if cmd in ("info", "remove"):
        name = [a for a in args[1:] if not a.startswith("-")
                and a not in ("minor",)]
        if "-o" in args:
            return 0 if os.path.exists(os.path.join(DEVS, name[-1])) else 1
        path = os.path.join(DEVS, name[-1]) if name else ""
        if not os.path.exists(path):
            print("Device %s not found" % (name[-1] if name else ""),
                  file=sys.stderr)
            return 1
        if cmd == "remove":
            rw = os.path.join(RW, name[-1])
            if os.path.exists(rw):
                with open(rw) as f:
                    top = f.read()
                subprocess.run(["qemu-img", "convert", "-n", "-f", "raw",
                                "-O", "qcow2", path, top], check=True)
                os.unlink(rw)
            os.unlink(path)
        else:
            print("Name: %s\nState: ACTIVE (READ-ONLY)" % name[-1])
        return 0
    if cmd == "create":
        name = args[1]
        readonly = "--readonly" in args
        table = args[args.index("--table") + 1]
        return create(name, readonly, table)
    print("fake dmsetup: unsupported %r" % argv, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
