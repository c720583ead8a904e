"""The `fedtune` command line: registers commands and turns FedtuneError into one line. No logic here.

The commands live in `site` (what a site runs), `coordinator` (what the coordinator runs) and `trust` (keys, the
roster, and the registry's audit trail: log, verify, rollback); this module holds the app, the shared options and
output helpers, and `main`. Nothing here imports torch, so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedtune.errors import FedtuneError

app = typer.Typer(
    help="Federated fine-tuning of LLM adapters: sites train LoRA updates, a coordinator merges them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SITE_PANEL = "Site commands"
COORDINATOR_PANEL = "Coordinator commands"


class _Out(Console):
    """stdout; a progress spinner on stderr stops before any result is printed."""

    def print(self, *args, **kwargs) -> None:
        _stop_status()
        super().print(*args, **kwargs)


out = _Out(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", help="the federation.yaml")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", help="folder holding this machine's copy of the base model \\[default: $FEDTUNE_MODEL_DIR, else found "
                    "by the federation's model id: embedded, or the Hugging Face cache]")]
CoordinatorKeyOpt = Annotated[Optional[Path], typer.Option(
    "--key", help="the coordinator's private key \\[default: coordinator.key beside the registry]")]


def _quiet_libraries() -> None:
    import warnings

    # Library deprecation chatter is not the user's problem; fedtune's own messages go to stderr. Only
    # environment variables and filters here: importing transformers would make every --help slow.
    for module in ("peft", "transformers", "accelerate", "torch"):
        warnings.filterwarnings("ignore", module=module)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress_log():
    """Progress lines on stderr; on a terminal the latest one also shows beside a spinner until the next."""
    if not err.is_terminal:
        return lambda line: err.print(line, markup=False)
    status = err.status("")
    started = False

    def log(line: str) -> None:
        nonlocal started
        err.print(line, markup=False)
        status.update(line)
        if not started:
            status.start()
            started = True

    _open_status.append(status)
    return log


# Spinners started by progress_log(), stopped when the command ends (whatever way it ends).
_open_status: list = []


def _stop_status() -> None:
    while _open_status:
        _open_status.pop().stop()


def print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def print_json(value) -> None:
    _stop_status()
    print(json.dumps(value))


def warn(line: str) -> None:
    err.print(f"warning: {line}", markup=False)


def registry_config(registry: Path, config: Path | None) -> Path:
    """The federation.yaml a coordinator command uses: the one given, else the one beside the registry."""
    return config if config is not None else Path(registry).parent / "federation.yaml"


def _version(value: bool) -> None:
    if value:
        from fedtune import __version__

        print(f"fedtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    """Federated fine-tuning of LLM adapters: sites train LoRA updates, a coordinator merges them."""


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[1:argv.index("--")] if "--" in argv else "--json" in argv[1:]


def _fail(message: str, code: int) -> None:
    """One line on stderr, or the error as JSON on stdout when --json was asked for; then exit."""
    _stop_status()
    if _wants_json(sys.argv):
        print_json({"error": message, "exit_code": code})
    else:
        err.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    import click

    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
        # Without standalone mode a Ctrl-C comes back as a return value (130), not as an exception.
        if code == 130:
            _fail("aborted", 130)
        if isinstance(code, int) and code:
            sys.exit(code)
    except FedtuneError as problem:
        if os.environ.get("FEDTUNE_DEBUG"):
            raise
        _fail(str(problem), problem.exit_code)
    except click.exceptions.NoArgsIsHelpError:
        # A bare `fedtune` (or a bare command) asks for help; it is not a mistake.
        # Typer has printed the help already (on stdout).
        sys.exit(0)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as problem:  # usage errors: unknown option, missing value, …
        _fail(problem.format_message(), 2)
    finally:
        _stop_status()


# The commands register themselves on `app` when their modules are imported, in the order --help lists them.
from fedtune.cli import site  # noqa: E402,F401,I001
from fedtune.cli import coordinator  # noqa: E402,F401
from fedtune.cli import trust  # noqa: E402,F401
from fedtune.cli import privacy  # noqa: E402,F401
from fedtune.cli import live  # noqa: E402,F401
from fedtune.cli import report  # noqa: E402,F401
