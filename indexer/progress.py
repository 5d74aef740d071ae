"""The progress bar of a stage made of a few named steps (building and calibrating the model).

Importing this module imports neither torch nor the models, so a command can show the bar
before its heavy imports: the first line on stderr comes at once.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["StageProgress"]

_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class StageProgress:
    """A tqdm bar on stderr for a stage of named steps, shown as soon as it is made.

    Call it as a :data:`dermris.models.weights.Progress` callback: ``(done, total, what)``.

    Parameters
    ----------
    desc : str
        The stage's name, at the left of the bar.
    what : str
        The first step's name.
    enabled : bool
        Show the bar (False: every call is a no-op).
    """

    def __init__(self, desc: str = "model", *, what: str = "starting", enabled: bool = True):
        self.enabled = enabled
        self.steps: list[str] = []
        self._bar = (
            tqdm(
                total=1,
                desc=desc,
                unit="step",
                file=sys.stderr,
                bar_format=_FORMAT,
                dynamic_ncols=True,
            )
            if enabled
            else None
        )
        self(0, 1, what)

    def __call__(self, done: int, total: int, what: str) -> None:
        """Show that ``done`` of ``total`` steps are done, and what is under way now."""
        self.steps.append(what)
        bar = self._bar
        if bar is None:
            return
        bar.total = max(total, 1)
        bar.n = min(done, bar.total)
        bar.set_postfix_str(what, refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
