"""Shared CLI helpers: consoles and JSON output."""

from __future__ import annotations

import json
from typing import IO, Any

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any, file: IO[str] | None = None) -> None:
    """Plain JSON on stdout, or `file`, (no rich markup) for scripts."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str), file=file)
