"""Where the tools' output goes: stdout kept for a command's JSON result, figures written to files."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """While the work runs, whatever it prints goes to stderr: stdout stays the command's JSON result."""
    with contextlib.redirect_stdout(sys.stderr) if enabled else contextlib.nullcontext():
        yield


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure to `path` (PNG by its suffix) and close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
