"""Child Pythons forked from a warm process, for the scripts' --quick smoke runs.

A fresh interpreter pays 4-7 s of CPU to import torch and transformers; a --quick run spawns several, so most of
its time was imports. ``ForkServer`` forks once, early, before the script computes anything (torch's OpenMP pool
and zarr's event loop are not fork-safe once started), and forks every child from that copy: each child is still
a process of its own (its own argv, stdout, stderr, exit status, time limit), but starts with the imports done.
The full runs keep fresh interpreters: their figures (peak RSS of a fresh process, one step's failure leaving
the others') are what they measure.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback


def forked(code: str, argv: list[str], limit_s: float) -> tuple[int | str, str, str]:
    """Run ``code`` as ``python -c code *argv`` would, in a fork of this process: (exit status or "timeout",
    stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
                sys.argv = ["-c", *argv]
                exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - our own steps
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - printed as Python would, exit status 1
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(status)
        deadline = time.monotonic() + limit_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc: int | str = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = "timeout"
                break
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        return rc, out.read(), err.read()


class ForkServer:
    """A copy of this process, forked now, that forks the children ``run`` asks for. Create it before the
    script computes (no threads yet); ``preload``: modules to import first (transformers' lazy model modules)."""

    def __init__(self, preload: tuple[str, ...] = ()):
        for name in preload:
            importlib.import_module(name)
        requests_r, requests_w = os.pipe()
        results_r, results_w = os.pipe()
        sys.stdout.flush(), sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(requests_w), os.close(results_r)
            try:
                with os.fdopen(requests_r) as requests, os.fdopen(results_w, "w") as results:
                    for line in requests:
                        code, argv, limit_s = json.loads(line)
                        results.write(json.dumps(forked(code, argv, limit_s)) + "\n")
                        results.flush()
            finally:
                os._exit(0)
        os.close(requests_r), os.close(results_w)
        self.requests, self.results = os.fdopen(requests_w, "w"), os.fdopen(results_r)

    def run(self, code: str, argv: list[str] = (), limit_s: float = 600) -> tuple[int | str, str, str]:
        """``forked(code, argv, limit_s)`` in a child of the server."""
        self.requests.write(json.dumps([code, list(argv), limit_s]) + "\n")
        self.requests.flush()
        line = self.results.readline()
        if not line:
            raise RuntimeError("the fork server ended")
        return tuple(json.loads(line))

    def check_output(self, code: str, argv: list[str] = ()) -> str:
        """Like ``subprocess.run([python, "-c", code, *argv], check=True).stdout``."""
        rc, out, err = self.run(code, argv)
        if rc != 0:
            raise RuntimeError(f"a forked child exited with {rc}:\n{err[-3000:]}")
        return out

    def close(self) -> None:
        self.requests.close()
        self.results.close()
        os.waitpid(self.pid, 0)
