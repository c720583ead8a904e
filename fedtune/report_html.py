"""The report page as one self-contained HTML file: plots embedded as PNG data URIs, inline CSS, no script, and
every text that came from a file (site names, reasons, alert messages) escaped."""

from __future__ import annotations

import base64
import html
import io

from fedtune.report import report_rows

TASK_METRICS = (("exact_match", "EM"), ("token_f1", "F1"), ("rouge_l", "ROUGE-L"))
BASELINE_KINDS = ("base", "local", "central")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.92em; } .held { color: #a40; font-weight: bold; }
img { max-width: 100%; }
"""


def render(page: dict) -> str:
    """The whole page as HTML text."""
    run = page.get("run") or {"base": {}, "rounds": []}
    versions = page.get("versions") or []
    sections = [
        _section("eval", "Eval loss per site by version", _eval(run)),
        _section("tasks", "Task metrics per site by version", _tasks(run)),
        _section("baselines", "Base, local-only, central and global side by side", _baselines(run)),
        _section("contributions", "Weights and contributions per round", _contributions(versions)),
        _section("rejected", "Rejected updates and equivocations", _rejected(versions)),
        _section("participation", "Participation per round", _participation(versions)),
        _section("privacy", "Privacy spent (ε)", _privacy(versions)),
        _section("cost", "Bytes and seconds per round", _cost(versions)),
        _section("alerts", "Alerts and held versions", _alerts(versions, page.get("held") or [])),
    ]
    facts = [("method", page.get("method")), ("registry", page.get("registry")), ("latest", page.get("latest")),
             ("versions made by rounds", len(versions) if page.get("registry") else None),
             ("generated", page.get("generated"))]
    header = "<p class=\"note\">" + " · ".join(f"{_e(k)}: {_e(v)}" for k, v in facts if v is not None) + "</p>"
    if run.get("stopped"):
        header += f"<p class=\"held\">stopped early: {_e(run['stopped'])}</p>"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(page.get('name'))} — fedtune report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{_e(page.get('name'))}</h1>\n{header}\n" + "\n".join(sections) + "\n</body>\n</html>\n")


# --- the sections ---------------------------------------------------------------------------------------


def _eval(run: dict) -> str:
    if not run.get("base"):
        return _none("no evaluation: give --data (prepared site folders) to evaluate each version, or a run's "
                     "report.json")
    header, rows = report_rows(run)
    note = _note("Token-weighted next-token loss on each site's eval split (lower is better). "
                 + ("ε: the privacy spent up to that version (dashed line)." if header[-1] == "ε" else ""))
    return _image(loss_figure(run), "eval loss per site by version") + _table(header, rows) + note


def _tasks(run: dict) -> str:
    tasks = run.get("tasks") or {}
    notes = "".join(_note(line) for line in run.get("notes") or [])
    if not tasks:
        return _none("no task metrics were computed") + notes
    sites = sorted({site for scores in tasks.values() for site in scores})
    order = [n for n in ["base", *(r["version"] for r in run.get("rounds", [])), "local", "central"] if n in tasks]
    order += [n for n in tasks if n not in order]
    rows = [[name] + [_task_cell(tasks[name].get(site)) for site in sites] for name in order]
    return (_image(_task_figure(tasks, order, sites), "token F1 per site by version")
            + _table(["version", *sites], rows)
            + _note("Generated answers against the references: exact match, token F1 and ROUGE-L, each in [0, 1] "
                    "(higher is better).") + notes)


def _baselines(run: dict) -> str:
    if not run.get("base"):
        return _none("no evaluation to compare")
    columns = [("base", run["base"])] + [(kind, losses) for kind, losses in (run.get("baselines") or {}).items()]
    if run.get("rounds"):
        last = run["rounds"][-1]
        columns.append((f"global {last['version']}", last["eval"]))
    sites = list(run["base"])
    rows = [[site] + [_num(losses.get(site)) for _, losses in columns] for site in sites]
    body = _table(["site", *(name for name, _ in columns)], rows)
    tasks = run.get("tasks") or {}
    task_columns = [(name, tasks[key]) for name, key in
                    [(k, k) for k in BASELINE_KINDS] + ([(f"global {run['rounds'][-1]['version']}",
                                                           run["rounds"][-1]["version"])] if run.get("rounds") else [])
                    if key in tasks]
    if task_columns:
        rows = [[site] + [_task_cell(scores.get(site)) for _, scores in task_columns] for site in sites]
        body += _table(["site (task metrics)", *(name for name, _ in task_columns)], rows)
    if not run.get("baselines"):
        body += _note("No local-only or central baselines in this run (simulate --baselines local,central).")
    return body + _note("local: each site trained alone for the same steps; central: one adapter on all honest "
                        "sites' data pooled; global: the last version evaluated.")


def _contributions(versions: list[dict]) -> str:
    rows = []
    for v in versions:
        for c in v["contributors"]:
            share = c.get("contribution") or {}
            rows.append([v["version"], c["site"], _num(c.get("weight")), _num(c.get("norm")),
                         _num(c.get("clip_scale")), _num(c.get("staleness"), "d"), _num(share.get("loo_cosine")),
                         _num(share.get("loo_distance")), _num(share.get("loo_relative"))])
    if not rows:
        return _none("no round has merged an update yet")
    figure = _weights_figure(versions)
    return ((_image(figure, "weight of each site per version") if figure else "")
            + _table(["version", "site", "weight", "norm", "clip scale", "staleness", "LOO cosine", "LOO distance",
                      "LOO relative"], rows)
            + _note("weight: the site's share of the merge; norm: its update's L2 norm; clip scale: the factor "
                    "clipping applied. Leave-one-out: cosine between the aggregate and the aggregate without the "
                    "site, ‖Δ − Δ₋ₖ‖, and that over ‖Δ‖. A blank (–) is a value the manifest does not carry "
                    "(secure aggregation hides one site's weight and norm)."))


def _rejected(versions: list[dict]) -> str:
    rejected = [[v["version"], r["site"], r["reason"]] for v in versions for r in v["rejected"]]
    equivocations = [[v["version"], e["site"], ", ".join(e["folders"])] for v in versions for e in v["equivocations"]]
    rollbacks = [[v["version"], v["rolled_back_to"], v.get("reason") or ""] for v in versions if v.get("rolled_back_to")]
    body = _table(["version", "site", "reason"], rejected) if rejected else _none("no update was rejected")
    body += (_table(["version", "site", "update folders (all rejected)"], equivocations) if equivocations
             else _none("no equivocation (no site signed two different updates in a round)"))
    if rollbacks:
        body += _table(["version", "rolled back to", "reason"], rollbacks)
    return body


def _participation(versions: list[dict]) -> str:
    rows = []
    for v in versions:
        called = v.get("participation")
        merged = ", ".join(c["site"] for c in v["contributors"])
        if called:
            rows.append([v["version"], ", ".join(called["called"]), ", ".join(called["sent"]),
                         ", ".join(called["missing"]) or "none", called["draw"], called["closed"], merged])
        else:
            rows.append([v["version"], "–", "–", "–", "–", "–", merged])
    if not rows:
        return _none("no round yet")
    return _table(["version", "called", "sent", "missing", "draw", "closed", "merged"], rows)


def _privacy(versions: list[dict]) -> str:
    rows = [[v["version"], v["privacy"]["mode"], _num(v["privacy"]["epsilon"], ".3f"), _num(v["privacy"]["delta"], "g"),
             _num(v["privacy"]["rounds_accounted"], "d")] for v in versions if v["privacy"]["mode"] != "none"]
    if not rows:
        return _none("differential privacy is off: no ε is claimed")
    return _table(["version", "mode", "ε spent", "δ", "rounds accounted"], rows)


def _cost(versions: list[dict]) -> str:
    if not versions:
        return _none("no round yet")
    rows = [[v["version"], _num(v["bytes"]["update_count"], "d"), _bytes(v["bytes"]["updates"]),
             _bytes(v["bytes"]["version"]), _num(v["seconds"], ".1f"), v["seconds_from"]] for v in versions]
    return (_image(_cost_figure(versions), "bytes and seconds per round")
            + _table(["version", "updates received", "update bytes", "version bytes (sent to each site)", "seconds",
                      "timed by"], rows)
            + _note("Update bytes: every update folder in the round's updates folder (– when no updates folder was "
                    "given). Seconds: measured by simulate, or between the commits of consecutive versions "
                    "(manifests), which includes any wait for sites."))


def _alerts(versions: list[dict], held: list[str]) -> str:
    alerts = [[v["version"], a.get("kind"), a.get("site"), a.get("metric"), _num(a.get("value")),
               _num(a.get("threshold")), a.get("message")] for v in versions for a in v.get("alerts") or []]
    body = (_table(["version", "kind", "site", "metric", "value", "threshold", "message"], alerts) if alerts
            else _none("no alerts"))
    if held:
        body += ("<p class=\"held\">held (published, LATEST not moved until `fedtune promote`): "
                 + _e(", ".join(held)) + "</p>")
    else:
        body += _none("no held versions")
    promoted = [[v["version"], _num(v["promoted"].get("alerts"), "d"), v["promoted"].get("promoted"),
                 v["promoted"].get("reason") or ""] for v in versions if v.get("promoted")]
    if promoted:
        body += _table(["version promoted", "alerts it was held on", "promoted at", "reason"], promoted)
    metrics = [[v["version"], site, ", ".join(f"{k} {_num(x)}" for k, x in values.items())]
               for v in versions for site, values in (v.get("monitor") or {}).items()]
    if metrics:
        body += _table(["version", "site", "monitored metrics"], metrics)
    return body


# --- figures --------------------------------------------------------------------------------------------


def loss_figure(report: dict) -> bytes:
    """PNG of eval loss per site by version, with the ε spent beside it under differential privacy."""
    figure, ax = _new_figure()
    sites = list(report["base"])
    rounds = list(range(len(report["rounds"]) + 1))
    for site in sites:
        losses = [report["base"][site]] + [r["eval"][site] for r in report["rounds"]]
        ax.plot(rounds, losses, marker="o", label=site)
    ax.set_xticks(rounds, ["base"] + [r["version"] for r in report["rounds"]])
    ax.set_xlabel("global version (round)")
    ax.set_ylabel("eval loss (token-weighted)")
    ax.set_title(report.get("name", "federation"))
    ax.grid(alpha=0.3)
    if sites:
        ax.legend(loc="best")
    spent = [r.get("epsilon") for r in report["rounds"]]
    if spent and all(e is not None for e in spent):
        # Under differential privacy, the ε spent up to each version beside the loss it bought.
        budget = ax.twinx()
        budget.plot(rounds, [0.0] + spent, color="black", linestyle="--", marker="s", label="ε spent")
        budget.set_ylabel("ε spent (δ as in federation.yaml)")
        budget.legend(loc="lower left")
    return _png(figure)


def _task_figure(tasks: dict, order: list[str], sites: list[str]) -> bytes:
    figure, ax = _new_figure()
    for site in sites:
        points = [(i, tasks[n][site]["token_f1"]) for i, n in enumerate(order) if site in tasks[n]]
        ax.plot([i for i, _ in points], [y for _, y in points], marker="o", label=site)
    ax.set_xticks(range(len(order)), order)
    ax.set_ylabel("token F1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _png(figure)


def _weights_figure(versions: list[dict]) -> bytes | None:
    merged = [v for v in versions if v["contributors"] and all(c.get("weight") is not None for c in v["contributors"])]
    if not merged:
        return None
    figure, ax = _new_figure()
    sites = sorted({c["site"] for v in merged for c in v["contributors"]})
    bottom = [0.0] * len(merged)
    for site in sites:
        heights = [next((c["weight"] for c in v["contributors"] if c["site"] == site), 0.0) for v in merged]
        ax.bar(range(len(merged)), heights, bottom=bottom, label=site)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(merged)), [v["version"] for v in merged])
    ax.set_ylabel("weight in the merge")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)


def _cost_figure(versions: list[dict]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 3.2), dpi=110)
    sizes, times = figure.subplots(1, 2)
    places = range(len(versions))
    received = [v["bytes"]["updates"] or 0 for v in versions]
    sent = [v["bytes"]["version"] for v in versions]
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if max(received + sent) >= s),
                       ("B", 1))
    sizes.bar([p - 0.2 for p in places], [b / scale for b in received], width=0.4, label="updates received")
    sizes.bar([p + 0.2 for p in places], [b / scale for b in sent], width=0.4, label="version sent (to one site)")
    sizes.set_xticks(list(places), [v["version"] for v in versions])
    sizes.set_ylabel(unit)
    sizes.legend(loc="lower right")
    times.bar(list(places), [v["seconds"] or 0 for v in versions], color="gray")
    times.set_xticks(list(places), [v["version"] for v in versions])
    times.set_ylabel("seconds per round")
    return _png(figure)


def _new_figure():
    from matplotlib.figure import Figure

    # matplotlib's object API, not pyplot: no global figure state, no GUI backend.
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    return figure, figure.subplots()


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# --- HTML pieces ----------------------------------------------------------------------------------------


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id=\"{_e(anchor)}\">\n<h2>{_e(title)}</h2>\n{body}\n</section>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _cell(value) -> str:
    text = "" if value is None else str(value)
    numeric = text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()
    return f"<td class=\"num\">{_e(text)}</td>" if numeric else f"<td>{_e(text)}</td>"


def _image(png: bytes, alt: str) -> str:
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">\n"


def _note(text: str) -> str:
    return f"<p class=\"note\">{_e(text)}</p>\n"


def _none(text: str) -> str:
    return f"<p class=\"note\">{_e(text[0].upper() + text[1:])}.</p>\n"


def _num(value, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _bytes(count: int | None) -> str:
    if count is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _task_cell(task: dict | None) -> str:
    if not task:
        return "–"
    return " · ".join(f"{label} {task[key]:.3f}" for key, label in TASK_METRICS if task.get(key) is not None)
