"""Live federations over Flower, end to end: a real SuperLink (started by `fedtune serve`) and two real SuperNodes
(`fedtune join`) on loopback make two rounds on the tiny model, without and with TLS; `fedtune verify` passes on
the registry; and each version is byte for byte the one the file transport (train-local + aggregate) makes from
the same federation. Bad input is refused in one line before any Flower process starts.

Every Flower process a test starts is stopped by a finalizer, so a failing test leaves none behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from conftest import TINY_OVERRIDES, run_cli, site_records, write_jsonl  # noqa: E402

SITES = ("clinic", "bank")
ROUNDS = 2


@dataclass
class Federation:
    """A federation of two sites with keys, their prepared data, and v0000 in the registry."""

    root: Path
    model: Path

    @property
    def config(self) -> Path:
        return self.root / "fed" / "federation.yaml"

    @property
    def registry(self) -> Path:
        return self.root / "fed" / "registry"

    @property
    def updates(self) -> Path:
        return self.root / "updates"

    def key(self, site: str) -> Path:
        return self.root / "keys" / f"{site}.key"

    def data(self, site: str) -> Path:
        return self.root / "prepared" / site

    def cache(self, site: str) -> Path:
        return self.root / "cache" / site

    def adapters(self) -> dict[str, str]:
        """version → sha256 of its adapter file, for every version in the registry."""
        return {folder.name: hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
                for folder in sorted(self.registry.glob("v[0-9]*"))}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model) -> Federation:
    from fedtune.data import prepare_site
    from fedtune.federation import init_federation
    from fedtune.wire.keys import SigningKey

    fed = Federation(tmp_path_factory.mktemp("live-federation"), tiny_model)
    roster = []
    for site in SITES:
        key = SigningKey.generate()
        key.write(fed.key(site), fed.key(site).with_suffix(".pub"))
        roster.append({"name": site, "key": key.public, "exchange_key": key.exchange_public})
    config = init_federation(fed.root / "fed", roster, str(tiny_model), json.loads(json.dumps(TINY_OVERRIDES)))
    for site in SITES:
        raw = write_jsonl(fed.root / "raw" / f"{site}.jsonl", site_records(site, 40))
        prepare_site(config, site, [raw], fed.data(site))
    return fed


def copy_of(fed: Federation, dest: Path) -> Federation:
    shutil.copytree(fed.root, dest, symlinks=True)
    return Federation(dest, fed.model)


@pytest.fixture(scope="module")
def file_versions(federation, tmp_path_factory) -> dict[str, str]:
    """The same federation's rounds over files: train-local for each site, then aggregate (the stage functions the
    CLI calls)."""
    from fedtune.aggregate import aggregate_round
    from fedtune.config import load_federation
    from fedtune.train import train_local

    fed = copy_of(federation, tmp_path_factory.mktemp("files") / "run")
    config = load_federation(fed.config)
    for _ in range(ROUNDS):
        for site in SITES:
            folder = train_local(config, site, fed.data(site), fed.registry, fed.updates, key=fed.key(site),
                                 model_dir=fed.model)
        aggregate_round(config, fed.registry, folder.parent, closed=True)
    return fed.adapters()


@pytest.fixture
def site_nodes(tmp_path):
    """Start `fedtune join` for a site (as its own process, as a site runs it); every one is stopped at the end."""
    from fedtune.live.processes import Child

    started = []

    def start(fed: Federation, site: str, superlink: str, *trust: str) -> Child:
        command = [sys.executable, "-m", "fedtune.cli", "join", "--config", str(fed.config), "--site", site,
                   "--data", str(fed.data(site)), "--key", str(fed.key(site)), "--superlink", superlink,
                   "--model", str(fed.model), "--cache", str(fed.cache(site)), "--port", str(free_port()), *trust]
        node = Child(f"join {site}", command, dict(os.environ), log=tmp_path / f"join-{site}.log")
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def wait_for_line(node, text: str, limit: float = 300) -> None:
    """Wait until a process's log holds `text` (not a timed assertion: `limit` only stops a hung test)."""
    deadline = time.monotonic() + limit
    while text not in node.log.read_text(errors="replace"):
        assert node.running(), node.tail()
        assert time.monotonic() < deadline, node.tail()
        time.sleep(0.2)


_PORTS: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this module handed out before."""
    from fedtune.live.processes import free_port as pick

    port = pick("127.0.0.1")
    while port in _PORTS:
        port = pick("127.0.0.1")
    _PORTS.add(port)
    return port


def serve(fed: Federation, capsys, tmp_path: Path, address: str, *trust: str) -> tuple[dict, str]:
    """`fedtune serve --json` for ROUNDS rounds: (its result, its progress lines)."""
    code, stdout, stderr = run_cli(["serve", "--config", fed.config, "--registry", fed.registry, "--updates",
                                    fed.updates, "--rounds", ROUNDS, "--address", address, "--join-timeout", 300,
                                    "--work", tmp_path / "serve-work", "--json", *trust], capsys)
    assert code == 0, stderr + "".join((tmp_path / name).read_text() for name in ("join-clinic.log", "join-bank.log")
                                       if (tmp_path / name).is_file())
    return json.loads(stdout), stderr


def version_bytes(fed: Federation, version: str) -> int:
    """What a train message carries of a version: its four files."""
    return sum((fed.registry / version / name).stat().st_size for name in
               ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "manifest.sig"))


def check_registry(fed: Federation, capsys, result: dict, file_versions: dict[str, str]) -> None:
    assert result["versions"] == ["v0001", "v0002"]
    assert [sorted(r["merged"]) for r in result["rounds"]] == [sorted(SITES)] * ROUNDS
    # Byte for byte the versions the file transport makes from the same federation and seeds.
    assert fed.adapters() == file_versions
    assert [r["adapter_sha256"] for r in result["rounds"]] == [file_versions["v0001"], file_versions["v0002"]]
    for number in (1, 2):
        for site in SITES:
            assert (fed.updates / f"round-{number:04d}" / site / "manifest.sig").is_file()
    code, _out, err = run_cli(["verify", "--registry", fed.registry, "--updates", fed.updates], capsys)
    assert code == 0, err


def test_live_rounds_make_the_file_transports_versions(federation, file_versions, site_nodes, tmp_path, capsys):
    fed = copy_of(federation, tmp_path / "fed-live")
    # The bank holds v0000 already (as after an earlier run): round 1 sends it only the version's name.
    shutil.copytree(fed.registry / "v0000", fed.cache("bank") / "v0000")
    address = f"127.0.0.1:{free_port()}"
    for site in SITES:
        site_nodes(fed, site, address, "--insecure")
    result, progress = serve(fed, capsys, tmp_path, address, "--insecure")
    check_registry(fed, capsys, result, file_versions)
    # Bytes on the wire, per site and round: the version sent (unless held) and the update received.
    first, second = (r["bytes"] for r in result["rounds"])
    assert first["clinic"]["sent"] == version_bytes(fed, "v0000") and first["bank"]["sent"] == 0
    assert "bank: sent round 1 from v0000 (it holds the version)" in progress
    for number, traffic in ((1, first), (2, second)):
        for site in SITES:
            update = fed.updates / f"round-{number:04d}" / site
            assert traffic[site]["received"] == sum(p.stat().st_size for p in update.iterdir())
    for site in SITES:
        assert second[site]["sent"] == version_bytes(fed, "v0001")  # new to both
        assert (fed.cache(site) / "v0001" / "manifest.sig").is_file()


def test_live_rounds_over_tls(federation, file_versions, site_nodes, tmp_path, capsys):
    fed = copy_of(federation, tmp_path / "fed-tls")
    # A damaged copy of v0000: the site asks for the files again instead of failing the round.
    shutil.copytree(fed.registry / "v0000", fed.cache("clinic") / "v0000")
    with open(fed.cache("clinic") / "v0000" / "adapter_model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    code, _out, err = run_cli(["tls", "new", tmp_path / "tls", "--host", "127.0.0.1", "--host", "localhost"], capsys)
    assert code == 0, err
    assert ((tmp_path / "tls" / "server.key").stat().st_mode & 0o777) == 0o600
    # The SuperLink listens on every interface; the sites (and Flower's own processes) reach it on loopback.
    port = free_port()
    for site in SITES:
        site_nodes(fed, site, f"127.0.0.1:{port}", "--root-certificates", str(tmp_path / "tls" / "ca.crt"))
    result, progress = serve(fed, capsys, tmp_path, f"0.0.0.0:{port}", "--tls", str(tmp_path / "tls"))
    check_registry(fed, capsys, result, file_versions)
    # The first order named the version only; the site found its copy damaged and got the files once.
    assert "clinic: sent round 1 from v0000 (it holds the version)" in progress
    assert "manifest; fetch the version again); sending the version's files" in progress
    assert result["rounds"][0]["bytes"]["clinic"]["sent"] == version_bytes(fed, "v0000")


def set_aggregation(fed: Federation, **settings) -> None:
    """Change aggregation settings in the copy's federation.yaml (the roster, which the registry checks, stays)."""
    import yaml

    data = yaml.safe_load(fed.config.read_text())
    data.setdefault("aggregation", {}).update(settings)
    fed.config.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_site_that_refuses_is_left_out_and_the_quorum_decides(federation, site_nodes, tmp_path, capsys):
    fed = copy_of(federation, tmp_path / "fed-refuse")
    set_aggregation(fed, quorum=1)
    address = f"127.0.0.1:{free_port()}"
    nodes = {site: site_nodes(fed, site, address, "--insecure") for site in SITES}
    # The bank's data goes missing once `join` has checked it and started its SuperNode: the bank refuses the
    # round with the stage's own error.
    wait_for_line(nodes["bank"], "bank: joining the federation at")
    (fed.data("bank") / "train.parquet").rename(fed.data("bank") / "train.parquet.moved")
    code, stdout, stderr = run_cli(["serve", "--config", fed.config, "--registry", fed.registry, "--updates",
                                    fed.updates, "--rounds", 1, "--address", address, "--insecure", "--json"], capsys)
    assert code == 0, stderr
    (round_one,) = json.loads(stdout)["rounds"]
    assert round_one["merged"] == ["clinic"] and round_one["missing"] == ["bank"]
    assert "bank: refused round 1: " in stderr and "train.parquet: file not found; run `fedtune prepare` again" in stderr
    assert not (fed.updates / "round-0001" / "bank").exists()
    manifest = json.loads((fed.registry / "v0001" / "manifest.json").read_text())
    assert [c["site"] for c in manifest["contributors"]] == ["clinic"]


def test_asynchronous_rounds_keep_every_site_busy(federation, site_nodes, tmp_path, capsys):
    """aggregation.async (FedBuff), buffer 1: a version per update, whatever version it was trained from."""
    fed = copy_of(federation, tmp_path / "fed-async")
    set_aggregation(fed, **{"async": {"buffer": 1}})
    address = f"127.0.0.1:{free_port()}"
    for site in SITES:
        site_nodes(fed, site, address, "--insecure")
    code, stdout, stderr = run_cli(["serve", "--config", fed.config, "--registry", fed.registry, "--updates",
                                    fed.updates, "--rounds", 3, "--address", address, "--insecure", "--json"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["versions"] == ["v0001", "v0002", "v0003"]
    merged = []
    for number in (1, 2, 3):
        (contributor,) = json.loads((fed.registry / f"v{number:04d}" / "manifest.json").read_text())["contributors"]
        # An update trained from version M-1 lives in round-M's folder, and is merged τ = N - M versions later.
        assert contributor["staleness"] == number - contributor["round"] >= 0
        assert (fed.updates / f"round-{contributor['round']:04d}" / contributor["site"] / "manifest.sig").is_file()
        merged.append((contributor["site"], contributor["round"]))
    assert len(set(merged)) == 3 and {site for site, _ in merged} == set(SITES)
    code, _out, err = run_cli(["verify", "--registry", fed.registry, "--updates", fed.updates], capsys)
    assert code == 0, err


# --- bad input: one line, exit 2, no Flower process --------------------------------------------------------

def test_serve_refuses_bad_input_before_starting_flower(federation, tmp_path, capsys):
    base = ["serve", "--config", federation.config, "--registry", federation.registry, "--updates",
            tmp_path / "updates", "--rounds", "1", "--address", f"127.0.0.1:{free_port()}"]
    cases = [
        ([], "--tls or --insecure: give one"),
        (["--insecure", "--tls", tmp_path], "--tls and --insecure: give one of them"),
        (["--tls", tmp_path / "none"], "ca.crt missing; make the folder with `fedtune tls new"),
        (["--insecure", "--address", "nowhere"], "--address nowhere: give HOST:PORT"),
        (["--insecure", "--key", federation.key("clinic")], "not the coordinator key named in federation.yaml"),
    ]
    code, _out, err = run_cli(["tls", "new", tmp_path / "other-tls", "--host", "coord.example.org"], capsys)
    assert code == 0, err
    cases.append((["--tls", tmp_path / "other-tls"], "server.crt: does not name 127.0.0.1 (coord.example.org), where "
                                                      "the SuperLink is reached"))
    for extra, message in cases:
        code, _out, err = run_cli([*base, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (extra, err)
        assert err.count("\n") == 1
    assert not (tmp_path / "updates").exists()


def test_serve_says_why_flower_could_not_run(federation, tmp_path, capsys):
    """No SuperLink where --superlink points: `flwr run` fails, and serve says so in one line naming its log."""
    code, _out, err = run_cli(["serve", "--config", federation.config, "--registry", federation.registry, "--updates",
                               tmp_path / "updates", "--rounds", "1", "--insecure", "--superlink",
                               f"127.0.0.1:{free_port()}", "--work", tmp_path / "work"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: the Flower run ended before its rounds were done (its last line: ")
    assert "Connection to the SuperLink is unavailable" in last and str(tmp_path / "work" / "flwr-run.log") in last


def test_join_refuses_bad_input_before_starting_flower(federation, tmp_path, capsys):
    from fedtune.live.processes import listening, Address

    port = free_port()
    base = ["join", "--config", federation.config, "--superlink", "127.0.0.1:1", "--insecure", "--model",
            federation.model, "--port", str(port)]
    cases = [
        (["--site", "clinic", "--data", federation.data("clinic"), "--key", federation.key("bank")],
         "not the key the roster holds for site clinic"),
        (["--site", "clinic", "--data", federation.data("bank"), "--key", federation.key("clinic")],
         "prepared for site 'bank', not 'clinic'"),
        (["--site", "lab", "--data", federation.data("clinic"), "--key", federation.key("clinic")], "lab"),
        (["--site", "clinic", "--data", tmp_path, "--key", federation.key("clinic")], "not a prepared folder"),
        (["--site", "clinic", "--data", federation.data("clinic")], "requires signed updates"),
    ]
    for extra, message in cases:
        code, _out, err = run_cli([*base, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (extra, err)
    assert not listening(Address("127.0.0.1", port))
    code, _out, err = run_cli([*base[:-4], "--root-certificates", tmp_path / "ca.crt", "--site", "clinic", "--data",
                               federation.data("clinic"), "--key", federation.key("clinic")], capsys)
    assert code == 2 and "--root-certificates and --insecure" in err


def test_tls_new_names_every_host(tmp_path, capsys):
    from cryptography import x509

    code, out, err = run_cli(["tls", "new", tmp_path / "tls", "--host", "127.0.0.1", "--host", "coord.example.org",
                              "--json"], capsys)
    assert code == 0, err
    files = json.loads(out)["files"]
    assert sorted(files) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    server = x509.load_pem_x509_certificate(Path(files["server.crt"]).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(files["ca.crt"]).read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    server.verify_directly_issued_by(ca)
    assert (Path(files["ca.key"]).stat().st_mode & 0o777) == 0o600
    code, _out, err = run_cli(["tls", "new", tmp_path / "tls", "--host", "127.0.0.1"], capsys)
    assert code == 2 and "already holds files" in err


def test_help_imports_neither_flower_nor_torch():
    import subprocess

    probe = ("import sys; from fedtune.cli import app; from typer.testing import CliRunner; "
             "CliRunner().invoke(app, ['--help']); CliRunner().invoke(app, ['serve', '--help']); "
             "print(sorted(m for m in ('flwr', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_serve_without_flower_says_how_to_install_it(federation, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    code, _out, err = run_cli(["serve", "--config", federation.config, "--registry", federation.registry, "--updates",
                               tmp_path / "updates", "--rounds", "1", "--insecure"], capsys)
    assert code == 2 and err == 'error: the live transport needs Flower, which is not installed; pip install "fedtune[flower]"\n'
