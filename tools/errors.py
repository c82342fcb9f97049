"""The tools' one-line usage errors."""
from __future__ import annotations

import sys


def usage_error(message: str) -> None:
    """Bad input: one ``error: ...`` line naming the flag or file, exit 2 (argparse's status)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
