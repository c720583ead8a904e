"""A site in a live federation: the Flower ClientApp a SuperNode runs for each message the coordinator sends.

A query is answered with who this node is (its site and public key) and which global versions it holds. A train
message runs the site's compute step exactly as `fedtune train-local` does — the version's coordinator signature
and files checked, `compute_update`, `encode_update` — and the reply carries the bytes of the update folder.

The node config (`fedtune join` writes it) names the site and its files: `site`, `data` (prepared folder), `key`
(the site's private key), `config` (federation.yaml), and optionally `model` (the base model folder) and `cache`
(where the versions received are kept; default: versions/ beside the data folder).

Flower starts a fresh process for every message, so this module imports only what a query needs; training pulls in
torch inside the handler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.errors import BadInput, FedtuneError
from fedtune.live import records
from fedtune.wire.codec import WireError, parse_json, read_capped
from fedtune.wire.manifests import SHA256, VERSION_NAME
from fedtune.wire.update import MANIFEST_FILE, UpdateFiles

NODE_KEYS = ("site", "data", "key", "config", "model", "cache")

app = ClientApp()


class NeedsVersion(BadInput):
    """The coordinator sent only a version's name, and this site does not hold that version intact."""


@dataclass
class SiteSetup:
    """What the node config says about this site."""

    site: str
    data: Path
    key: Path | None
    config: Path
    model: Path | None
    cache: Path

    @classmethod
    def from_node_config(cls, node_config: dict) -> SiteSetup:
        values = {key: node_config.get(key) for key in NODE_KEYS}
        for key in ("site", "data", "config"):
            if not isinstance(values[key], str) or not values[key]:
                raise BadInput(f"node config: '{key}' missing; start the SuperNode with `fedtune join`")

        def path(key: str) -> Path | None:
            value = values[key]
            return Path(value).expanduser() if isinstance(value, str) and value else None

        data = path("data")
        return cls(values["site"], data, path("key"), path("config"), path("model"),
                   path("cache") or data.parent / "versions")


def _setup(context: Context) -> SiteSetup:
    return SiteSetup.from_node_config(dict(context.node_config))


@app.query()
def query(message: Message, context: Context) -> Message:
    try:
        setup = _setup(context)
        public = None
        if setup.key is not None:
            from fedtune.wire import SigningKey

            public = SigningKey.load(setup.key).public
        content = records.identity_content(setup.site, public, held_versions(setup.cache))
    except FedtuneError as err:
        content = _refusal(err)
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    import warnings

    # As the CLI does: the libraries' deprecation chatter is not the site's problem.
    for module in ("peft", "transformers", "accelerate", "torch"):
        warnings.filterwarnings("ignore", module=module)
    try:
        setup = _setup(context)
        order = records.read_order(message.content)
        update = train_update(setup, order, log=lambda line: print(line, flush=True))
        content = records.update_content(setup.site, order.round, update)
        print(f"{setup.site}: round {order.round}: update sent ({records.payload_bytes(content)} bytes)", flush=True)
    except WireError as err:
        content = _refusal(BadInput(f"the coordinator's message: {err}"))
    except FedtuneError as err:
        content = _refusal(err)
    return Message(content, reply_to=message)


def _refusal(err: FedtuneError) -> RecordDict:
    if isinstance(err, NeedsVersion):
        print(f"note: {err}; asking the coordinator for its files", flush=True)
        return records.refusal_content(str(err), records.NEEDS_VERSION)
    print(f"error: {err}", flush=True)
    return records.refusal_content(str(err), "bad-input" if isinstance(err, BadInput) else "failed")


def train_update(setup: SiteSetup, order: records.Order, log=lambda _line: None) -> UpdateFiles:
    """This site's update for the order's round, as the bytes `train-local` would write (same checks first)."""
    from fedtune.artifacts import atomic_folder
    from fedtune.config import load_federation
    from fedtune.registry import checked_version
    from fedtune.train import compute_update, site_signer
    from fedtune.wire.update import encode_update

    config = load_federation(setup.config)
    signer = site_signer(config, setup.site, setup.key)
    if config.privacy.secure_aggregation:
        raise BadInput(f"{setup.config}: privacy.secure_aggregation is not run over the live transport yet; use the "
                       "file transport (train-local, unmask, aggregate)")
    folder = setup.cache / order.version
    if order.files is not None:
        with atomic_folder(folder, replace=True) as tmp:
            for name, data in order.files.items():
                (tmp / name).write_bytes(data)
        log(f"{setup.site}: received {order.version} ({sum(map(len, order.files.values()))} bytes) into {folder}")
    elif held_versions(setup.cache).get(order.version) != order.adapter_sha256:
        raise NeedsVersion(f"does not hold {order.version}")
    try:
        _folder, parent = checked_version(folder, config)
    except BadInput as err:
        if order.files is None:  # the copy held here is damaged: ask for the files rather than give up
            raise NeedsVersion(f"its copy of {order.version} is not intact ({err})") from None
        raise
    if parent["version"] != order.version or parent["adapter_sha256"] != order.adapter_sha256:
        raise BadInput(f"{folder}: holds {parent['version']} ({parent['adapter_sha256'][:12]}…), not the "
                       f"{order.version} ({order.adapter_sha256[:12]}…) the coordinator named")
    if parent["round"] + 1 != order.round:
        raise BadInput(f"the coordinator asked for round {order.round} from {order.version}, which makes round "
                       f"{parent['round'] + 1}")
    update = compute_update(config, setup.site, setup.data, folder, log=log, model_dir=setup.model)
    return encode_update(update.tensors, update.fields, update.adapter_config, signer)


def held_versions(cache: Path) -> dict[str, str]:
    """The global versions in this site's cache: name → the adapter sha256 its manifest names (not re-hashed here:
    the train step checks the one it uses)."""
    held = {}
    if not cache.is_dir():
        return held
    for folder in sorted(cache.iterdir()):
        if not re.match(VERSION_NAME, folder.name) or not folder.is_dir():
            continue
        try:
            manifest = parse_json(read_capped(folder / MANIFEST_FILE, 16 << 20), str(folder / MANIFEST_FILE))
        except WireError:
            continue
        sha = manifest.get("adapter_sha256") if isinstance(manifest, dict) else None
        if isinstance(sha, str) and re.match(SHA256, sha):
            held[folder.name] = sha
    return held

