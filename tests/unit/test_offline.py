"""prepare must not reach the network: no model or suffix-list download, whatever the cache holds."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import socket, sys
    from collections import Counter

    def refuse(*args, **kwargs):
        raise OSError("network access during prepare")

    socket.socket.connect = refuse
    socket.create_connection = refuse

    from fedtune.data.pii import PiiPolicy, PiiScrubber
    from fedtune.data.quality import LanguageFilter
    import tldextract.tldextract as tx

    counts = Counter()
    text = PiiScrubber(PiiPolicy(countries=["US", "GB"])).scrub(
        "Mail ana.lopez@hospital-example.co.uk or call +44 20 7946 0958.", counts)
    assert text == "Mail <EMAIL> or call <PHONE>.", text
    assert tx.TLD_EXTRACTOR.suffix_list_urls == (), tx.TLD_EXTRACTOR.suffix_list_urls
    lang, score = LanguageFilter(["en"], 20, 0.5).detect("The patient was discharged after two days of rest.")
    assert lang == "en", lang
    print("offline ok")
""")


def test_pii_and_language_work_with_the_network_refused(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),  # an empty cache folder
           "TLDEXTRACT_CACHE": str(tmp_path / "tld-cache")}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offline ok" in result.stdout
