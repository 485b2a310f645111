"""What a skip-search study found: its best trials as rows, and two charts (objective per trial;
which sub-layers the best sets skip, as a heat map over layer x {attention, MLP}). Reads the
study's storage only; no model is loaded."""
from __future__ import annotations

from pathlib import Path

import optuna

from selfspec.search.study import SearchError, SkipSpace, feasible_trials, open_storage, redact


def load_study(url: str, study_name: str | None = None):
    """The study `study_name` in `url` (or the only one there)."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).expanduser().is_file():
        raise SearchError(f"no study storage at {url}: the file does not exist")
    storage = open_storage(url)
    names = optuna.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise SearchError(f"{redact(url)} holds {len(names)} studies; pick one with --study-name: "
                              + (", ".join(names) or "(none)"))
        study_name = names[0]
    if study_name not in names:
        raise SearchError(f"no study {study_name!r} in {redact(url)}; it holds: {', '.join(names) or '(none)'}")
    return optuna.load_study(study_name=study_name, storage=storage)


def best_rows(study, top: int = 10) -> list[dict]:
    rows = []
    for t in feasible_trials(study)[:top]:
        space = _space(study, t)
        skip = space.decode(t.params)
        a = t.user_attrs
        rows.append({"trial": t.number, "value": t.value, "skip_fraction": a.get("skip_fraction"),
                     "attention": sorted(skip.attention), "mlp": sorted(skip.mlp), "tau": a.get("tau"),
                     "acceptance_rate": a.get("acceptance_rate"), "repeat_of": a.get("repeat_of")})
    return rows


def _space(study, trial) -> SkipSpace:
    n = int(study.user_attrs.get("n_layers", 0))
    layers = sorted({int(k.split(".")[1]) for k in trial.params})
    if not layers:
        return SkipSpace(n, 0, n)
    return SkipSpace(n, layers[0], n - 1 - layers[-1])


def write_charts(study, folder: str | Path, top: int = 10) -> list[Path]:
    """`<study>-trials.png` and `<study>-skips.png` in `folder`."""
    from selfspec.errors import require_extra

    require_extra("plots", "matplotlib", what="the search charts")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    objective = study.user_attrs.get("objective", "objective")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ok = [t for t in done if t.user_attrs.get("feasible")]
    bad = [t for t in done if not t.user_attrs.get("feasible")]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter([t.number for t in ok], [t.value for t in ok], s=18, label="trial")
    if bad:
        ax.scatter([t.number for t in bad], [0.0] * len(bad), marker="x", color="0.6", s=14,
                   label="broke a constraint (not measured)")
    best, xs, ys = None, [], []
    for t in sorted(ok, key=lambda t: t.number):
        best = t.value if best is None else max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    baseline = study.user_attrs.get("baseline_tokens_per_s")
    if objective == "tokens_per_s" and baseline:
        ax.axhline(baseline, color="C2", linestyle="--", label=f"plain decoding ({baseline:.1f})")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(f"{study.study_name}: {objective} per trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    trials_png = folder / f"{study.study_name}-trials.png"
    fig.savefig(trials_png, dpi=110)
    plt.close(fig)

    n = int(study.user_attrs.get("n_layers", 0))
    best_sets = feasible_trials(study)[:top]
    share = [[0.0] * n, [0.0] * n]
    for t in best_sets:
        skip = _space(study, t).decode(t.params)
        for row, ids in enumerate((skip.attention, skip.mlp)):
            for i in ids:
                share[row][i] += 1 / len(best_sets)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 2.6))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks([0, 1], ["attention", "MLP"])
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"share of the best {len(best_sets)} sets that skip each sub-layer", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    skips_png = folder / f"{study.study_name}-skips.png"
    fig.savefig(skips_png, dpi=110)
    plt.close(fig)
    return [trials_png, skips_png]


def show(url: str, study_name: str | None, folder: Path, as_json: bool) -> None:
    """`selfspec search --report`: the best trials as a table (or JSON) and the charts in `folder`."""
    import json
    import sys

    from rich.console import Console
    from rich.table import Table

    study = load_study(url, study_name)
    rows = best_rows(study)
    charts = write_charts(study, folder)
    if as_json:
        sys.stdout.write(json.dumps({"study": study.study_name, "best": rows, "charts": [str(p) for p in charts]}) + "\n")
        return
    done = sum(t.state.name == "COMPLETE" for t in study.trials)
    table = Table("trial", study.user_attrs.get("objective", "value"), "skip", "tau", "accepted", "attention", "mlp",
                  title=f"{study.study_name} ({study.user_attrs.get('model')}, {done} finished trials)")
    for r in rows:
        table.add_row(str(r["trial"]), f"{r['value']:.4g}", f"{100 * (r['skip_fraction'] or 0):.0f}%",
                      "-" if r["tau"] is None else f"{r['tau']:.2f}",
                      "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%",
                      " ".join(map(str, r["attention"])), " ".join(map(str, r["mlp"])))
    Console().print(table)
    for p in charts:
        print(f"wrote {p}", file=sys.stderr)
