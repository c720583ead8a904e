import json


def test_round_one_fixture(round_one, federation):
    sites = sorted(p.name for p in round_one.iterdir())
    assert sites == ["bank", "clinic", "dev"]
    manifest = json.loads((round_one / "clinic" / "manifest.json").read_text())
    assert manifest["round"] == 1 and manifest["parent"]["version"] == "v0000"
