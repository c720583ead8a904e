"""`fedtune simulate`: a whole federation on one machine, through the same stage functions the CLI calls."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fedtune import models
from fedtune.aggregate import aggregate_round
from fedtune.config import load_recipe
from fedtune.data import prepare_site
from fedtune.errors import BadInput
from fedtune.evaluate import evaluate
from fedtune.federation import init_federation
from fedtune.registry import Registry
from fedtune.report import write_report
from fedtune.train import round_dir_name, train_local


def simulate(recipe_path: Path, out: Path, log: Callable[[str], None] = lambda _msg: None) -> dict:
    """Run the recipe: init, prepare every site, R rounds of train-local then aggregate, evaluate all.

    Returns:
        The report: {"name", "base": {site: loss}, "rounds": [{"version", "eval": {site: loss}}]}.
    """
    recipe, recipe_dir = load_recipe(recipe_path)
    inputs = {site.name: [recipe_dir / p for p in site.inputs] for site in recipe.sites}
    for site, paths in inputs.items():
        for path in paths:
            if not path.is_file():
                raise BadInput(f"{recipe_path}: site {site}: input {path} not found")
    if (out / "federation.yaml").exists() or (out / "registry").exists():
        raise BadInput(f"{out}: already holds a federation; choose an empty --out folder")

    log(f"init: {out / 'federation.yaml'} (model {recipe.model})")
    config = init_federation(out, recipe.roster(), recipe.model, recipe.plan())
    prepared = {}
    for site, paths in inputs.items():
        prepared[site] = out / "prepared" / site
        prepare_site(config, site, paths, prepared[site], log=log)
    registry = Registry(out / "registry")
    data_dirs = list(prepared.values())

    base_model = models.load_base_model(config.base_model.id)
    base_eval = evaluate(config, "base", data_dirs, base_model=base_model)
    report: dict = {"name": recipe.name, "base": {s: m["loss"] for s, m in base_eval["sites"].items()}, "rounds": []}
    log("eval base: " + _fmt(report["base"]))
    for number in range(1, recipe.rounds + 1):
        for site in prepared:
            train_local(config, site, prepared[site], registry.root, out / "updates", log=log)
        result = aggregate_round(config, registry.root, out / "updates" / round_dir_name(number), warn=log)
        scores = evaluate(config, result.folder, data_dirs, base_model=base_model)
        report["rounds"].append({"version": result.version, "eval": {s: m["loss"] for s, m in scores["sites"].items()}})
        log(f"eval {result.version}: " + _fmt(report["rounds"][-1]["eval"]))
    write_report(out, report)
    return report


def _fmt(losses: dict) -> str:
    return ", ".join(f"{site} {loss:.4f}" for site, loss in losses.items())
