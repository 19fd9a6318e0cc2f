#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Runs the selftests' Python helpers (dmq_img.py, dmq_open.py) without a
Python start-up per call.

Under TCG a fresh interpreter that imports argparse, subprocess and the
helper costs 1.5-2 s before it does any work; the suite calls the helpers
some thousand times. This server imports them once and forks a child per
request, which runs the helper's main() exactly as its own process would:
its own working directory, environment, stdout/stderr files, and exit
code. lib.sh's dmq_py is the client; it falls back to a plain
interpreter when the server is not running.

usage: dmq_pysrv.py DIR

DIR holds the protocol files: "go" and "done" (FIFOs), "req" (the request:
NUL-separated cwd, helper name, argument count, the arguments, then
NAME=VALUE of the client's exported variables), "out" and "err" (the
child's stdout and stderr). One request at a time (the client holds a
flock on DIR/lock); the server ends when "go" reads "quit" or its parent
(the test script) is gone.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import dmq_img  # noqa: E402
import dmq_open  # noqa: E402

HELPERS = {"dmq_img": dmq_img.main, "dmq_open": dmq_open.main}


def serve_one(d, req):
    parts = req.split(b"\0")
    cwd = parts[0].decode()
    name = parts[1].decode()
    n = int(parts[2])
    argv = [p.decode("utf-8", "surrogateescape") for p in parts[3:3 + n]]
    env = {}
    for kv in parts[3 + n:]:
        if b"=" in kv:
            k, v = kv.split(b"=", 1)
            env[k.decode("utf-8", "surrogateescape")] = v.decode(
                "utf-8", "surrogateescape")
    out = os.open(os.path.join(d, "out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(os.path.join(d, "err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pid = os.fork()
    if pid == 0:
        rc = 70
        try:
            nul = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nul, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            for fd in (nul, out, err):
                os.close(fd)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.environ.clear()
            os.environ.update(env)
            os.chdir(cwd)
            sys.argv = [os.path.join(HERE, name + ".py")] + argv
            try:
                rc = HELPERS[name](argv)
            except SystemExit as e:
                rc = e.code
            if rc is None:
                rc = 0
            elif not isinstance(rc, int):
                print(rc, file=sys.stderr)
                rc = 1
        except BaseException as e:  # noqa: B902 - report, never hang the client
            import traceback
            traceback.print_exc()
            print("dmq_pysrv: %s" % e, file=sys.stderr)
            rc = 70
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc & 0xff)
    os.close(out)
    os.close(err)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 128 + os.WTERMSIG(status)


def main():
    d = sys.argv[1]
    parent = os.getppid()
    while True:
        with open(os.path.join(d, "go"), "rb") as f:
            msg = f.read()
        if msg.strip() == b"quit" or os.getppid() != parent:
            return 0
        with open(os.path.join(d, "req"), "rb") as f:
            req = f.read()
        try:
            rc = serve_one(d, req)
        except (OSError, ValueError, IndexError, KeyError) as e:
            with open(os.path.join(d, "err"), "a") as f:
                print("dmq_pysrv: bad request: %s" % e, file=f)
            rc = 70
        with open(os.path.join(d, "done"), "w") as f:
            f.write("%d\n" % rc)


if __name__ == "__main__":
    sys.exit(main())
