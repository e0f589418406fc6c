"""One error type for user mistakes, caught once in `cli_main`: one line, no traceback, exit 1."""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A mistake the user can fix. The message is one line that says what to do."""


def cli_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a stage's `main`, turning a UserError into `error: <message>` on stderr and exit code 1.

    Bugs (any other exception) keep their traceback.
    """
    try:
        return main(argv)
    except UserError as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if (e.name or "lmopt").split(".")[0] == "lmopt":
            raise  # a bug in this package: keep the traceback
        # the project's lmopt but not its pinned packages: another Python than .venv's (optional packages such as
        # tensorrt are imported where they are used and say themselves what to install)
        print(f"error: this Python ({sys.executable}) lacks {e.name}, one of the project's packages — run: make "
              f"setup; then .venv/bin/python {' '.join(sys.argv)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
