"""Tables and charts of a `selfspec bench` run (results.json -> report.md, speedup.png, tau.png).

Per method and category the rate is total new tokens / total decode seconds over the category's
prompts (each prompt's decode time is the median over repeats), so long answers weigh more than
short ones, as they do for a user. Speedup is that rate over our plain decoding's in the same run.
"""
from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from pathlib import Path

from selfspec.paths import atomic_write_text

ALL = "all"


def summarise(results: dict) -> dict:
    """{method: {category: {tokens_per_s, speedup, tau, acceptance, same, mismatches, prompts}}},
    plus the category "all"; methods and categories in run order."""
    runs = results["runs"]
    methods = [m["method"] for m in results["methods"]]
    categories = list(dict.fromkeys(r["category"] for r in runs))
    per_prompt: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        per_prompt[(r["method"], r["prompt_id"])].append(r)
    table: dict[str, dict[str, dict]] = {}
    for method in methods:
        rows = {}
        for cat in categories + [ALL]:
            prompts = [(pid, rs) for (m, pid), rs in per_prompt.items()
                       if m == method and (cat == ALL or rs[0]["category"] == cat)]
            if not prompts:
                continue
            new = sum(rs[0]["new_tokens"] for _, rs in prompts)
            secs = sum(statistics.median(r["decode_seconds"] for r in rs) for _, rs in prompts)
            rounds = sum(rs[0].get("rounds") or 0 for _, rs in prompts)
            drafted = sum(rs[0].get("drafted") or 0 for _, rs in prompts)
            accepted = sum(rs[0].get("accepted") or 0 for _, rs in prompts)
            same = [r.get("same_as_plain") for _, rs in prompts for r in rs]
            own = [r.get("same_as_own_plain") for _, rs in prompts for r in rs]
            rows[cat] = {
                "tokens_per_s": new / secs if secs > 0 else 0.0,
                "tau": new / rounds if rounds else None,
                "acceptance": accepted / drafted if drafted else None,
                "same": None if any(s is None for s in same) else all(same),
                "mismatches": sorted({pid for pid, rs in prompts if any(r.get("same_as_plain") is False for r in rs)}),
                "same_own": None if any(s is None for s in own) else all(own),
                "own_mismatches": sorted({pid for pid, rs in prompts
                                          if any(r.get("same_as_own_plain") is False for r in rs)}),
                "prefill_seconds": statistics.mean(r["prefill_seconds"] for _, rs in prompts for r in rs),
                "prompts": len(prompts),
            }
        table[method] = rows
    base = table.get(methods[0], {}) if methods else {}
    for rows in table.values():
        for cat, row in rows.items():
            b = base.get(cat, {}).get("tokens_per_s")
            row["speedup"] = row["tokens_per_s"] / b if b else None
    return {"methods": methods, "categories": categories, "table": table}


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def write_report(results: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    s = summarise(results)
    methods, cats, table = s["methods"], s["categories"], s["table"]
    st, mach = results["settings"], results["machine"]
    status = {m["method"]: m for m in results["methods"]}
    from selfspec.drafters.factory import ENGINES, OWN_PLAIN

    plain = methods[0] if methods else "none"
    ours = {m for m in methods if status[m]["kind"] not in ENGINES}
    lines = [f"# selfspec bench: {st['model']}, suite `{st['suite']}`", ""]
    if results.get("command"):
        lines += ["```", results["command"], "```", ""]
    sampling = "greedy" if st["temperature"] == 0 else (
        f"temperature {st['temperature']}, top-k {st['top_k']}, top-p {st['top_p']}, min-p {st['min_p']}, seed {st['seed']}")
    lines += [f"Machine: {mach.get('cpu')} ({', '.join(mach.get('flags', [])) or 'no SIMD flags read'}), "
              f"{mach.get('threads')} threads, torch {mach.get('torch')}. Settings: {st['prompts']} prompt{'' if st['prompts'] == 1 else 's'}, "
              f"max {st['max_new_tokens']} new tokens per turn, {st['repeats']} repeat(s) (median), {sampling}, "
              f"dtype {st['dtype']}. Decode tokens/s exclude prefill; speedup is against `{plain}` "
              f"(our plain decoding) in this run.", ""]
    bad = [(m, table[m][ALL]["mismatches"]) for m in methods if table.get(m, {}).get(ALL, {}).get("mismatches")]
    for m in methods:  # a peer's speculation that changed its own engine's output: as loud as ours
        pids = table.get(m, {}).get(ALL, {}).get("own_mismatches")
        if pids and m not in ours and status[m]["kind"] in OWN_PLAIN:
            lines += [f"> **MISMATCH: `{m}` (another engine's speculation) changed its own engine's greedy "
                      f"output** (vs its plain `{_own_plain_label(m, methods)}` run) on {len(pids)} prompt(s): "
                      f"{', '.join(pids)}. Its speculative decoding is not lossless here.", ""]
    for m, pids in bad:
        if m in ours:
            lines += [f"> **MISMATCH: `{m}` produced different greedy output from plain decoding** on "
                      f"{len(pids)} prompt(s): {', '.join(pids)}. A lossless method must not; this is a bug.", ""]
        else:
            lines += [f"> Note: `{m}` (another engine, different numerics) differs from our plain decoding on "
                      f"{len(pids)} prompt(s); reported, not a failure.", ""]
    shown = [m for m in methods if table.get(m)]
    lines += _ranking(methods, table, status, ours, plain)
    lines += ["## Speedup over plain decoding", "",
              "| method | " + " | ".join(cats) + " | **all** |", "|---|" + "---|" * (len(cats) + 1)]
    for m in shown:
        cells = [_fmt(table[m].get(c, {}).get("speedup"), ".2f") + ("x" if table[m].get(c) else "") for c in cats + [ALL]]
        cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    lines += ["", "## Per category and method", "",
              "| category | method | tokens/s | speedup | τ | acceptance | same as plain |", "|---|---|---|---|---|---|---|"]
    for c in cats + [ALL]:
        for m in shown:
            row = table[m].get(c)
            if row is None:
                continue
            differs = ", ".join(row["mismatches"])
            same = {True: "yes", None: "n/a",
                    False: f"differs (other engine): {differs}" if m not in ours else f"**NO: {differs}**"}[row["same"]]
            lines.append(f"| {c} | `{m}` | {row['tokens_per_s']:.1f} | {_fmt(row['speedup'], '.2f')}x | "
                         f"{_fmt(row['tau'], '.2f')} | {_fmt(row['acceptance'], '.0%')} | {same} |")
    lines += _cost_model_table(results, table, cats)
    base_rss = status.get(plain, {}).get("peak_rss_mb")
    lines += ["", "## Methods", "", "| method | status | load s | mean prefill s | peak RSS MB | RSS vs plain |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        info, row = status[m], table.get(m, {}).get(ALL)
        rss = info.get("peak_rss_mb")
        ratio = f"{rss / base_rss - 1:+.1%}" if rss and base_rss else "–"
        state = info["status"] + (f": {_one_line(info['reason'])}" if info.get("reason") else "")
        lines.append(f"| `{m}` | {state} | {_fmt(info.get('load_seconds'), '.1f')} | "
                     f"{_fmt(row and row['prefill_seconds'], '.3f')} | {_fmt(rss, '.0f')} | {ratio} |")
    engines = [(m, status[m]["engine"]) for m in methods if status[m].get("engine")]
    if engines:
        lines += ["", "## Engine builds", ""]
        for m, e in engines:
            build = e.get("build") or {}
            parts = [f"{e.get('engine')} {e.get('version') or '?'}"]
            if e.get("openvino"):
                parts.append(f"OpenVINO {e['openvino']}, precision {e.get('precision')} (CPU default hint "
                             f"{e.get('inference_precision')}), CPU capabilities {', '.join(e.get('cpu_capabilities', []))}")
            if "build" in e:
                parts.append(f"built here for {build.get('isa')} ({', '.join(build.get('flags', []))}), "
                             f"{build.get('cmake_args')}" if build else "not built by `make extras` on this machine")
            if e.get("system_info"):
                parts.append(f"system info: `{e['system_info'].strip()}`")
            lines.append(f"- `{m}`: " + "; ".join(parts) + f"; this machine's ISA: {e.get('machine_isa')}")
    charts = _charts(s, results, out_dir)
    if charts:
        lines += [""] + [f"![{name}]({name})" for name in charts]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _own_plain_label(method: str, methods: list[str]) -> str:
    """The label of the run a peer's speculative method was compared with (same engine, same
    options but the draft), as the user wrote it; the canonical name if it did not run."""
    from selfspec.drafters.factory import OWN_PLAIN, parse_method

    spec = parse_method(method)
    want = (OWN_PLAIN.get(spec.kind, spec.kind), {k: v for k, v in spec.options.items() if k != "draft_model"})
    for m in methods:
        other = parse_method(m)
        if (other.kind, other.options) == want:
            return m
    return want[0]


def _one_line(text: str | None) -> str:
    """A reason fit for a table cell: a multi-line error message on one line, pipes escaped."""
    return " ".join((text or "").split()).replace("|", "\\|")


def _same_cell(row: dict | None, key: str, pids: str, loud: bool) -> str:
    if row is None:
        return "–"
    value = row[key]
    if value is None:
        return "n/a"
    if value:
        return "yes"
    return f"**NO: {pids}**" if loud else f"differs: {pids}"


def _ranking(methods, table, status, ours, plain) -> list[str]:
    """The first table: every method ranked by decode tokens/s over all prompts, with whether its
    output equals its own engine's plain run (the lossless question, asked of every engine) and
    ours; methods that did not run follow with their status."""
    from selfspec.drafters.factory import OWN_PLAIN

    ran = sorted((m for m in methods if table.get(m, {}).get(ALL)), key=lambda m: -table[m][ALL]["tokens_per_s"])
    out = ["## Ranking by decode tokens/s", "",
           f"Every method, fastest first. *Same as its own plain*: greedy output equal to the same engine's "
           f"plain run (ours: `{plain}`; a peer's speculation: that peer's plain method) — a lossless "
           f"speculation must say yes. *Same as ours*: equal to our plain decoding at the same --dtype (a "
           f"`none:dtype=X` row is that plain run itself; other engines' numerics may differ: reported, not a "
           f"failure).", "",
           "| # | method | engine | tokens/s | vs our plain | same as its own plain | same as ours |",
           "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(ran, 1):
        row, kind = table[m][ALL], status[m]["kind"]
        engine = "selfspec" if m in ours else kind.split("-")[0]
        speculative = m in ours and kind != "none" or kind in OWN_PLAIN
        own = _same_cell(row, "same_own", ", ".join(row["own_mismatches"]), loud=speculative)
        n, k = row["prompts"], len(row["mismatches"])
        short = f"{k} of {n} prompts" if k > 3 and m not in ours else ", ".join(row["mismatches"])
        mine = _same_cell(row, "same", short, loud=m in ours)
        out.append(f"| {i} | `{m}` | {engine} | {row['tokens_per_s']:.1f} | {_fmt(row.get('speedup'), '.2f')}x | "
                   f"{own} | {mine} |")
    for m in methods:
        if m not in ran:
            info = status[m]
            out.append(f"| – | `{m}` | {'selfspec' if m in ours else info['kind'].split('-')[0]} | "
                       f"{info['status']}: {_one_line(info.get('reason'))} | | | |")
    return out + [""]


def _cost_model_table(results: dict, table: dict, cats: list[str]) -> list[str]:
    """For cost-aware methods: the speedup their cost model predicted, the one it saw (its own
    tokens per second over its estimate of a plain step), and the speedup measured against the
    plain run."""
    methods = list(dict.fromkeys(r["method"] for r in results["runs"] if r.get("predicted_speedup") is not None))
    if not methods:
        return []
    out = ["", "## Cost model: predicted vs realised speedup", "",
           "| category | method | predicted | realised (own estimate) | measured vs plain |", "|---|---|---|---|---|"]
    for c in cats + [ALL]:
        for m in methods:
            rs = [r for r in results["runs"] if r["method"] == m and (c == ALL or r["category"] == c)
                  and r.get("predicted_speedup") is not None]
            if not rs:
                continue
            pred = statistics.mean(r["predicted_speedup"] for r in rs)
            real = statistics.mean(r["realised_speedup"] for r in rs if r.get("realised_speedup") is not None)
            out.append(f"| {c} | `{m}` | {pred:.2f}x | {real:.2f}x | {_fmt(table[m].get(c, {}).get('speedup'), '.2f')}x |")
    return out


def _charts(s: dict, results: dict, out_dir: Path) -> list[str]:
    from selfspec.errors import MissingExtraError, require_extra

    try:
        require_extra("plots", "matplotlib", what="the bench charts")
    except MissingExtraError as e:  # the measurements are worth keeping without their charts
        logging.getLogger("selfspec.bench").warning("no charts: %s", e)
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in s["methods"][1:] if s["table"].get(m)]
    cats = s["categories"] + [ALL]
    names = []
    if methods:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cats)), 4))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ys = [s["table"][m].get(c, {}).get("speedup") or 0 for c in cats]
            ax.bar([j + i * width for j in range(len(cats))], ys, width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
        ax.set_ylabel("speedup over plain decoding")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "speedup.png", dpi=100)
        plt.close(fig)
        names.append("speedup.png")
    taus = {m: [r["mean_accepted_tokens"] for r in results["runs"]
                if r["method"] == m and r.get("mean_accepted_tokens")] for m in s["methods"]}
    taus = {m: v for m, v in taus.items() if v}
    if taus:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(taus)), 3.5))
        ax.boxplot(list(taus.values()))
        ax.set_xticks(range(1, len(taus) + 1), list(taus), rotation=20, ha="right")
        ax.set_ylabel("τ per prompt (tokens per verify round)")
        fig.tight_layout()
        fig.savefig(out_dir / "tau.png", dpi=100)
        plt.close(fig)
        names.append("tau.png")
    return names


def console_summary(results: dict) -> str:
    """One line per method: tokens/s, speedup over plain decoding and whether the output equals
    plain decoding's (another engine's differing output is flagged as its numerics, ours loudly),
    and for a peer's speculation whether it kept its own engine's plain output (loudly if not)."""
    from selfspec.drafters.factory import ENGINES, OWN_PLAIN

    s = summarise(results)
    status = {m["method"]: m for m in results["methods"]}
    lines = []
    for m in s["methods"]:
        row = s["table"].get(m, {}).get(ALL)
        if row is None:
            lines.append(f"{m:24s} {status[m]['status']}: {status[m]['reason']}")
            continue
        differs = "differs from plain (another engine's numerics)" if status[m]["kind"] in ENGINES \
            else "OUTPUT DIFFERS FROM PLAIN"
        flag = {True: "same as plain", None: "", False: differs}[row["same"]]
        if status[m]["kind"] in OWN_PLAIN:
            flag += {True: "; same as its own plain", None: "",
                     False: "; ITS SPECULATION CHANGED ITS OWN OUTPUT"}[row["same_own"]]
        lines.append(f"{m:24s} {row['tokens_per_s']:7.1f} tok/s  {row['speedup']:.2f}x  {flag}")
    return "\n".join(lines)
