"""The command line: a thin Typer shell over the library. Parses, calls, prints."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


def main() -> None:
    app()
