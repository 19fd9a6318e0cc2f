#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Run a command with a fresh eventfd, then wait for the eventfd.

usage: dmq_eventfd.py [--timeout SECONDS] CMD [ARG ...]

Creates an eventfd (os.eventfd), replaces every ARG that is exactly "{efd}"
with its number, runs CMD with the eventfd passed on under that number
(e.g. `dmsetup message NAME 0 merge_backward start {efd} 1`), then waits
until the eventfd becomes readable and prints "eventfd=<counter>".

Exit status: 0 signalled, 1 timed out (prints "eventfd: timeout after N s"),
2 CMD failed (its status is printed), 90 the helper itself failed.
CMD's stdout and stderr pass through.
"""

import argparse
import os
import select
import subprocess
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the eventfd (default 120)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 90
    if not args.cmd:
        print("dmq_eventfd.py: no command", file=sys.stderr)
        return 90
    try:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except (AttributeError, OSError) as e:
        print("dmq_eventfd.py: eventfd: %s" % e, file=sys.stderr)
        return 90
    cmd = [str(efd) if a == "{efd}" else a for a in args.cmd]
    print("+ " + " ".join(cmd) + "   # eventfd %d" % efd, file=sys.stderr)
    sys.stdout.flush()
    try:
        res = subprocess.run(cmd, pass_fds=(efd,), close_fds=True)
    except OSError as e:
        print("dmq_eventfd.py: %s: %s" % (cmd[0], e), file=sys.stderr)
        return 90
    if res.returncode != 0:
        print("dmq_eventfd.py: %s exited with %d" % (cmd[0], res.returncode))
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    poller = select.poll()
    poller.register(efd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print("eventfd: timeout after %g s" % args.timeout)
            return 1
        if poller.poll(min(left, 1.0) * 1000):
            try:
                val = os.eventfd_read(efd)
            except BlockingIOError:
                continue
            print("eventfd=%d after %.1f s" % (val, time.monotonic() - t0))
            return 0


if __name__ == "__main__":
    sys.exit(main())
