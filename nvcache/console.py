"""The ``nvcache`` console script: the CLI, or one line saying how to install it.

The command's own packages (click, prettytable, prometheus_client, tqdm) are the ``cli``
extra: a scanner that uses the library does without them, and ``pip install nvcache``
alone still installs the script. Run without them, it says so instead of a traceback.
"""

from __future__ import annotations

import sys

CLI_PACKAGES = ("click", "prettytable", "prometheus_client", "tqdm")


def main() -> None:
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name not in CLI_PACKAGES:
            raise
        sys.stderr.write(f"nvcache: the command needs the package {exc.name!r}, which is not installed: "
                         f"pip install 'nvcache[cli]'\n")
        sys.exit(1)
    cli_main()
