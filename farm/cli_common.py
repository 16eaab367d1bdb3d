"""What every ``farm`` command shares: consoles, exit codes, failing with a message, JSON output.

Exit codes, the same for every command (and for ``jobs/*.py``, which wrap them):

    0  done: the work succeeded, or what was checked is sound
    1  the work failed: a tenant did not train, a server cannot start here, a plan does not
       fit, or a check (``spec validate``, ``data check``, ``cluster validate``) found problems
       in what it checks
    2  the command was called wrongly: a flag or KEY=VALUE override, a spec that does not
       validate (where the spec is not what is being checked), an unknown tenant, a malformed
       or missing reference, an adapter the registry refuses

Errors go to stderr as one line; ``--json`` output goes to stdout alone, so scripts can pipe it.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def json_option():
    """The ``--json`` flag every command that prints a result has."""
    return typer.Option(False, "--json", help="print the result as JSON (stdout), nothing else")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))
