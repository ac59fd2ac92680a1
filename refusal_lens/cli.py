"""The ``refusal-lens`` command line (typer). Errors of refusal-lens print without a traceback."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from refusal_lens import __version__
from refusal_lens.errors import RefusalLensError

app = typer.Typer(
    name="refusal-lens",
    help="Find, remove and study the refusal direction of chat language models (Arditi et al. 2024).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        print(__version__)
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, printing RefusalLensError as one red line (exit 2)."""
    try:
        app(args=argv, standalone_mode=False)
    except RefusalLensError as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
