"""Throughput and memory of `fedtune prepare` on generated site data, against Presidio's own batch engines.

    python benchmarks/prepare.py                      # 200k records, with and without near-dup
    python benchmarks/prepare.py --records 50000 --quick
    python benchmarks/prepare.py --gigabytes 2        # the 2 GB input, for peak memory
    python benchmarks/prepare.py --save benchmarks/results/prepare_cpu.json

Records are instruction pairs, conversations and plain paragraphs about clinics, banks and software; about one
in four holds an email, phone number, card number, IBAN, IP address or SSN; a few percent are exact or near
copies of earlier records. Each configuration runs `fedtune prepare` as its own process (what a site runs);
peak memory is sampled every 0.5 s over that process and its workers, as PSS (shared pages counted once)
and as the plain sum of their RSS (shared pages counted in every process: an upper bound).
The peer is Presidio's BatchAnalyzerEngine + BatchAnonymizerEngine with the same recognizers, one process,
on a sample of the same records: the PII step alone, as Presidio's documentation runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

SUBJECTS = {
    "clinic": ["the patient", "the ward nurse", "the on-call doctor", "the pharmacy", "the lab", "the triage team",
               "the discharge desk", "the radiology unit", "the night shift", "the outpatient clinic"],
    "bank": ["the customer", "the branch", "the fraud team", "the loan officer", "the payments desk",
             "the compliance unit", "the card service", "the mortgage team", "the teller", "the call centre"],
    "software": ["the build", "the deploy job", "the API gateway", "the test suite", "the scheduler",
                 "the cache layer", "the login service", "the database migration", "the on-call engineer", "the CLI"],
}
VERBS = ["reviewed", "flagged", "updated", "rescheduled", "confirmed", "escalated", "documented", "rejected",
         "approved", "checked", "logged", "restarted", "measured", "repeated", "closed"]
OBJECTS = ["the request", "the dosage", "the transfer", "the report", "the appointment", "the ticket", "the record",
           "the limit", "the follow-up", "the invoice", "the release", "the result", "the plan", "the claim"]
TAILS = ["before noon", "after the second review", "within two working days", "as the policy requires",
         "without further delay", "once the results were in", "at the end of the week", "on the next visit",
         "after a short call", "because the data were incomplete", "with the usual checks", "in the morning round"]
QUESTIONS = ["What should happen when {s} {v} {o}?", "Who handles {o} after {s} {v} it?",
             "How long does it take before {s} {v} {o}?", "Why was {o} {v} by {s}?",
             "Can {s} still change {o} once it is {v}?"]
FIRST = ["john", "maria", "li", "ahmed", "sofia", "lukas", "emma", "noah", "chloe", "pablo", "giulia", "daan"]
LAST = ["smith", "garcia", "wang", "khan", "rossi", "muller", "martin", "jansen", "lopez", "brown", "dubois"]
DOMAINS = ["example.com", "clinic-mail.org", "bank.example.co.uk", "corp.example.de", "mail.example.fr"]


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def _iban(country: str, bban: str) -> str:
    digits = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    check = 98 - int(digits) % 97
    raw = f"{country}{check:02d}{bban}"
    return " ".join(raw[i:i + 4] for i in range(0, len(raw), 4))


def pii_value(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return f"{rng.choice(FIRST)}.{rng.choice(LAST)}{rng.randrange(100)}@{rng.choice(DOMAINS)}"
    if kind == 1:
        return f"+1 {rng.choice(['212', '415', '617', '312'])}-{rng.randrange(200, 999)}-{rng.randrange(1000, 9999)}"
    if kind == 2:
        return f"+44 20 7{rng.randrange(100, 999)} {rng.randrange(1000, 9999)}"
    if kind == 3:
        card = _luhn_complete("4", 16, rng)
        return " ".join(card[i:i + 4] for i in range(0, 16, 4))
    if kind == 4:
        return _iban("DE", "".join(rng.choice("0123456789") for _ in range(18)))
    if kind == 5:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    area = rng.choice([n for n in range(1, 900) if n != 666])
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def sentence(rng: random.Random, domain: str) -> str:
    return (f"{rng.choice(SUBJECTS[domain]).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(TAILS)}, case {rng.randrange(100000)}.")


def make_record(rng: random.Random, long: bool = False) -> dict:
    domain = rng.choice(list(SUBJECTS))
    answer = " ".join(sentence(rng, domain) for _ in range(rng.randint(10, 30) if long else rng.randint(1, 4)))
    if rng.random() < 0.25:
        answer += f" Contact: {pii_value(rng)}."
    shape = rng.random()
    if shape < 0.6:
        question = rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS[domain]), v=rng.choice(VERBS), o=rng.choice(OBJECTS))
        return {"instruction": question, "output": answer}
    if shape < 0.8:
        return {"messages": [{"role": "user", "content": sentence(rng, domain)},
                             {"role": "assistant", "content": answer}]}
    return {"text": sentence(rng, domain) + " " + answer}


def near_copy(record: dict, rng: random.Random) -> dict:
    """The same record with one word changed and its case altered: a near-duplicate."""
    def edit(text: str) -> str:
        words = text.split()
        words[rng.randrange(len(words))] = rng.choice(["also", "then", "again", "still"])
        return " ".join(words).upper() if rng.random() < 0.5 else " ".join(words)
    if "output" in record:
        return {**record, "output": edit(record["output"])}
    if "messages" in record:
        return {"messages": record["messages"][:-1] + [{"role": "assistant", "content": edit(record["messages"][-1]["content"])}]}
    return {"text": edit(record["text"])}


def write_corpus(path: Path, records: int | None, gigabytes: float | None, long: bool = False, seed: int = 0) -> dict:
    rng = random.Random(seed)
    written = size = near = exact = 0
    recent: list[dict] = []
    limit = int(gigabytes * 1e9) if gigabytes else None
    with open(path, "w", encoding="utf-8") as handle:
        while (records is None or written < records) and (limit is None or size < limit):
            roll = rng.random()
            if recent and roll < 0.03:
                record, near = near_copy(rng.choice(recent), rng), near + 1
            elif recent and roll < 0.05:
                record, exact = rng.choice(recent), exact + 1
            else:
                record = make_record(rng, long)
                recent = (recent + [record])[-1000:]
            line = json.dumps(record) + "\n"
            handle.write(line)
            written += 1
            size += len(line.encode())
    return {"records": written, "bytes": size, "near_copies": near, "exact_copies": exact}


def federation(folder: Path, near: bool) -> Path:
    """A federation on the embedded model whose sites write US, UK and German contact details."""
    import yaml

    base = folder / "base"
    if not (base / "federation.yaml").exists():
        subprocess.run([sys.executable, "-m", "fedtune.cli", "init", str(base), "--site", "site"], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    data = yaml.safe_load((base / "federation.yaml").read_text())
    data["data"]["pii"]["countries"] = ["US", "GB", "DE"]
    data["data"]["dedup"]["near"] = near
    path = folder / f"federation-near-{near}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tree_memory(process: psutil.Process) -> tuple[int, int, int]:
    """(resident, proportional, proportional anonymous) bytes of a process and its workers. Forked workers
    share the parent's pages, so the resident sum counts those pages once per process (an upper bound); the
    proportional set size (PSS) splits each shared page among the processes that map it, so its sum counts
    every page once. The anonymous part leaves out pages of the on-disk Arrow tables that datasets maps
    into each process: clean page cache the kernel can drop at any time."""
    rss = pss = anon = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            rss += proc.memory_info().rss
            with open(f"/proc/{proc.pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss_Anon:"):
                        anon += int(line.split()[1]) * 1024
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            pass
    return rss, pss, anon


def run_prepare(config: Path, data: Path, out: Path, num_proc: int) -> dict:
    command = [sys.executable, "-m", "fedtune.cli", "prepare", "--config", str(config), "--site", "site",
               "--input", str(data), "--out", str(out), "--num-proc", str(num_proc), "--json"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    watched = psutil.Process(child.pid)
    peak = peak_pss = peak_anon = 0
    while child.poll() is None:
        rss, pss, anon = _tree_memory(watched)
        peak, peak_pss, peak_anon = max(peak, rss), max(peak_pss, pss), max(peak_anon, anon)
        time.sleep(0.5)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"prepare failed ({child.returncode}):\n{stderr[-3000:]}")
    card = json.loads(stdout)
    size = data.stat().st_size
    return {
        "records": card["records"]["read"], "kept": card["records"]["kept"], "dropped": card["dropped"],
        "pii_replaced": sum(card["pii_replaced"].values()), "input_mb": round(size / 1e6, 1),
        "wall_s": round(wall, 2), "in_process_s": card["seconds"],
        "docs_per_s": round(card["records"]["read"] / wall), "mb_per_s": round(size / 1e6 / wall, 2),
        "peak_rss_sum_mb": round(peak / 2**20), "peak_pss_mb": round(peak_pss / 2**20),
        "peak_pss_anon_mb": round(peak_anon / 2**20),
    }


def presidio_peer(data: Path, sample: int) -> dict:
    """Presidio's BatchAnalyzerEngine + BatchAnonymizerEngine over the text of `sample` records, with the same
    recognizers fedtune asks for (US/GB/DE phones, email, card, IBAN, IP, US SSN) and no NLP model."""
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from presidio_analyzer import (
        AnalyzerEngine,
        BatchAnalyzerEngine,
        RecognizerRegistry,
    )
    from presidio_analyzer import predefined_recognizers as pr
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_anonymizer import BatchAnonymizerEngine

    texts = []
    with open(data, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if "messages" in row:
                texts.extend(m["content"] for m in row["messages"])
            elif "text" in row:
                texts.append(row["text"])
            else:
                texts.extend([row["instruction"], row["output"]])
            if len(texts) >= sample * 1.5:
                break
    records = sample
    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (pr.EmailRecognizer(), pr.PhoneRecognizer(supported_regions=("US", "GB", "DE")),
                       pr.CreditCardRecognizer(), pr.IbanRecognizer(), pr.IpRecognizer(), pr.UsSsnRecognizer()):
        registry.add_recognizer(recognizer)
    analyzer = BatchAnalyzerEngine(AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"]))
    anonymizer = BatchAnonymizerEngine()
    started = time.perf_counter()
    results = list(analyzer.analyze_iterator(texts, language="en", batch_size=256))
    anonymizer.anonymize_list(texts, results)
    wall = time.perf_counter() - started
    return {"texts": len(texts), "records": records, "wall_s": round(wall, 2), "docs_per_s": round(records / wall),
            "note": "PII step only, one process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--gigabytes", type=float, help="instead of --records: write this much input (long records)")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--peer-sample", type=int, default=20_000, help="records the Presidio peer scrubs")
    parser.add_argument("--quick", action="store_true", help="only the run with near-dup")
    parser.add_argument("--work", type=Path, help="folder for the generated input and outputs (default: a temp dir)")
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "site.jsonl"
    corpus = write_corpus(data, None if args.gigabytes else args.records, args.gigabytes, long=bool(args.gigabytes))
    print(f"input: {corpus['records']} records, {corpus['bytes'] / 1e6:.1f} MB "
          f"({corpus['near_copies']} near copies, {corpus['exact_copies']} exact copies planted); "
          f"{args.num_proc} processes on {os.cpu_count()} cores")
    runs = {}
    for near in ([True] if args.quick or args.gigabytes else [True, False]):
        name = "with near-dup" if near else "without near-dup"
        result = run_prepare(federation(work, near), data, work / f"prepared-{near}", args.num_proc)
        runs[name] = result
        print(f"fedtune prepare, {name}: {result['docs_per_s']} docs/s, {result['mb_per_s']} MB/s, "
              f"{result['wall_s']} s wall ({result['in_process_s']} s after start-up), peak memory "
              f"{result['peak_pss_mb']} MB PSS, {result['peak_pss_anon_mb']} MB of it anonymous ({result['peak_rss_sum_mb']} MB "
              f"summed RSS); kept {result['kept']}, "
              f"dropped {result['dropped']}, {result['pii_replaced']} PII values replaced")
    peer = None
    if args.peer_sample and not args.gigabytes:
        peer = presidio_peer(data, args.peer_sample)
        ours = runs["with near-dup"]["docs_per_s"]
        print(f"Presidio batch engines (PII only, 1 process): {peer['docs_per_s']} docs/s on {peer['records']} records; "
              f"fedtune's whole pipeline is {ours / peer['docs_per_s']:.2f}x that")
    result = {"benchmark": "prepare", "input": corpus, "num_proc": args.num_proc, "runs": runs, "presidio_peer": peer,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}}
    print(json.dumps(result))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
