#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Create a dm-qcow2 device: open the images, pass their fds to dmsetup.

usage: dmq_open.py [options] NAME [SPEC ...]

Each SPEC is one delta, base first, top last: "[MODE:]PATH" or "fd:N".
MODE is how the file is opened (all modes but "cached" add O_DIRECT):
  ro      O_RDONLY|O_DIRECT (default; also the top's default without --rw)
  rw      O_RDWR|O_DIRECT   (the top's default with --rw)
  wo      O_WRONLY|O_DIRECT
  cached  O_RDONLY, no O_DIRECT
  cachedrw O_RDWR, no O_DIRECT
  append  O_RDWR|O_DIRECT|O_APPEND
  roappend O_RDONLY|O_DIRECT|O_APPEND
  dir     PATH is a directory: O_RDONLY|O_DIRECTORY (O_DIRECT if allowed)
  pipe    PATH ignored: the read end of a pipe with O_DIRECT set
          (a readable, O_DIRECT, non-regular fd)
  closed  PATH ignored: a number that is not an open fd (990 + index)
  fd      "fd:N" passes N verbatim and opens nothing (e.g. fd:999)

The table is "0 LEN qcow2 FD..." (--start changes the 0). LEN defaults to the top's virtual size
in sectors: read from the top's qcow2 header, or from
`qemu-img info --output=json` if the header is not qcow2. Without --rw
dmsetup gets --readonly. The exit status is dmsetup's, or 90 if the helper itself failed.

With --then CMD the helper keeps the images' fds open after dmsetup
succeeded (the table holds the same open files), runs CMD with sh and
exits with its status; --append-after first sets O_APPEND on those fds
(fcntl F_SETFL: the flags of the files the table uses change under it).
"""

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import dmq_img  # noqa: E402

MODES = ("ro", "rw", "wo", "cached", "cachedrw", "append", "roappend",
         "dir", "pipe", "closed", "fd")


def parse_spec(spec):
    if ":" in spec:
        mode, rest = spec.split(":", 1)
        if mode in MODES:
            return mode, rest
    return None, spec


def qemu_img_virtual_size(path):
    qemu_img = os.environ.get("QEMU_IMG", "qemu-img")
    res = subprocess.run([qemu_img, "info", "-U", "--output=json", path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        return None
    try:
        return int(json.loads(res.stdout)["virtual-size"])
    except (ValueError, KeyError):
        return None


def image_sectors(path):
    size = dmq_img.virtual_size(path)
    if size is None:
        size = qemu_img_virtual_size(path)
    if size is None:
        return None
    return size // 512


class Opener:
    def __init__(self):
        self.keep = []  # fds to close after dmsetup ran
        self.images = []  # fds of image files (not pipes or directories)

    def open(self, mode, path, index):
        """Return the fd string for the table and the fd to pass, if any."""
        if mode == "fd":
            return path, None
        if mode == "closed":
            num = 990 + index
            try:
                os.fstat(num)
            except OSError:
                return str(num), None
            raise RuntimeError("fd %d unexpectedly open" % num)
        if mode == "pipe":
            rfd, wfd = os.pipe()
            fl = fcntl.fcntl(rfd, fcntl.F_GETFL)
            fcntl.fcntl(rfd, fcntl.F_SETFL, fl | os.O_DIRECT)
            self.keep += [rfd, wfd]
            return str(rfd), rfd
        if mode == "dir":
            base = os.O_RDONLY | os.O_DIRECTORY
            try:
                fd = os.open(path, base | os.O_DIRECT)
            except OSError:
                fd = os.open(path, base)
        else:
            flags = {
                "ro": os.O_RDONLY | os.O_DIRECT,
                "rw": os.O_RDWR | os.O_DIRECT,
                "wo": os.O_WRONLY | os.O_DIRECT,
                "cached": os.O_RDONLY,
                "cachedrw": os.O_RDWR,
                "append": os.O_RDWR | os.O_DIRECT | os.O_APPEND,
                "roappend": os.O_RDONLY | os.O_DIRECT | os.O_APPEND,
            }[mode]
            fd = os.open(path, flags)
            self.images.append(fd)
        self.keep.append(fd)
        return str(fd), fd

    def close(self):
        for fd in self.keep:
            try:
                os.close(fd)
            except OSError:
                pass
        self.keep = []


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="device name (/dev/mapper/NAME)")
    ap.add_argument("specs", nargs="*", metavar="SPEC",
                    help="[MODE:]PATH or fd:N, base first, top last")
    ap.add_argument("--rw", action="store_true",
                    help="writable table (no --readonly); top opened O_RDWR "
                         "unless its SPEC gives a mode")
    ap.add_argument("--length", type=int,
                    help="table length in sectors (default: top's size)")
    ap.add_argument("--start", type=int, default=0,
                    help="the target's first sector (default 0)")
    ap.add_argument("--extra-sectors", type=int, default=0,
                    help="add this to the default length")
    ap.add_argument("--dmsetup", default=os.environ.get("DMSETUP", "dmsetup"))
    ap.add_argument("--dmsetup-opt", action="append", default=[],
                    help="extra option for dmsetup create (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the command, do not run dmsetup")
    ap.add_argument("--then", metavar="CMD",
                    help="after dmsetup succeeded, run CMD (sh -c) with "
                         "the image fds still open; exit with its status")
    ap.add_argument("--append-after", action="store_true",
                    help="with --then: set O_APPEND on the image fds first")
    try:
        args = ap.parse_intermixed_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 90

    specs = [parse_spec(s) for s in args.specs]
    # the top's default mode depends on --rw
    resolved = []
    for i, (mode, path) in enumerate(specs):
        if mode is None:
            mode = "rw" if (args.rw and i == len(specs) - 1) else "ro"
        resolved.append((mode, path))

    length = args.length
    if length is None:
        top = None
        for mode, path in reversed(resolved):
            if mode not in ("fd", "closed", "pipe", "dir"):
                top = path
                break
        if top is None:
            print("dmq_open.py: no image to take the length from; "
                  "give --length", file=sys.stderr)
            return 90
        length = image_sectors(top)
        if length is None:
            print("dmq_open.py: cannot get the virtual size of %s; "
                  "give --length" % top, file=sys.stderr)
            return 90
        length += args.extra_sectors

    opener = Opener()
    try:
        fds = []
        pass_fds = []
        for i, (mode, path) in enumerate(resolved):
            num, fd = opener.open(mode, path, i)
            fds.append(num)
            if fd is not None:
                pass_fds.append(fd)
        table = " ".join([str(args.start), str(length), "qcow2"] + fds)
        cmd = [args.dmsetup, "create", args.name]
        if not args.rw:
            cmd.append("--readonly")
        cmd += args.dmsetup_opt
        cmd += ["--table", table]
        print("+ " + " ".join(shlex.quote(c) for c in cmd)
              + "   # " + " ".join("%s=%s:%s" % (n, m, p)
                                  for n, (m, p) in zip(fds, resolved)),
              file=sys.stderr)
        if args.dry_run:
            return 0
        res = subprocess.run(cmd, pass_fds=pass_fds, close_fds=True)
        if res.returncode != 0 or args.then is None:
            return res.returncode
        if args.append_after:
            for fd in opener.images:
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_APPEND)
            print("# O_APPEND set on fds %s" % opener.images, file=sys.stderr)
        return subprocess.run(["sh", "-c", args.then]).returncode
    except OSError as e:
        print("dmq_open.py: %s" % e, file=sys.stderr)
        return 90
    finally:
        opener.close()


if __name__ == "__main__":
    sys.exit(main())
