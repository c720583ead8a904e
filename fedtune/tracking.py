"""Experiment tracking (`--track mlflow`): a report page's settings, per-version metrics and files logged as one
MLflow run in a local store. Optional (`pip install 'fedtune[track]'`); nothing else in fedtune imports MLflow.

The store is an SQLite file (mlflow.db, its artifacts in mlartifacts/ beside it): MLflow's recommended backend
(its folder store is in maintenance mode and refused unless an environment variable opts back in), read by
`mlflow ui --backend-store-uri sqlite:///PATH/mlflow.db` or MlflowClient. Never a server: fedtune's run-time code
opens no network connection.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import BadInput

if TYPE_CHECKING:
    from fedtune.config import FederationConfig

TRACKERS = ("mlflow",)
STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
INSTALL = "pip install 'fedtune[track]'"


def tracking_store(track: str | None, uri: str | None, beside: Path) -> Path | None:
    """Check `--track`/`--track-uri` before any work starts; returns the SQLite file runs go to (None: no tracking).

    Args:
        track: the tracker (only "mlflow"), or None.
        uri: a .db file, sqlite:///PATH, or a folder (its mlflow.db); default: mlflow.db in `beside`.
        beside: the folder of the command's output.
    """
    if track is None:
        if uri is not None:
            raise BadInput("--track-uri: give --track mlflow too (tracking is off without it)")
        return None
    if track not in TRACKERS:
        raise BadInput(f"--track {track}: unknown tracker; fedtune tracks to {', '.join(TRACKERS)} (--track mlflow)")
    # MLflow sends usage telemetry to its servers unless told not to; fedtune's run-time code opens no connection.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        import alembic  # noqa: F401  (MLflow's SQLite store migrates its schema with these two)
        import mlflow  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as missing:
        raise BadInput(f"--track mlflow: {missing.name} is not installed; {INSTALL}") from None
    if uri is None:
        return (Path(beside) / STORE_FILE).absolute()
    if "://" in uri and not uri.startswith("sqlite:///"):
        raise BadInput(f"--track-uri {uri}: fedtune tracks to a local store only: a .db file (SQLite) or a folder "
                       "to hold mlflow.db")
    path = Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri).expanduser()
    if path.is_dir() or (not uri.startswith("sqlite:///") and path.suffix != ".db"):
        path = path / STORE_FILE
    if path.exists() and not path.is_file():
        raise BadInput(f"--track-uri {uri}: {path} is not a file; give a .db file or a folder")
    if path.is_file() and path.stat().st_size and path.read_bytes()[:16] != b"SQLite format 3\x00":
        raise BadInput(f"--track-uri {uri}: {path} is not an SQLite file (an MLflow store); give a new .db file")
    return path.absolute()


def track_run(store: Path, page: dict, config: FederationConfig | None, files: list[Path], command: str) -> dict:
    """Log one run: the federation's settings as params, each evaluated version's per-site loss and task metrics,
    ε, weights, bytes and seconds as metrics (step = round; the base model is step 0), and `files` plus the page
    (report_page.json) as artifacts.

    Returns:
        {"store": the sqlite URI, "experiment": its name, "experiment_id", "run_id"}.
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _log_run(store, page, config, files, command)
    except (MlflowException, SQLAlchemyError, OSError) as problem:  # a store made by another MLflow, a full disk
        first = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
        raise BadInput(f"{store}: the run could not be tracked ({first[:200]}); the report files are written — "
                       "give another --track-uri") from None


def _log_run(store: Path, page: dict, config: FederationConfig | None, files: list[Path], command: str) -> dict:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    store.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store}"
    with _quiet("mlflow", "alembic"):
        client = MlflowClient(tracking_uri=uri)
        name = f"fedtune/{page['name']}"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
            name, artifact_location=(store.parent / ARTIFACTS_FOLDER).absolute().as_uri())
        run = client.create_run(experiment_id, run_name=f"{command} {page.get('latest') or page['name']}",
                                tags={"fedtune.command": command, "fedtune.format": page["format"],
                                      **({"fedtune.registry": page["registry"]} if page.get("registry") else {})})
        run_id = run.info.run_id
        try:
            stamp = int(time.time() * 1000)
            params = [Param(k, str(v)) for k, v in run_params(page, config).items()]
            metrics = [Metric(k, float(v), stamp, step) for k, v, step in run_metrics(page)]
            for start in range(0, max(len(params), 1), 100):  # MLflow's batch limits: 100 params, 1000 metrics
                client.log_batch(run_id, params=params[start:start + 100])
            for start in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[start:start + 1000])
            for path in files:
                client.log_artifact(run_id, str(path))
            client.log_dict(run_id, page, "report_page.json")
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")
    return {"store": uri, "experiment": name, "experiment_id": experiment_id, "run_id": run_id}


def run_params(page: dict, config: FederationConfig | None) -> dict[str, object]:
    """What the run was: the method, rounds, sites and (with the federation) the settings that shape the result."""
    sites = sorted(page["run"].get("base") or {}) or sorted({c["site"] for v in page["versions"]
                                                             for c in v["contributors"]})
    params: dict[str, object] = {"federation": page["name"], "method": page.get("method"),
                                 "rounds": len(page["versions"]) or len(page["run"].get("rounds", [])),
                                 "sites": ",".join(sites)}
    if config is not None:
        params.update({
            "sites": ",".join(config.site_names()), "base_model": config.base_model.id, "seq_len": config.seq_len,
            "lora.r": config.lora.r, "lora.alpha": config.lora.alpha, "lora.target_modules": config.lora.target_modules,
            "training.steps": config.training.steps, "training.lr": config.training.lr,
            "training.batch_size": config.training.batch_size, "aggregation.quorum": config.aggregation.quorum,
            "aggregation.weighting": config.aggregation.weighting, "privacy.mode": config.privacy.mode,
            "privacy.delta": config.privacy.delta, "privacy.secure_aggregation": config.privacy.secure_aggregation,
        })
    return {k: v for k, v in params.items() if v is not None}


def run_metrics(page: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) for every number worth a curve: step 0 is the base model, step N the version of round N."""
    run, out = page["run"], []
    rounds = {v["version"]: v["round"] for v in page["versions"]}
    steps = {"base": 0, **{r["version"]: rounds.get(r["version"], i) for i, r in enumerate(run.get("rounds", []), 1)}}
    for site, loss in (run.get("base") or {}).items():
        out.append((f"loss/{site}", loss, 0))
    for evaluated in run.get("rounds", []):
        step = steps[evaluated["version"]]
        out += [(f"loss/{site}", loss, step) for site, loss in evaluated["eval"].items()]
        if evaluated.get("epsilon") is not None:
            out.append(("epsilon", evaluated["epsilon"], step))
    last = max(steps.values())
    for kind, losses in (run.get("baselines") or {}).items():
        out += [(f"baseline/{kind}/loss/{site}", loss, last) for site, loss in losses.items()]
    for name, scores in (run.get("tasks") or {}).items():
        step = steps.get(name, last)
        prefix = "task" if name in steps else f"baseline/{name}/task"
        for site, task in scores.items():
            out += [(f"{prefix}/{metric}/{site}", task[metric], step)
                    for metric in ("exact_match", "token_f1", "rouge_l") if task.get(metric) is not None]
    for version in page["versions"]:
        step = version["round"]
        out += [(f"weight/{c['site']}", c["weight"], step) for c in version["contributors"]
                if c.get("weight") is not None]
        if version["bytes"]["updates"] is not None:
            out.append(("bytes/updates", version["bytes"]["updates"], step))
        out.append(("bytes/version", version["bytes"]["version"], step))
        if version["seconds"] is not None:
            out.append(("seconds", version["seconds"], step))
        out.append(("rejected", len(version["rejected"]), step))
    return out


class _quiet:
    """MLflow and its schema migrations log INFO lines on creating a store; fedtune's own progress is enough."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.WARNING)

    def __exit__(self, *_exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
