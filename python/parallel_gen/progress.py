"""Progress bar for a batch: tqdm on stderr, counting finished prompts.

tqdm is an optional dependency (``pip install 'parallel_gen[progress]'``): asked for
explicitly it must be there; left to the default, a missing tqdm just means no bar.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, ContextManager, Iterator, Optional

# Same shape as collector.StepCallback: (prompts finished, prompts in total, tokens
# generated so far; None for work that generates none, such as scoring).
OnStep = Callable[[int, int, Optional[int]], None]


def make_progress(progress: Optional[bool], total: int) -> ContextManager[Optional[OnStep]]:
    """A context manager yielding an ``on_step`` callback that drives a progress bar.

    Args:
        progress: True for a bar, False for none, None for a bar only when stderr is a
            terminal (so logs and pipes stay clean) and tqdm is installed.
        total: the number of prompts.

    Yields None when there is no bar. The bar is written to stderr, never stdout, shows
    finished prompts and generated tokens/s, and is closed when the block ends, also on
    an error or Ctrl-C.

    Raises (when called, so before any work is done):
        TypeError: ``progress`` is not a bool or None.
        ImportError: ``progress=True`` and tqdm is not installed.
    """
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__} {progress!r}")
    wanted = _stderr_is_terminal() if progress is None else progress
    if not wanted:
        return contextlib.nullcontext(None)
    try:
        # Plain tqdm, not tqdm.auto: a notebook widget would need ipywidgets and is not stderr.
        from tqdm import tqdm
    except ImportError:
        if progress is None:
            return contextlib.nullcontext(None)
        raise ImportError(
            "progress=True needs tqdm, which is not installed: pip install tqdm "
            "(or pip install 'parallel_gen[progress]')"
        ) from None
    return _bar(tqdm, total)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


@contextlib.contextmanager
def _bar(tqdm: Any, total: int) -> Iterator[OnStep]:
    bar = tqdm(total=total, unit="prompt", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()

    def on_step(n_finished: int, n_total: int, generated_tokens: Optional[int]) -> None:
        if n_finished > bar.n:
            bar.update(n_finished - bar.n)
        if generated_tokens is None:
            return
        elapsed = time.perf_counter() - t0
        rate = generated_tokens / elapsed if elapsed > 0 else 0.0
        # refresh=False: tqdm redraws at most every mininterval, not on every engine step.
        bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)

    try:
        yield on_step
    finally:
        bar.close()
