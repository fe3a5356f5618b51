"""Child Pythons forked from one warm process: each child is a real process of its own (its pid, SIGKILL, its first
forward), without paying torch's and transformers' imports again (4-8 s a process on CI's cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys, traceback
    import torch, transformers, mistudio
    from transformers import AutoModel, AutoTokenizer  # transformers' lazy modules, resolved once: the model
    import transformers.models.gpt2.modeling_gpt2  # class's import was 3/4 of a child's time to its first batch
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children: a dead one is gone
    child = compile(sys.argv[1], "<child>", "exec")
    for line in sys.stdin:
        argv, env = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.stdin.close()
            sys.argv = ["-c", *argv]
            os.environ.update(env)
            try:
                exec(child, {"__name__": "__main__"})
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            sys.stdout.flush()
            os._exit(0)
        print("pid", pid, flush=True)
""")


class Zygote:
    """Starts runs of ``child`` (Python source that prints its job id first, as ``python -c child argv...``) as
    forks of one warm process; ``start`` returns (pid, the child's first line). Children are reaped by the kernel:
    poll them with ``alive``."""

    def __init__(self, child: str):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, child], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def start(self, *argv: str, env: dict | None = None) -> tuple[int, str]:
        self.proc.stdin.write(json.dumps([argv, env or {}]) + "\n")
        self.proc.stdin.flush()
        said: dict[str, str] = {}
        while len(said) < 2:  # the fork's pid and the child's first line, in either order
            line = self.proc.stdout.readline()
            assert line, "the zygote ended"
            word, _, value = line.strip().partition(" ")
            said["pid" if word == "pid" else "job"] = value if word == "pid" else line.strip()
        return int(said["pid"]), said["job"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
