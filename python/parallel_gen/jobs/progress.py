"""The progress bar of a file job: rows (of the total when known), tokens/s and ETA."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Optional

from ..progress import make_progress

# Called once per written row with (rows written, tokens generated so far this run).
OnRows = Callable[[int, int], None]


@contextlib.contextmanager
def job_progress(progress: Optional[bool], total: Optional[int], done: int) -> Iterator[Optional[OnRows]]:
    """A tqdm bar on stderr starting at ``done`` rows (a resumed job), or None.

    ``progress`` means what it means for generate_parallel (True, False, None: when
    stderr is a terminal); tqdm's ETA counts only this run's rows."""
    # make_progress decides (and checks ``progress``) as for every other bar; its own
    # bar counts prompts from 0, so only its decision is used, never entered.
    if isinstance(make_progress(progress, total or 0), contextlib.nullcontext):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="row", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()

    def on_rows(n: int, tokens: int) -> None:
        bar.update(n)
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{tokens / elapsed if elapsed > 0 else 0.0:.0f} tok/s", refresh=False)

    try:
        yield on_rows
    finally:
        bar.close()
