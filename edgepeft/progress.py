"""Progress bars on stderr (tqdm), so stdout stays the command's result (e.g. ``--json``)."""

from __future__ import annotations

import sys


def bar(iterable=None, *, total: int | None = None, desc: str, quiet: bool, unit: str = "it"):
    """A tqdm bar on stderr that disappears when done; ``quiet``: a silent stand-in."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=quiet, leave=False,
                dynamic_ncols=True)


def write(msg: str) -> None:
    """A line on stderr that does not break an active bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


def log(msg: str, quiet: bool) -> None:
    """``[edgepeft] msg`` on stderr (above any bar), unless ``quiet``."""
    if not quiet:
        write(f"[edgepeft] {msg}")
