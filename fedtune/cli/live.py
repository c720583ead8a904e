"""Live federations over Flower: `serve` (the coordinator), `join` (a site), and `tls new` (the SuperLink's
certificates). The work is in fedtune.live; Flower is imported only when one of these commands runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtune.cli import COORDINATOR_PANEL, SITE_PANEL, ConfigOpt, CoordinatorKeyOpt, JsonOpt, ModelOpt, app, err, out
from fedtune.cli import print_json, progress_log

InsecureOpt = Annotated[bool, typer.Option("--insecure", help="no TLS: updates travel in the clear (a test on one "
                                                               "machine, or a network that encrypts already)")]


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


def _round_line(event: dict) -> str:
    traffic = event.get("bytes") or {}
    wire = ", ".join(f"{site} {_size(t['sent'])} out / {_size(t['received'])} in" for site, t in sorted(traffic.items()))
    line = (f"round {event['round']}: {event['version']}, {len(event['merged'])} site(s) merged "
            f"[{', '.join(event['merged'])}], {event['seconds']:.1f} s")
    if event.get("missing"):
        line += f"; no update from {', '.join(event['missing'])}"
    if event.get("rejected"):
        line += f"; {len(event['rejected'])} rejected"
    return line + (f"; on the wire: {wire}" if wire else "")


@app.command(rich_help_panel=COORDINATOR_PANEL)
def serve(
    config: ConfigOpt,
    registry: Annotated[Path, typer.Option("--registry", help="the registry folder")],
    updates: Annotated[Path, typer.Option(help="the updates root; each round's updates go to round-NNNN/<site>/")],
    rounds: Annotated[int, typer.Option(help="global versions to make")],
    tls: Annotated[Optional[Path], typer.Option(
        "--tls", help="folder from `fedtune tls new` (ca.crt, server.crt, server.key): the SuperLink serves TLS")] = None,
    insecure: InsecureOpt = False,
    address: Annotated[str, typer.Option(help="HOST:PORT the SuperLink listens on; sites join there")] = "127.0.0.1:9093",
    superlink: Annotated[Optional[str], typer.Option(
        help="HOST:PORT of a SuperLink already running on this machine, instead of starting one")] = None,
    join_timeout: Annotated[float, typer.Option(
        "--join-timeout", help="seconds a round waits for its called sites to join before going on without them")] = 600,
    key: CoordinatorKeyOpt = None,
    work: Annotated[Optional[Path], typer.Option(
        help="folder for Flower's files and logs \\[default: a temporary folder, kept only if the run fails]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run live rounds over Flower: start a SuperLink, wait for the sites to `fedtune join`, and make --rounds
    global versions in the registry, one line per round (version, sites merged, seconds, bytes on the wire)."""
    import click

    from fedtune.live.commands import serve as run_serve
    from fedtune.live.processes import Address

    def show(event: dict) -> None:
        if not json_out:
            out.print(_round_line(event))

    try:
        result = run_serve(config, registry, updates, rounds, tls=tls, insecure=insecure,
                           address=Address.parse(address, "--address"),
                           superlink=Address.parse(superlink, "--superlink") if superlink else None, key=key,
                           join_timeout=join_timeout, work=work, log=progress_log(), on_round=show)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the Flower processes are stopped already
        raise click.exceptions.Abort() from None
    if json_out:
        print_json(result)
        return
    out.print(f"wrote {registry}: {', '.join(result['versions'])}; LATEST = {result['versions'][-1]}")


@app.command(rich_help_panel=SITE_PANEL)
def join(
    config: ConfigOpt,
    site: Annotated[str, typer.Option(help="this site's roster name")],
    data: Annotated[Path, typer.Option(help="this site's prepared folder")],
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the coordinator's SuperLink")],
    key: Annotated[Optional[Path], typer.Option(
        "--key", help="this site's private key (SITE.key); signs every update \\[required once the roster holds keys]")] = None,
    root_certificates: Annotated[Optional[Path], typer.Option(
        "--root-certificates", help="the federation's ca.crt (from the coordinator's `fedtune tls new`)")] = None,
    insecure: InsecureOpt = False,
    model_dir: ModelOpt = None,
    port: Annotated[int, typer.Option(help="this site's SuperNode port on this machine (one per site)")] = 9094,
    cache: Annotated[Optional[Path], typer.Option(
        help="where the global versions received are kept \\[default: versions/ beside --data]")] = None,
) -> None:
    """Serve this site in a live federation: train an update whenever the coordinator's `serve` asks, until stopped
    (Ctrl-C). Every input is checked before Flower starts."""
    import sys

    from fedtune.live.commands import join as run_join
    from fedtune.live.processes import Address

    code = run_join(config, site, data, key, Address.parse(superlink, "--superlink"),
                    root_certificates=root_certificates, insecure=insecure, model=model_dir, port=port, cache=cache,
                    log=lambda line: err.print(line, markup=False))
    if code:
        err.print(f"error: the SuperNode stopped with status {code} (its output above says why)", markup=False)
        sys.exit(1)


tls_app = typer.Typer(help="Certificates for a live federation's SuperLink (TLS).", no_args_is_help=True)
app.add_typer(tls_app, name="tls", rich_help_panel=COORDINATOR_PANEL)


@tls_app.command("new")
def tls_new(
    folder: Annotated[Path, typer.Argument(help="folder to write (new or empty)")],
    host: Annotated[list[str], typer.Option("--host", help=(
        "a name or IP address the SuperLink is reached by (repeat): every one the sites use, and 127.0.0.1, where "
        "its own processes connect"))],
    days: Annotated[int, typer.Option(help="days the certificates are valid")] = 365,
    json_out: JsonOpt = False,
) -> None:
    """Make a local CA and the SuperLink's certificate: ca.crt goes to every site (--root-certificates); server.crt
    and server.key stay with `fedtune serve --tls FOLDER`; ca.key (mode 0600) issues a new certificate later."""
    from fedtune.live.tls import new_tls

    files = new_tls(folder, host, days)
    if json_out:
        print_json({"folder": str(folder), "hosts": host, "days": days, "files": {k: str(v) for k, v in files.items()}})
        return
    out.print(f"wrote {folder}: ca.crt (give it to every site), server.crt and server.key (for `fedtune serve --tls "
              f"{folder}`), ca.key (keep it private); valid {days} days for {', '.join(host)}")
