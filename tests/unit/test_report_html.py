"""The report page (fedtune.report, fedtune.report_html): every section from a synthetic run and from a real tiny
registry, nothing external referenced, text from files escaped, and a forged version manifest refused."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest

import fedkit
from fedtune.errors import BadInput
from fedtune.report import SENT_FILES, report_page, write_report
from fedtune.report_html import render

SECTIONS = ("eval", "tasks", "baselines", "contributions", "rejected", "participation", "privacy", "cost", "alerts")
CRAFTED = "<script>alert('site')</script>"


def task(em, f1, rl):
    return {"exact_match": em, "token_f1": f1, "rouge_l": rl, "examples": 8, "max_new_tokens": 16}


def synthetic_run() -> dict:
    return {
        "name": "<b>clinics</b>", "method": "fedavg",
        "base": {"north": 2.5, "south": 2.75},
        "rounds": [{"version": "v0001", "eval": {"north": 2.25, "south": 2.5}, "epsilon": 1.5, "seconds": 12.5},
                   {"version": "v0002", "eval": {"north": 2.125, "south": 2.375}, "epsilon": 2.25, "seconds": 11.0}],
        "baselines": {"local": {"north": 2.0}, "central": {"north": 2.0625, "south": 2.3125}},
        "tasks": {"base": {"north": task(0.0, 0.125, 0.1), "south": task(0.0, 0.25, 0.2)},
                  "v0002": {"north": task(0.5, 0.625, 0.6), "south": task(0.25, 0.375, 0.35)},
                  "local": {"north": task(0.375, 0.5, 0.45)}},
    }


def synthetic_versions() -> list[dict]:
    def version(name, number, **extra):
        return {"version": name, "round": number, "parent": f"v{number - 1:04d}", "created": None, "method": "fedavg",
                "held": False, "promoted": None, "contributors": [], "rejected": [], "equivocations": [],
                "participation": None, "privacy": {"mode": "central", "epsilon": 1.5 * number, "delta": 1e-5,
                                                   "rounds_accounted": number},
                "bytes": {"updates": 3_000_000, "update_count": 2, "version": 1_500_000}, "seconds": 12.5,
                "seconds_from": "simulate", "monitor": {}, "alerts": [], "rolled_back_to": None, "reason": None,
                **extra}

    share = {"loo_cosine": 0.875, "loo_distance": 0.0625, "loo_relative": 0.3125}
    return [
        version("v0001", 1, contributors=[{"site": "north", "weight": 0.625, "norm": 0.5, "clip_scale": None,
                                           "staleness": None, "contribution": share},
                                          {"site": "south", "weight": 0.375, "norm": 0.75, "clip_scale": 0.5,
                                           "staleness": 1}],
                rejected=[{"site": "east", "reason": CRAFTED}],
                equivocations=[{"site": "west", "folders": ["west", "west-2"]}],
                participation={"called": ["north", "south", "east"], "sent": ["north", "south"], "missing": ["east"],
                               "draw": "seeded", "closed": "deadline"}),
        version("v0002", 2, held=True, contributors=[{"site": "north", "weight": 1.0, "norm": 0.5}],
                monitor={"north": {"update_norm_z": 4.5}},
                alerts=[{"kind": "update", "site": "north", "metric": "update_norm_z", "value": 4.5, "threshold": 3.0,
                         "message": "<img src=x onerror=alert(1)> norm jumped"}]),
    ]


def sections(page_html: str) -> dict[str, str]:
    found = dict(re.findall(r'<section id="([a-z]+)">(.*?)</section>', page_html, flags=re.S))
    assert set(found) == set(SECTIONS)
    return found


def assert_self_contained(page_html: str) -> None:
    """Readable without a server or network: no script, no stylesheet link, every src/href an embedded PNG."""
    lowered = page_html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered and "url(" not in lowered
    assert "http://" not in lowered and "https://" not in lowered
    references = re.findall(r'(?:src|href)="([^"]*)"', page_html)
    assert references, "the page has its plots"
    for reference in references:
        assert reference.startswith("data:image/png;base64,")
        assert base64.b64decode(reference.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_section_from_a_synthetic_run():
    page = report_page(synthetic_run())
    page["versions"], page["held"] = synthetic_versions(), ["v0002"]
    text = render(page)
    assert_self_contained(text)
    part = sections(text)

    assert "2.1250" in part["eval"] and "2.375" in part["eval"] and "2.250" in part["eval"]  # v0002 loss and ε
    assert "F1 0.625" in part["tasks"] and "EM 0.500" in part["tasks"] and "ROUGE-L 0.350" in part["tasks"]
    # side by side: base, local (blank for south, which has none), central and the last version
    row = re.search(r"<tr><td>south</td>(.*?)</tr>", part["baselines"]).group(1)
    assert re.findall(r">([^<]*)</td>", row) == ["2.7500", "–", "2.3125", "2.3750"]
    assert "global v0002" in part["baselines"] and "F1 0.500" in part["baselines"]
    assert "0.8750" in part["contributions"] and "0.3125" in part["contributions"] and "0.6250" in part["contributions"]
    assert "west-2" in part["rejected"]
    assert "east" in part["participation"] and "deadline" in part["participation"]
    assert "3.000" in part["privacy"] and "central" in part["privacy"]
    assert "3.00 MB" in part["cost"] and "1.50 MB" in part["cost"] and "12.5" in part["cost"]
    assert "norm jumped" in part["alerts"] and "held" in part["alerts"] and "v0002" in part["alerts"]

    # Text that came from files is shown, never run: the reason, the alert and the run's name are escaped.
    assert "&lt;script&gt;alert(&#x27;site&#x27;)&lt;/script&gt;" in part["rejected"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in part["alerts"]
    assert "<b>" not in text and "&lt;b&gt;clinics&lt;/b&gt;" in text


def test_a_run_without_evaluation_or_registry_says_so():
    text = render(report_page(None))
    part = sections(text)
    assert "No evaluation" in part["eval"] and "No task metrics" in part["tasks"]
    assert "No round has merged" in part["contributions"] and "Differential privacy is off" in part["privacy"]
    assert "<script" not in text.lower() and "http" not in text


def test_write_report_writes_the_page_beside_the_json(tmp_path):
    write_report(tmp_path, synthetic_run())
    assert json.loads((tmp_path / "report.json").read_text()) == synthetic_run()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert_self_contained(text)
    assert "2.1250" in sections(text)["eval"]


@pytest.fixture(scope="module")
def registry_world(tiny_model, tmp_path_factory):
    """A real signed federation: round 1 with a crafted extra update folder (dev's update again, re-signed
    with a fresh nonce, under a folder name that is HTML), merged; then a rollback whose reason is HTML."""
    from fedtune.aggregate import aggregate_round
    from fedtune.audit import rollback

    world = fedkit.build_world(tmp_path_factory.mktemp("report") / "w", tiny_model)
    fedkit.copy_update(world.round1 / "dev", world.round1 / "<script>alert(1)<", scale=1.5)
    aggregate_round(world.config, world.registry, world.round1)
    rollback(world.config, world.registry, "v0000", "</script><script>alert(2)</script> overshot")
    return world


def test_page_from_a_real_registry(registry_world):
    world = registry_world
    page = report_page(None, world.config, world.registry, world.updates)
    assert page["latest"] == "v0002" and page["held"] == []
    first, second = page["versions"]
    manifest = fedkit.read_manifest(world.registry / "v0001")
    assert [(c["site"], c["weight"], c["norm"]) for c in first["contributors"]] == \
        [(c["site"], c["weight"], c["norm"]) for c in manifest["contributors"]]
    assert first["rejected"] == manifest["rejected"] and first["rejected"], "the crafted folder was refused"
    # bytes: every update folder of round-0001 (the crafted one too), and the files a site downloads
    folders = [p for p in world.round1.iterdir() if (p / "manifest.json").is_file()]
    assert first["bytes"]["update_count"] == len(folders) == 4
    assert first["bytes"]["updates"] == sum(f.stat().st_size for p in folders for f in p.rglob("*") if f.is_file())
    assert first["bytes"]["version"] == sum((world.registry / "v0001" / n).stat().st_size for n in SENT_FILES
                                            if (world.registry / "v0001" / n).is_file())
    assert first["seconds"] is not None and first["seconds"] >= 0 and first["seconds_from"] == "manifests"
    assert first["participation"]["sent"] and first["privacy"]["mode"] == "none"
    assert second["rolled_back_to"] == "v0000" and second["contributors"] == []

    text = render(page)
    assert_self_contained(text)
    part = sections(text)
    assert all(site in part["contributions"] for site in ("clinic", "bank"))
    assert "&lt;script&gt;alert(1)&lt;" in part["rejected"]
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt; overshot" in part["rejected"]


def test_a_forged_version_manifest_is_refused(registry_world, tmp_path):
    """The page shows what the coordinator signed: a manifest edited after signing (a weight made larger) stops
    the report with the file named, instead of being shown."""
    world = fedkit.clone_world(registry_world, tmp_path / "w")
    assert world.config.coordinator_key is not None
    manifest = fedkit.read_manifest(world.registry / "v0001")
    manifest["contributors"][0]["weight"] = 0.9
    fedkit.write_manifest(world.registry / "v0001", manifest)
    with pytest.raises(BadInput, match=r"v0001/manifest.sig: not the coordinator's signature"):
        report_page(None, world.config, world.registry, world.updates)
    shutil.rmtree(world.root)


def test_a_held_version_and_its_alerts(registry_world, tmp_path):
    """A version held on an alert (published and signed, not committed: LATEST stays) is listed last, marked held,
    with its alerts; made here as aggregate --hold-on-alert leaves one, signed with the coordinator's key."""
    world = fedkit.clone_world(registry_world, tmp_path / "w")
    held = world.registry / "v0003"
    shutil.copytree(world.registry / "v0002", held)
    manifest = fedkit.read_manifest(held)
    manifest.update(version="v0003", round=3, parent="v0002",
                    parent_sha256=fedkit.sha256(world.registry / "v0002" / "manifest.json"),
                    monitor={"held": True, "sites": {"dev": {"update_norm_z": 6.5}},
                             "alerts": [{"kind": "update", "site": "dev", "metric": "update_norm_z", "value": 6.5,
                                         "threshold": 3.0, "message": "dev's update norm is 6.5 σ above <its> history"}]})
    fedkit.write_manifest(held, manifest)
    fedkit.sign_version(held, world.fed / "coordinator.key")

    page = report_page(None, world.config, world.registry, world.updates)
    assert page["latest"] == "v0002" and page["held"] == ["v0003"]
    assert [(v["version"], v["held"]) for v in page["versions"]] == [("v0001", False), ("v0002", False), ("v0003", True)]
    assert page["versions"][-1]["alerts"] == manifest["monitor"]["alerts"]
    part = sections(render(page))
    assert "v0003" in part["alerts"] and "6.5 σ above &lt;its&gt; history" in part["alerts"]
    assert "6.5000" in part["alerts"] and "LATEST not moved" in part["alerts"]
