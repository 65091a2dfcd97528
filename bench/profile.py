"""Sampling profiles of a server process under load (``python -m bench --profile``):
py-spy records the process's stacks, and the summary names where the time goes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


class Recording:
    """py-spy sampling a process until :meth:`stop`; raw (collapsed) stacks in ``path``."""

    def __init__(self, pid: int, path: Path) -> None:
        beside = Path(sys.executable).parent / "py-spy"  # the bench extra's
        exe = str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"
        self.path = path
        self._log = path.with_suffix(".log").open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--function",  # one frame per function, not per line
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def stop(self) -> list[str]:
        """End the recording (py-spy writes its file on SIGINT) and summarise it."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self._log.close()
        return summarise(self.path)


def summarise(path: Path, top: int = 25) -> list[str]:
    """The functions with most samples, inclusive (anywhere on the stack) and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not total:
        return ["(no samples)"]
    out = [f"{total} samples; inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out.append("self:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return out
