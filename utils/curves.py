# Curves of tensorboard scalars from several run folders in one figure, one panel per tag, one line per run: the
# figures of docs/lawm.md (the IDM's action-recovery R² with its controls, kl_u, imagined against real reward).
#   python utils/curves.py --runs runs/a runs/b --labels base "kl-balance-u 0" --out docs/figures/x.png
# A run folder is read as written by the scripts' SummaryWriter; a tag a run did not log is left out of its panel.
from dataclasses import dataclass, field
from pathlib import Path

import tyro

DEFAULT_TAGS = (
    "world_model/idm_action_r2",
    "world_model/kl_u",
    "eval/imagined_reward",
    "eval/real_reward",
)


@dataclass
class Args:
    runs: list[str]
    """run folders (each with the events file of one run)"""
    out: str
    """the figure to write (png)"""
    labels: list[str] = field(default_factory=list)
    """a legend label per run (default: the folder names)"""
    tags: list[str] = field(default_factory=lambda: list(DEFAULT_TAGS))
    """the scalars to plot, one panel each"""
    title: str = ""
    """the figure's title"""


def read_scalars(run_dir: Path) -> dict:
    """{tag: (steps, values)} of every scalar in the run folder's events files (the last value wins at a step
    written twice, as after a resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points = scalars.setdefault(tag, {})
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    steps = {tag: sorted(p) for tag, p in scalars.items()}
    return {tag: (steps[tag], [p[s] for s in steps[tag]]) for tag, p in scalars.items()}


def plot(runs: list[Path], labels: list[str], tags: list[str], out: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_scalars(r) for r in runs]
    fig, axes = plt.subplots(1, len(tags), figsize=(4 * len(tags), 3.6), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        for i, (scalars, label) in enumerate(zip(data, labels, strict=True)):
            if tag in scalars:
                ax.plot(*scalars[tag], color=f"C{i}", label=label, marker="." if len(scalars[tag][0]) < 10 else None)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("model step" if tag.startswith("world_model/") else "agent step")
    handles = [plt.Line2D([], [], color=f"C{i}", label=label) for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs = [Path(r) for r in args.runs]
    labels = args.labels or [r.name for r in runs]
    if len(labels) != len(runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(runs)} runs")
    missing = [str(r) for r in runs if not list(r.glob("events.out.tfevents.*"))]
    if missing:
        raise SystemExit(f"error: no tensorboard events file in {', '.join(missing)}")
    plot(runs, labels, args.tags, Path(args.out), args.title)
    print(f"wrote {args.out}")
