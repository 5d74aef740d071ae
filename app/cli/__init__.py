"""The ``dermris`` command line: parses arguments, calls the library, prints results.

Results go to stdout (``--json`` for machines); progress bars, warnings and diagnostics go to
stderr (``-v`` for more, ``-q`` for none but errors). dermris's own errors (and errors of the
operating system, such as a full disk) become one line on stderr and exit code 1; usage
errors exit with 2. Anything else is a bug and keeps its traceback.

One module per command group (:mod:`.index`, :mod:`.search`, :mod:`.store`,
:mod:`.evaluate`, :mod:`.serve`, :mod:`.train`, :mod:`.demo`); nothing heavy is imported at
module level, so ``dermris --help`` and argument errors never load torch, and the store
commands never do.
"""

from __future__ import annotations

import sys

from . import demo, evaluate, index, search, serve, store, train  # noqa: F401 - they register the commands
from ._common import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
