"""What the fault tests share: the CLI run in-process, the one-line-error check, and a small or
read-only tmpfs (a full disk, a read-only folder; needs root, else the test skips)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from click.testing import CliRunner

from dali_erkt.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r, *words, code=2):
    """Exit status `code`, exactly one `error:` line that contains `words`, no traceback."""
    err = r.stderr if hasattr(r, "stderr") else r
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert getattr(r, "exit_code", None) == code or getattr(r, "returncode", None) == code, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def mount_tmpfs(folder: Path, size: str, *options) -> bool:
    """Mount a tmpfs of `size` (with mount `options`, e.g. "ro") on `folder`; False where this
    process may not (not root, or no permission)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    opts = ",".join((f"size={size}",) + options)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)
