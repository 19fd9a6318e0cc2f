#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""A stand-in for dmsetup on hosts without device-mapper (host/run.sh).

It models the dm-qcow2 constructor checks the selftests expect, logs
"qcow2: <message> (<errno>)" lines to $FAKE_STATE/kmsg like the kernel
would, and "maps" a valid table as a regular file $FAKE_STATE/devs/NAME
holding `qemu-img convert -O raw` of the top image; for a writable one
the clusters that differ are written into the top image when removed. It
only tests the selftest scripts, never the target.

It also models the control plane of the spec (messages, merges, status,
table, suspend/resume/reload) on files: the state of a device is
$FAKE_STATE/state/NAME.json; before the files matter (status, merge start
and complete, suspend) the clusters of the "device" that differ from the
top image are written into it. A merge is "copying" for $FAKE_MERGE_SECS
(default 2) seconds, then "ready"; complete runs `qemu-img commit`
(backward) or `qemu-img rebase` (forward). Fault injection and ENOSPC are
not modelled (the argument checks are). FAKE_MERGE_BUG=nocopy (complete
drops the delta without copying it), keep (complete leaves the chain as
it is) or touch (complete also writes into the file the spec says is left
untouched) must make the merge cases fail. The status line carries depth=
and error= like "merge_* progress" (as the driver prints it);
FAKE_STATUS_SPEC=1 prints only the fields the spec lists.
"""
import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), ".."))
import dmq_img  # noqa: E402

STATE = os.environ["FAKE_STATE"]
DEVS = os.path.join(STATE, "devs")
KMSG = os.path.join(STATE, "kmsg")
RW = os.path.join(STATE, "rw")  # NAME: top image of a writable "device"
STATES = os.path.join(STATE, "state")  # NAME.json: see load_state()
MERGE_SECS = float(os.environ.get("FAKE_MERGE_SECS", "2"))
CAP_SYS_ADMIN = 21


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
        raise CtrError("Error attaching file", "-ENOENT")
    if not stat.S_ISREG(st.st_mode):
        raise CtrError("Not a regular file", "-EINVAL")
    if flags & os.O_APPEND:
        raise CtrError("Image opened with O_APPEND", "-EINVAL")
    acc = flags & os.O_ACCMODE
    if acc == os.O_WRONLY:
        raise CtrError("Image is not opened for reading", "-EACCES")
    if writable and index == ntop - 1 and acc != os.O_RDWR:
        raise CtrError("Top image is not opened for writing", "-EACCES")
    # The header checks in the order of Header::parse.
    with open("/proc/self/fd/%d" % fd, "rb") as f:
        raw = f.read(4096)
    if len(raw) < 72:
        raise CtrError("Image header truncated", "-EINVAL")
    h = dmq_img.read_header("/proc/self/fd/%d" % fd)
    if h.get("magic") != dmq_img.QCOW2_MAGIC:
        raise CtrError("Bad qcow2 magic", "-EINVAL")
    if h["version"] not in (2, 3):
        raise CtrError("Unsupported qcow2 version", "-EINVAL")
    if h["version"] == 3 and len(raw) < 104:
        raise CtrError("Image header truncated", "-EINVAL")
    if not 9 <= h["cluster_bits"] <= 21:
        raise CtrError("Bad cluster_bits", "-EINVAL")
    cs = 1 << h["cluster_bits"]
    hlen = h.get("header_length", 72)
    if h["version"] == 3 and (hlen < 104 or hlen % 8 or hlen > cs):
        raise CtrError("Bad header length", "-EINVAL")
    if hlen <= 104:
        h["compression_type"] = 0
    if h["l1_table_offset"] % cs:
        raise CtrError("Misaligned L1 table", "-EINVAL")
    if h["refcount_table_offset"] % cs:
        raise CtrError("Misaligned refcount table", "-EINVAL")
    inc = h.get("incompatible_features", 0)
    ext = bool(inc & 16)
    l1_cover = (cs // (16 if ext else 8)) * cs
    if h["l1_size"] < -(-h["size"] // l1_cover):
        raise CtrError("L1 table too small for virtual size", "-EINVAL")
    if h["l1_size"] > (32 << 20) // 8:
        raise CtrError("L1 table too large", "-EINVAL")
    order = h.get("refcount_order", 4)
    if order > 6:
        raise CtrError("Bad refcount order", "-EINVAL")
    if h["crypt_method"]:
        raise CtrError("Encrypted images are not supported", "-EOPNOTSUPP")
    if inc & 2:
        raise CtrError("Image is marked corrupt", "-EOPNOTSUPP")
    if inc & 4:
        raise CtrError("External data files are not supported", "-EOPNOTSUPP")
    if h.get("compression_type", 0):
        raise CtrError("Only zlib compression is supported", "-EOPNOTSUPP")
    if inc & ~0x1F:
        raise CtrError("Unknown incompatible features", "-EOPNOTSUPP")
    if ext and cs // 32 < 512:
        raise CtrError("Unsupported subcluster size", "-EINVAL")
    if h["refcount_table_clusters"] > (8 << 20) // cs:
        raise CtrError("Refcount table too large", "-EINVAL")
    bfo, bfs = h["backing_file_offset"], h["backing_file_size"]
    if bfo and (bfs > 1023 or bfo > cs or bfo + bfs > cs):
        raise CtrError("Bad backing file name", "-EINVAL")
    if cs < 4096:
        raise CtrError("Cluster size below PAGE_SIZE", "-EOPNOTSUPP")
    rbits = 1 << h.get("refcount_order", 4)
    entries = h["refcount_table_clusters"] * cs // 8
    limit = entries * (cs * 8 // rbits) * cs
    # what a refcount-table move cut short by a crash leaves past that:
    # the new block and table, rounded up to the 128 MiB growth step
    table = -(-max(entries * 16, (entries + 1) * 8) // cs) * cs
    limit = -(-(limit + cs + table) // (128 << 20)) * (128 << 20)
    if st.st_size > limit:
        raise CtrError("File larger than its refcount table describes", "-EFBIG")
    if (writable and index == ntop - 1 and inc & 1 and
            h.get("compatible_features", 0) & 1):
        raise CtrError("Image is dirty: repair it with qemu-img check -r all",
                       "-EINVAL")
    return h


class BadTable(Exception):
    pass


def parse_table(table, readonly):
    """Check a table like the constructor: (length, images, modes)."""
    words = table.split()
    if len(words) < 3 or words[2] != "qcow2":
        raise BadTable(table)
    length = int(words[1])
    fds = words[3:]
    if words[0] != "0":  # dm core refuses it before the constructor runs
        raise CtrError("Gap in table", "-EINVAL")
    if not fds:
        raise CtrError("No images given", "-EINVAL")
    hdrs = []
    inodes = []
    for i, f in enumerate(fds):
        if not f.isdigit():
            raise CtrError("Wrong fd", "-EINVAL")
        fd = int(f)
        hdrs.append(check_image(fd, i, len(fds), not readonly))
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in inodes:
            raise CtrError("Same image file given twice in the chain", "-EINVAL")
        inodes.append((st.st_dev, st.st_ino))
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
    images, modes = [], []
    for f in fds:
        images.append(os.readlink("/proc/self/fd/%s" % f))
        acc = fcntl.fcntl(int(f), fcntl.F_GETFL) & os.O_ACCMODE
        modes.append("rw" if acc == os.O_RDWR else "ro")
    return length, images, modes


def table_error(name, what, e):
    klog("device-mapper: table: 253:0: qcow2: %s (%s)" % (e.msg, e.err))
    klog("device-mapper: ioctl: error adding target to table")
    print("device-mapper: %s ioctl on %s  failed: error" % (what, name),
          file=sys.stderr)
    return 1


def chain_spec(images):
    """The chain IMAGES (base first) as the table sees it, whatever backing
    file names the headers hold: a qemu json: filename of the top."""
    node = None
    for img in images:
        node = {"driver": "qcow2", "backing": node,
                "file": {"driver": "file", "filename": img}}
    return "json:" + json.dumps(node)


def map_table(name, st):
    """(Re)create the "device" file of NAME from the chain of state ST."""
    top = st["images"][-1]
    os.makedirs(DEVS, exist_ok=True)
    dev = os.path.join(DEVS, name)
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw",
                    chain_spec(st["images"]), dev], check=True)
    os.truncate(dev, st["length"] * 512)
    rw = os.path.join(RW, name)
    if st["writable"]:  # written back into the top at remove
        os.makedirs(RW, exist_ok=True)
        with open(rw, "w") as f:
            f.write(top)
    elif os.path.exists(rw):
        os.unlink(rw)
    return dev


def create(name, readonly, table):
    try:
        length, images, modes = parse_table(table, readonly)
    except BadTable:
        print("fake dmsetup: bad table %r" % table, file=sys.stderr)
        return 1
    except CtrError as e:
        return table_error(name, "reload", e)
    st = {"images": images, "modes": modes, "writable": not readonly,
          "length": length, "suspended": False, "merge": None,
          "inactive": None}
    save_state(name, st)
    dev = map_table(name, st)
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


# ------------------------------------------------------- control plane

def state_path(name):
    return os.path.join(STATES, name + ".json")


def load_state(name):
    try:
        with open(state_path(name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def save_state(name, st):
    os.makedirs(STATES, exist_ok=True)
    tmp = state_path(name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.rename(tmp, state_path(name))


def privileged(what):
    """The checks of /dev/mapper/control (0600 root) and of ctl_ioctl."""
    if os.geteuid() != 0:
        print("/dev/mapper/control: open failed: Permission denied\n"
              "Failure to communicate with kernel device-mapper driver.",
              file=sys.stderr)
        return False
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                if not int(line.split()[1], 16) & (1 << CAP_SYS_ADMIN):
                    print("device-mapper: version ioctl on   failed: "
                          "Permission denied\nCommand failed.",
                          file=sys.stderr)
                    return False
    return True


def flush(name, st):
    """Write the clusters of the device that differ from the top into it."""
    if not st["writable"]:
        return
    dev = os.path.join(DEVS, name)
    top = st["images"][-1]
    cs = 1 << dmq_img.read_header(top)["cluster_bits"]
    with tempfile.TemporaryDirectory(dir=STATE) as tmp:
        cur = os.path.join(tmp, "cur.raw")
        spec = chain_spec(st["images"])
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", spec, cur],
                       check=True)
        cmds = []
        with open(dev, "rb") as d, open(cur, "rb") as c:
            off, start, buf = 0, None, bytearray()
            while True:
                a = d.read(cs)
                b = c.read(cs)
                if a and a != b[:len(a)]:
                    if start is None:
                        start, buf = off, bytearray()
                    buf += a
                elif start is not None:
                    path = os.path.join(tmp, "w%d" % len(cmds))
                    with open(path, "wb") as f:
                        f.write(buf)
                    cmds.append("write -q -s %s %d %d" % (path, start, len(buf)))
                    start = None
                if not a:
                    break
                off += len(a)
        for i in range(0, len(cmds), 200):
            argv = ["qemu-io"]
            for c in cmds[i:i + 200]:
                argv += ["-c", c]
            res = subprocess.run(argv + [spec], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            if res.returncode or res.stdout.strip():
                raise RuntimeError("qemu-io %s: %s" % (top, res.stdout))


def count_clusters(img):
    """Data clusters IMG itself maps (what its L2 tables reference)."""
    cs = 1 << dmq_img.read_header(img)["cluster_bits"]
    res = subprocess.run(["qemu-img", "map", "-U", "-f", "qcow2",
                          "--output=json", img], stdout=subprocess.PIPE,
                         check=True)
    seen = set()
    for e in json.loads(res.stdout):
        if e.get("depth") == 0 and e.get("data"):
            seen.update(range(e["start"] // cs,
                              (e["start"] + e["length"] - 1) // cs + 1))
    return len(seen)


def open_elsewhere(path):
    """Does another process have PATH open?"""
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == path:
                    return True
            except OSError:
                pass
    return False


def merge_stage(m):
    """(stage, progress, error) of merge M (None: no merge)."""
    if not m:
        return "none", 0, 0
    el = time.time() - m["t0"]
    pct = min(100, int(100 * el / MERGE_SECS))
    if m.get("error"):
        return "failed", min(pct, 99), m["error"]
    if el >= MERGE_SECS:
        return "ready", 100, 0
    return "copying", pct, 0


def describe(m):
    """The fields of "merge_* progress" (also in the status line)."""
    stage, pct, err = merge_stage(m)
    return "merge=%s depth=%d stage=%s progress=%d error=%d" % (
        m["kind"] if m else "none", m["depth"] if m else 0, stage, pct, err)


def signal_later(name, token, efd):
    """A child that holds the eventfd and counts 1 at ready or failed."""
    if os.fork():
        return
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, efd)
        os.closerange(efd + 1, 1024)
        end = time.time() + 600
        while time.time() < end:
            time.sleep(0.05)
            st = load_state(name)
            m = st and st["merge"]
            if not m or m["token"] != token:
                break
            if merge_stage(m)[0] in ("ready", "failed"):
                os.write(efd, (1).to_bytes(8, sys.byteorder))
                break
    finally:
        os._exit(0)


class MsgError(Exception):
    def __init__(self, err):
        super().__init__(err)
        self.err = err


def number(word):
    try:
        return int(word, 10)
    except (TypeError, ValueError):
        raise MsgError(errno.EINVAL)


def merge_msg(name, st, kind, words):
    sub = words[0] if words else None
    m = st["merge"]
    n = len(st["images"])
    if sub in ("progress", "cancel", "complete") and len(words) != 1:
        raise MsgError(errno.EINVAL)
    if sub == "progress":
        stage, pct, err = merge_stage(m)
        return describe(m if m and m["kind"] == kind else None) + "\n"
    if sub == "cancel":
        if not m or m["kind"] != kind:
            return ""  # always succeeds (the C target)
        st["merge"] = None
        save_state(name, st)
        return ""
    if sub == "complete":
        if st["suspended"] or not m or m["kind"] != kind or \
                merge_stage(m)[0] != "ready":
            raise MsgError(errno.EBUSY)
        flush(name, st)
        imgs = st["images"]
        bug = os.environ.get("FAKE_MERGE_BUG", "")
        if kind == "backward":
            top = n - 1 - m["depth"]
            if bug != "nocopy":
                # the target moves clusters out of a merged delta it may
                # write (qemu-img commit empties it without -d)
                rw = st["modes"][top] == "rw" or (st["writable"] and top == n - 1)
                keep = [] if rw else ["-d", "-b", imgs[top - 1]]
                subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2"] +
                               keep + [imgs[top]], check=True)
            gone = top
        else:
            low = n - 1 - m["depth"]
            cmd = ["qemu-img", "rebase", "-q", "-f", "qcow2"]
            cmd += ["-F", "qcow2", "-b", imgs[low - 1]] if low else ["-b", ""]
            if bug == "nocopy":
                cmd.insert(2, "-u")
            subprocess.run(cmd + [imgs[low + 1]], check=True)
            gone = low
        if bug == "touch":
            subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                            "write -q -P 0x99 0 4k", imgs[gone]], check=True)
        if bug != "keep":
            del st["images"][gone]
            del st["modes"][gone]
        if not open_elsewhere(os.path.join(DEVS, name)):
            # the device reads what the files say now (unless fio & co.
            # are writing to it: they would race with this)
            subprocess.run(["qemu-img", "convert", "-n", "-U", "-O", "raw",
                            chain_spec(st["images"]),
                            os.path.join(DEVS, name)], check=True)
        st["merge"] = None
        if st["writable"]:
            with open(os.path.join(RW, name), "w") as f:
                f.write(st["images"][-1])
        save_state(name, st)
        return ""
    if sub != "start" or len(words) < 2 or len(words) > 3:
        raise MsgError(errno.EINVAL)
    # the kernel's order: parse (an int, a usize), then the state
    efd = number(words[1])
    depth = number(words[2]) if len(words) > 2 else (0 if kind == "backward" else 1)
    if not -2**31 <= efd < 2**31 or not 0 <= depth < 2**64:
        raise MsgError(errno.EINVAL)
    if st["suspended"]:
        raise MsgError(errno.EBUSY)
    if efd != -1:
        try:
            if efd < 0:
                raise OSError(errno.EBADF, "negative")
            os.fstat(efd)
        except OSError:
            raise MsgError(errno.EBADF)
    # a failed merge is over: a new one may start at once (the C target)
    if m and merge_stage(m)[0] != "failed":
        raise MsgError(errno.EBUSY)
    lo, hi = (0, n - 2) if kind == "backward" else (1, n - 1)
    if not lo <= depth <= hi:
        raise MsgError(errno.ENOENT)
    if kind == "backward":
        top = n - 1 - depth
        if st["modes"][top - 1] != "rw":
            raise MsgError(errno.EACCES)
        if dmq_img.virtual_size(st["images"][top - 1]) < \
                dmq_img.virtual_size(st["images"][top]):
            raise MsgError(errno.EBADSLT)
    else:
        up = n - depth
        if st["modes"][up] != "rw" and not (st["writable"] and up == n - 1):
            raise MsgError(errno.EACCES)
    flush(name, st)
    token = "%d.%f" % (os.getpid(), time.time())
    st["merge"] = {"kind": kind, "depth": depth, "t0": time.time(),
                   "token": token, "error": 0}
    save_state(name, st)
    if efd >= 0:
        signal_later(name, token, efd)
    return ""


def message(name, words):
    st = load_state(name)
    if st is None:
        print("device-mapper: message ioctl on %s  failed: No such device "
              "or address" % name, file=sys.stderr)
        return 1
    if not words:
        print("No message supplied.", file=sys.stderr)
    try:
        out = message_words(name, st, words)
    except MsgError as e:
        print("device-mapper: message ioctl on %s  failed: %s\nCommand failed."
              % (name, os.strerror(e.err)), file=sys.stderr)
        return 1
    # as dmsetup: a response without a final newline gets one
    sys.stdout.write(out if not out or out.endswith("\n") else out + "\n")
    return 0


def message_words(name, st, words):
    if not words:
        raise MsgError(errno.EINVAL)
    cmd, rest = words[0], words[1:]
    n = len(st["images"])
    if cmd in ("get_img_name", "get_img_id"):
        i = number(rest[0] if rest else None)
        if i < 0:
            raise MsgError(errno.EINVAL)
        return st["images"][i] if i < n else ""
    if cmd == "get_img_fd":
        i = number(rest[0] if rest else None)
        if not 0 <= i < n:
            return ""
        return "%d\n" % os.open(st["images"][i], os.O_RDONLY)
    if cmd == "get_errors":
        return "wants_check=0\nmd_writeback_error=0\ntruncate_error=0\n"
    if cmd == "get_event":
        return ""
    if cmd == "set_fault_injection":
        if len(rest) != 2:
            raise MsgError(errno.EINVAL)
        i, ratio = number(rest[0]), number(rest[1])
        if not 0 <= ratio <= 100000:
            raise MsgError(errno.EINVAL)
        if not 0 <= i < n:
            raise MsgError(errno.ENOENT)
        m = st["merge"]
        if ratio and m and merge_stage(m)[0] == "copying":
            src = n - 1 - m["depth"]
            dst = src - 1 if m["kind"] == "backward" else src + 1
            if i in (src, dst):
                m["error"] = errno.EIO
                save_state(name, st)
        return ""
    if cmd in ("merge_backward", "merge_forward"):
        return merge_msg(name, st, cmd[len("merge_"):], rest)
    raise MsgError(errno.EBUSY if st["suspended"] else errno.ENOTTY)


def status(name, table):
    st = load_state(name)
    if st is None:
        print("Device %s not found" % name, file=sys.stderr)
        return 1
    top = st["images"][-1]
    hdr = dmq_img.read_header(top)
    head = "0 %d qcow2 " % st["length"]
    if table:
        print(head + "%d v%d %d" % (len(st["images"]), hdr["version"],
                                    (1 << hdr["cluster_bits"]) // 512))
        return 0
    flush(name, st)
    if os.environ.get("FAKE_STATUS_SPEC"):  # exactly the spec's fields
        m = st["merge"]
        stage, pct, _ = merge_stage(m)
        merge = "merge=%s stage=%s progress=%d" % (
            m["kind"] if m else "none", stage, pct)
    else:  # the driver adds depth= and error= (as in "merge_* progress")
        merge = describe(st["merge"])
    print(head + "images=%d wants_check=0 md_writeback_error=0 "
          "truncate_error=0 enospc=0 %s clusters=%s fast_bios=0 "
          "express_flushes=0 fast_fua=0" % (
              len(st["images"]), merge,
              ",".join(str(count_clusters(i)) for i in st["images"])))
    return 0


def suspend(name):
    st = load_state(name)
    if st is None:
        return 1
    flush(name, st)
    st["suspended"] = True
    st["merge"] = None
    save_state(name, st)
    return 0


def resume(name):
    st = load_state(name)
    if st is None:
        return 1
    if st["inactive"]:
        flush(name, st)
        st.update(st["inactive"])
        st["inactive"] = None
        map_table(name, st)
    st["suspended"] = False
    save_state(name, st)
    return 0


def reload(name, readonly, table):
    st = load_state(name)
    if st is None:
        return 1
    try:
        length, images, modes = parse_table(table, readonly)
    except BadTable:
        print("fake dmsetup: bad table %r" % table, file=sys.stderr)
        return 1
    except CtrError as e:
        return table_error(name, "reload", e)
    st["inactive"] = {"images": images, "modes": modes,
                      "writable": not readonly, "length": length}
    save_state(name, st)
    return 0


KNOWN_OPTS = ("--retry", "--force", "-c", "--noheadings", "-o", "--readonly",
              "--table", "-v")


def main(argv):
    end = argv.index("--") if "--" in argv else len(argv)
    for a in argv[:end]:  # like getopt: "-1" is an option, and unknown
        if a.startswith("-") and a not in KNOWN_OPTS:
            print("dmsetup: invalid option -- '%s'\nCouldn't process command "
                  "line." % a.lstrip("-")[:1], file=sys.stderr)
            return 1
    if end < len(argv):  # getopt's end of options
        argv = argv[:end] + argv[end + 1:]
    opts = argv[:argv.index("message") + 1] if "message" in argv else argv
    args = [a for a in opts if a not in ("--retry", "--force", "-c",
                                         "--noheadings")]
    args += argv[len(opts):]  # message words as they are
    if not args:
        return 1
    cmd = args[0]
    if not privileged(cmd):
        return 1
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
            st = load_state(name[-1])
            if st is not None and st["writable"]:
                flush(name[-1], st)  # the clusters written into the top
            if os.path.exists(rw):
                os.unlink(rw)
            os.unlink(path)
            if os.path.exists(state_path(name[-1])):
                os.unlink(state_path(name[-1]))
        else:
            print("Name: %s\nState: ACTIVE (READ-ONLY)" % name[-1])
        return 0
    if cmd == "create":
        name = args[1]
        readonly = "--readonly" in args
        table = args[args.index("--table") + 1]
        return create(name, readonly, table)
    if cmd == "reload":
        table = args[args.index("--table") + 1]
        return reload(args[1], "--readonly" in args, table)
    if cmd == "message":
        return message(args[1], args[3:])
    if cmd in ("status", "table"):
        return status(args[1], cmd == "table")
    if cmd == "suspend":
        return suspend(args[1])
    if cmd == "resume":
        return resume(args[1])
    print("fake dmsetup: unsupported %r" % argv, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
