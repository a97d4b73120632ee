"""`--report PATH` for the benchmark scripts: what a run prints, also written to PATH (committed
under results/ and embedded in the docs), headed by the command that made it and the machine
and load it ran on, so that a figure in the docs is a file a rerun overwrites, not typed in."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import pathlib
import platform
import shlex
import sys


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def report(path: str | os.PathLike | None):
    """Within the block, stdout also goes to PATH, written when the block ends without an
    exception (a failed run leaves the committed file as it was). None: stdout only."""
    if path is None:
        yield
        return
    import torch

    script = pathlib.Path(sys.argv[0]).as_posix()
    if "experiments/" in script:
        script = "experiments/" + script.split("experiments/")[-1]
    command = shlex.join(["python", script, *sys.argv[1:]])
    head = (
        f"$ {command}\n"
        f"# {datetime.date.today()}: {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at the start, torch {torch.__version__}, "
        f"Python {platform.python_version()}\n"
    )
    buffer = io.StringIO()
    stdout = sys.stdout
    sys.stdout = _Tee(stdout, buffer)
    try:
        yield
    finally:
        sys.stdout = stdout
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + buffer.getvalue())
    print(f"wrote {out}")
