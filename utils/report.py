# The report of the runs that utils/grid.py made: Table 1's layout (rows env × dataset, columns the methods; mean ±
# std of the final normalized score over seeds), the aggregate over all cells as the interquartile mean with 95%
# stratified bootstrap confidence intervals (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice",
# the method of the rliable library), its figure, and the label-fraction curve. Docs: docs/grid.md.
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATASET_ORDER = ("expert", "medium", "medium-replay", "plan2explore", "random")
BOOTSTRAP_REPS = 50_000  # rliable's default for interval estimates
BOOTSTRAP_SEED = 0


@dataclass
class Args:
    runs_dir: str = "runs"
    """folder of the run folders; every run with a grid.json (written by utils/grid.py) and a summary.json counts"""
    out: str = "docs/results.md"
    """the markdown report; its figures go to `figures/` beside it, and the records of the runs it counted (one
    line of JSON each: method, env, dataset, seed, recipe, scores, commit) to `{out stem}_runs.jsonl` beside it"""
    records: tuple[str, ...] = ()
    """records files of earlier reports (their `*_runs.jsonl`) whose runs count beside the run folders, so that a
    report outlives the folders it was made from and grows from itself: `--records docs/results_runs.jsonl`. A run
    folder wins over a record of the same name"""


def iqm(scores) -> float:
    """Interquartile mean: the mean of the middle 50% of the scores, after cutting int(n / 4) from each end
    (scipy.stats.trim_mean(scores, 0.25), as rliable computes it)."""
    x = np.sort(np.asarray(scores, dtype=float).ravel())
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def bootstrap_iqms(cells: list, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The IQM of `reps` stratified bootstrap resamples: each cell's (task's) runs are drawn with replacement from
    that cell alone, so every resample has the cells' sizes; the IQM is over all drawn runs together."""
    rng, cells, out = np.random.default_rng(seed), [np.asarray(c, dtype=float) for c in cells], []
    for size in np.diff(np.r_[0:reps:5000, reps]):  # in chunks: (chunk, runs) arrays stay small
        draws = np.concatenate([c[rng.integers(0, len(c), (size, len(c)))] for c in cells], axis=1)
        draws.sort(axis=1)
        cut = int(0.25 * draws.shape[1])
        out.append(draws[:, cut : draws.shape[1] - cut].mean(axis=1))
    return np.concatenate(out)


def iqm_ci(cells: list, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """IQM over all runs of all cells and its 95% percentile-bootstrap confidence interval (stratified by cell)."""
    low, high = np.percentile(bootstrap_iqms(cells, reps, seed), [2.5, 97.5])
    return iqm(np.concatenate([np.ravel(c) for c in cells])), float(low), float(high)


def read_runs(runs_dir: Path) -> list[dict]:
    """One record per finished grid run: its grid.json (method, env, dataset, recipe, ...) and from summary.json the
    final and best normalized scores, the labeled fraction it ran with and the commit of its code (`a+b` for a run
    resumed after the code changed: it ran both)."""
    runs = []
    for grid_json in sorted(runs_dir.glob("*/grid.json")):
        try:
            info = json.loads(grid_json.read_text())
            summary = json.loads((grid_json.parent / "summary.json").read_text())
            score = float(summary["final_normalized_score"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not finished
        commits = summary.get("git_commits") or [summary.get("git_commit", "unknown")]
        commit = "+".join(str(c) for c in dict.fromkeys(commits))  # in order, each once
        info.update(name=grid_json.parent.name, score=score, best=float(summary["best_normalized_score"]))
        info.update(labeled_fraction=float(summary["args"]["labeled_fraction"]), commit=commit)
        runs.append(info)
    return runs


def read_records(paths) -> list[dict]:
    """The runs of records files that write_report wrote (one JSON object a line), in order."""
    runs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise SystemExit(f"--records: no file {path}")
        runs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return runs


def short(commit: str) -> str:
    return "+".join(c[:7] + ("-dirty" if c.endswith("-dirty") else "") for c in commit.split("+"))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("s" if n != 1 else "")


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def cell_text(scores: list, bold: bool, mixed: bool) -> str:
    mean = f"{np.mean(scores):.1f} ± {np.std(scores):.1f}"
    return (f"**{mean}**" if bold else mean) + f" ({len(scores)})" + (" †" if mixed else "")


def table(runs: list[dict], fraction, figures: Path, out_dir: Path, slug: str) -> list[str]:
    """Table 1 for one recipe, tag and labeled fraction: its markdown lines, the aggregate and the figure."""
    columns = sorted({(r["column"], r["title"], r["fixed_fraction"]) for r in runs})
    cells = {}  # (env, dataset, title) -> runs
    for r in runs:
        cells.setdefault((r["env"], r["dataset"], r["title"]), []).append(r)
    order = lambda dataset: DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)
    rows = sorted({(r["env"], r["dataset"]) for r in runs}, key=lambda k: (k[0], order(k[1]), k[1]))
    header = ["Environment", "Dataset"] + [title for _, title, _ in columns]
    labels = ["", ""] + [f"{percent(1.0) if fixed else percent(fraction)} labeled" for _, _, fixed in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(labels) + " |"]
    notes, previous_env = [], None
    for env, dataset in rows:
        # the best as shown (one decimal), so that equal numbers are both bold
        means = {
            t: round(np.mean([r["score"] for r in cells[(env, dataset, t)]]), 1)
            for _, t, _ in columns
            if (env, dataset, t) in cells
        }
        best = max(means.values())
        texts = []
        for _, title, _ in columns:
            group = sorted(cells.get((env, dataset, title), []), key=lambda r: r["seed"])
            if not group:
                texts.append("–")
                continue
            commits = sorted({r["commit"] for r in group})
            mixed = len(commits) > 1 or "+" in commits[0]  # seeds of different code, or a run of two versions
            texts.append(cell_text([r["score"] for r in group], means[title] == best, mixed))
            if mixed:
                by = {c: [str(r["seed"]) for r in group if r["commit"] == c] for c in commits}
                ran = [f"seed{'s' if len(s) > 1 else ''} {', '.join(s)} ran `{short(c)}`" for c, s in by.items()]
                notes.append(f"† {env} {dataset} {title}: " + "; ".join(ran))
        lines.append(f"| {env if env != previous_env else ''} | {dataset} | " + " | ".join(texts) + " |")
        previous_env = env
    lines += [""] + [note + "  " for note in notes] + ([""] if notes else [])

    # the aggregate: each column's IQM over all runs of all its cells, resampled by cell
    aggregate = []
    for _, title, _ in columns:
        groups = [
            [r["score"] for r in cells[(env, dataset, title)]] for env, dataset in rows if (env, dataset, title) in cells
        ]
        aggregate.append((title, *iqm_ci(groups), len(groups), sum(map(len, groups))))
    lines += ["Aggregate over the cells (interquartile mean of the final normalized score over every run of every cell, "
              "95% stratified bootstrap confidence interval):", "",
              "| method | IQM | 95% CI | cells | runs |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {t} | {m:.1f} | [{lo:.1f}, {hi:.1f}] | {c} | {n} |" for t, m, lo, hi, c, n in aggregate]
    if len({c for *_, c, _ in aggregate}) > 1:
        lines += ["", "The methods cover different cells: compare their aggregates with care."]
    path = figures / f"{slug}_iqm.png"
    plot_intervals(aggregate, path, f"IQM over {len(rows)} env × dataset cells")
    lines += ["", f"![IQM with 95% CIs]({os.path.relpath(path, out_dir)})", ""]
    return lines


def plot_intervals(aggregate: list, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.45 * len(aggregate) + 1.2))
    for i, (_, mean, low, high, *_) in enumerate(aggregate):
        ax.barh(i, high - low, left=low, height=0.6, alpha=0.5, color=f"C{i}")
        ax.plot([mean, mean], [i - 0.3, i + 0.3], color="k", lw=2)
    ax.set_yticks(range(len(aggregate)), [a[0] for a in aggregate])
    ax.invert_yaxis()
    ax.set_xlabel("final normalized score (IQM, 95% CI)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fraction_curve(runs: list[dict], fractions: list, path: Path, out_dir: Path) -> list[str]:
    """IQM against the labeled fraction, for the methods at the grid's fractions and the Oracles as their points at
    100%, over the cells (env, dataset) that ran every fraction: a point over other cells would compare other envs,
    not other fractions."""
    ran = [
        {(r["env"], r["dataset"]) for r in runs if not r["fixed_fraction"] and r["labeled_fraction"] == f} for f in fractions
    ]
    common = set.intersection(*ran)
    if not common:
        return ["No cell (env, dataset) has runs at every labeled fraction yet.", ""]
    runs = [r for r in runs if (r["env"], r["dataset"]) in common]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {}  # title -> [(fraction, iqm, low, high, cells)]
    for title in sorted({r["title"] for r in runs}, key=lambda t: min(r["column"] for r in runs if r["title"] == t)):
        mine = [r for r in runs if r["title"] == title]
        for fraction in sorted({r["labeled_fraction"] for r in mine}):
            cells = {}
            for r in mine:
                if r["labeled_fraction"] == fraction:
                    cells.setdefault((r["env"], r["dataset"]), []).append(r["score"])
            points.setdefault(title, []).append((fraction, *iqm_ci(list(cells.values())), len(cells)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (title, p) in enumerate(points.items()):
        x, m, lo, hi = (np.array([q[k] for q in p]) for k in range(4))
        if len(x) > 1:
            ax.plot(x, m, "o-", color=f"C{i}", label=title)
            ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2)
        else:  # an Oracle: one point at 100%
            ax.errorbar(x, m, [m - lo, hi - m], fmt="s", color=f"C{i}", capsize=3, label=title)
    every = sorted(set(fractions) | {1.0})
    ax.set_xscale("log")
    ax.set_xticks(every, [percent(f) for f in every])
    ax.minorticks_off()
    ax.set_xlabel("action-labeled trajectories")
    ax.set_ylabel("final normalized score (IQM, 95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    lines = ["| method | " + " | ".join(percent(f) for f in every) + " |", "|---|" + "---|" * len(every)]
    for title, p in points.items():
        at = {q[0]: f"{q[1]:.1f} [{q[2]:.1f}, {q[3]:.1f}], {plural(q[4], 'cell')}" for q in p}
        lines.append(f"| {title} | " + " | ".join(at.get(f, "–") for f in every) + " |")
    where = ", ".join(f"{env} {dataset}" for env, dataset in sorted(common))
    figure = f"![IQM against the labeled fraction]({os.path.relpath(path, out_dir)})"
    return [f"Over the cells that ran every fraction: {where}.", ""] + lines + ["", figure, ""]


def write_report(runs_dir: Path, out: Path, records=()):
    """`out` (markdown) and its figures from every finished grid run in `runs_dir` and in the `records` files: one
    Table 1 per recipe, tag of extra flags and labeled fraction, so runs of different recipes or flags never share a
    cell, and a cell whose seeds ran different commits (or holds a run resumed on other code) is marked. The runs it
    counted go to `{out stem}_runs.jsonl` beside `out`."""
    # one run a name: a later record wins over an earlier one, a run folder over any record
    runs = {run["name"]: run for run in read_records(records) + read_runs(runs_dir)}
    runs, out_dir = sorted(runs.values(), key=lambda run: run["name"]), out.parent
    source = "".join(f" --records {path}" for path in records)
    figures, guide = out_dir / "figures", os.path.relpath(DOCS / "grid.md", out_dir)
    lines = ["# Results", "",
             f"Written by `python utils/report.py --runs-dir {runs_dir}{source} --out {out}` (also at the end of "
             f"`utils/grid.py`, [grid.md]({guide})); do not edit by hand. `{out.stem}_runs.jsonl` beside it holds the "
             "record of every run counted here, so the report can be made again, and extended, without the run folders.",
             "A cell is the mean ± std (over seeds, ddof 0) of the runs' final normalized score (return / 10 of the "
             "final evaluation, `--final-eval-episodes` episodes after training), with the number of seeds in "
             "parentheses; the best mean of each row is in bold; † marks a cell whose seeds ran different commits or "
             "that holds a run resumed on other code. The aggregate is the interquartile mean (IQM) over all runs of "
             f"all cells of a column with a 95% stratified bootstrap confidence interval ({BOOTSTRAP_REPS:,} resamples "
             "of the runs within each cell, percentile interval; Agarwal et al. 2021, the method of rliable).",
             ""]  # fmt: skip
    if not runs:
        lines += [f"No finished grid run in `{runs_dir}` yet: `python utils/grid.py --workers 2` runs Table 1 ({guide})."]
    # by the tag, which names the runs, not by the flags' spelling: `--x 3` and `--x=3` are the same runs to the grid
    for recipe, tag in sorted({(r["recipe"], r["tag"]) for r in runs}):
        mine = [r for r in runs if r["recipe"] == recipe and r["tag"] == tag]
        extra = mine[0]["extra_flags"]
        fractions = sorted({r["labeled_fraction"] for r in mine if not r["fixed_fraction"]}) or [1.0]
        slug = "_".join([out.stem, recipe] + ([tag] if tag else []))
        slug = "".join(c if c.isalnum() or c in "._,=+-" else "_" for c in slug)
        for fraction in fractions:
            chosen = [r for r in mine if r["fixed_fraction"] or r["labeled_fraction"] == fraction]
            commits = sorted({r["commit"] for r in chosen})
            code = ", ".join(f"`{short(c)}` ({plural(sum(r['commit'] == c for r in chosen), 'run')})" for c in commits)
            lines += [
                f"## {recipe} recipe, {percent(fraction)} action-labeled" + (f", extra flags `{extra}`" if extra else "")
            ]
            lines += ["", f"Code: {code}.", ""] + table(chosen, fraction, figures, out_dir, f"{slug}_lf{fraction:g}")
        if len(fractions) > 1:
            lines += [f"### {recipe} recipe{f', `{extra}`' if extra else ''}: IQM against the labeled fraction", ""]
            lines += fraction_curve(mine, fractions, figures / f"{slug}_fractions.png", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    out.with_name(f"{out.stem}_runs.jsonl").write_text("".join(json.dumps(run, sort_keys=True) + "\n" for run in runs))


if __name__ == "__main__":
    args = tyro.cli(Args)
    write_report(Path(args.runs_dir), Path(args.out), args.records)
    print(f"wrote {args.out}")
