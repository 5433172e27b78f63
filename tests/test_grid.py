"""utils/grid.py and utils/report.py: a tiny grid end to end on a tiny dataset (local workers, skipping finished runs,
resuming a killed one), refusals before any launch, the report's numbers from known summaries, IQM and the stratified
bootstrap against their definitions, and the cluster path through submitit (debug executor, and the job array script
handed to a stand-in sbatch)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import cloudpickle
import h5py
import numpy as np
import pytest
import submitit
from conftest import ROOT, write_dataset

sys.path.insert(0, str(ROOT / "utils"))
import grid  # noqa: E402
import report  # noqa: E402


@pytest.fixture
def tiny(tmp_path) -> dict:
    """A 40-trajectory dataset (5% labels: 2 trajectories, as idm_td3_bc.py and lawm.py need) and the grid's paths."""
    write_dataset(tmp_path / "datasets" / "cheetah-run" / "medium-replay.hdf5", episodes=40, episode_length=20)
    paths = {"datasets": tmp_path / "datasets", "runs": tmp_path / "runs", "report": tmp_path / "docs" / "results.md"}
    return paths


def grid_command(tiny: dict, *flags, report: bool = True) -> list[str]:
    """The grid on the tiny dataset; report=False leaves --report at its default."""
    return [sys.executable, str(ROOT / "utils" / "grid.py"), "--envs", "cheetah-run", "--datasets", "medium-replay",
            "--recipe", "smoke", "--datasets-dir", str(tiny["datasets"]), "--runs-dir", str(tiny["runs"]),
            *(["--report", str(tiny["report"])] if report else []), *map(str, flags)]  # fmt: skip


def run_grid(tiny: dict, *flags, env=None, check: bool = True, report: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(grid_command(tiny, *flags, report=report), capture_output=True, text=True, env=env, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"grid failed:\n{out.stdout}\n{out.stderr}")
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_tiny_grid_end_to_end_and_skip_finished(tiny):
    out = run_grid(tiny, "--seeds", "1", "--workers", "2")
    names = sorted(p.name for p in tiny["runs"].iterdir() if (p / "summary.json").exists())
    assert names == sorted(f"cheetah-run__medium-replay__{m}__lf{f}__smoke__1" for m, f in (
        ("td3_bc_oracle", "1"), ("c_lap_oracle", "1"), ("td3_bc", "0.05"), ("c_lap", "0.05"), ("idm_td3_bc", "0.05"),
        ("lawm", "0.05")))  # fmt: skip
    assert "6/6 done (0 finished before), 0 running, 0 queued, 0 failed" in out.stdout
    for name in names:  # each script got its method's flags
        s = summary(tiny["runs"] / name)
        assert s["args"]["exp_name"] == name.split("__")[2] and s["args"]["seed"] == 1
        assert s["args"]["labeled_fraction"] == (1.0 if "oracle" in name else 0.05)
    assert f"{max(1, len(os.sched_getaffinity(0)) // 2)} threads a run" in out.stdout  # the cores over the 2 workers
    text = tiny["report"].read_text()
    assert "| Environment | Dataset | TD3+BC (Oracle) | C-LAP (Oracle) | TD3+BC | C-LAP | IDM-TD3+BC | LAWM |" in text
    assert re.search(r"^\| cheetah-run \| medium-replay \|( [^|]+ \(1\)( †)? \|){6}$", text, re.M)
    assert (tiny["report"].parent / "figures" / "results_smoke_lf0.05_iqm.png").stat().st_size > 1000
    logs = {name: (tiny["runs"] / name / "grid.log").read_text() for name in names}

    again = run_grid(tiny, "--seeds", "1", "--workers", "2")
    assert "6 runs: 6 finished, 0 on the cluster, 0 to resume, 0 to start" in again.stdout
    assert all((tiny["runs"] / n / "grid.log").read_text() == log for n, log in logs.items())  # nothing ran again

    # the scripts record the dataset's hash as the grid computes it; a remade dataset is not mixed with the old runs
    path = tiny["datasets"] / "cheetah-run" / "medium-replay.hdf5"
    assert all(summary(tiny["runs"] / name)["dataset_sha256"] == grid.dataset_sha256(path) for name in names)
    with h5py.File(path, "r+") as f:
        f["rewards"][0] += 1.0
    remade = run_grid(tiny, "--seeds", "1", "--workers", "2", check=False)
    assert remade.returncode == 2 and f"trained on another {path}" in remade.stderr


def test_a_killed_grid_resumes_its_runs(tiny):
    flags = ["--methods", "td3_bc", "--seeds", "1", "--", "--total-steps", "3000", "--eval-every", "100"]
    run_dir = tiny["runs"] / "cheetah-run__medium-replay__td3_bc__lf0.05__smoke__total-steps=3000,eval-every=100__1"
    process = subprocess.Popen(grid_command(tiny, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the grid and its run, as a lost session would
    process.wait()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists()

    docs = {p: p.read_bytes() for p in (ROOT / "docs").rglob("*") if p.is_file()}
    out = run_grid(tiny, *flags, report=False)
    assert "0 finished, 0 on the cluster, 1 to resume, 0 to start" in out.stdout
    # the default report goes to the runs folder, not into the checkout the runs start from (which would make every
    # later run record a -dirty commit)
    assert f"report: {tiny['runs'] / 'results.md'}" in out.stdout and (tiny["runs"] / "results.md").exists()
    assert {p: p.read_bytes() for p in (ROOT / "docs").rglob("*") if p.is_file()} == docs
    log = (run_dir / "grid.log").read_text()
    assert log.count("== ") == 2 and log.split("== ")[2].split("\n")[0].endswith("--resume") and "resumed" in log
    steps = [e["step"] for e in summary(run_dir)["evaluations"]]
    assert steps == list(range(100, 3001, 100))  # the evaluations from before the kill are kept, none is repeated


def test_run_sets_threads_logs_and_resumes(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text("import os, sys\nprint('threads', os.environ['OMP_NUM_THREADS'], sys.argv[1:])\n")
    run = grid.Run("r", str(script), ["--x", "1"], str(tmp_path / "runs"), threads=3)
    assert run() == 0 and "--resume" not in run.command()
    (run.run_dir / "checkpoint.pt").touch()
    assert run() == 0
    log = (run.run_dir / "grid.log").read_text()
    assert "threads 3 ['--x', '1']" in log and "threads 3 ['--x', '1', '--resume']" in log
    # on SLURM, a timeout or preemption requeues the same Run, which then continues with --resume
    delayed = run.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is run
    assert delayed.function.command()[-1] == "--resume"


def test_refusals_before_any_launch_and_dry_run(tiny, capsys):
    args = grid.Args(envs=("cheetah-run",), datasets=("medium-replay", "expert"), methods=("td3_bc",), seeds=(1,),
                     recipe="smoke", datasets_dir=str(tiny["datasets"]), runs_dir=str(tiny["runs"]), report=None)  # fmt: skip
    assert grid.main(args, []) == 2
    err = capsys.readouterr().err
    assert "expert.hdf5 not found" in err
    assert f"python collect_data.py --env cheetah-run --kinds expert --datasets-dir {tiny['datasets']}" in err
    assert not tiny["runs"].exists()  # nothing launched

    # a finished run made with other settings is refused, naming the flag; a dry run prints the commands
    args.datasets = ("medium-replay",)
    run_dir = tiny["runs"] / "cheetah-run__medium-replay__td3_bc__lf0.05__smoke__1"
    run_dir.mkdir(parents=True)
    planned = grid.flag_values(grid.plan(args, [], 1)[0].flags)
    saved = {k: (v[0] if v else True) for k, v in planned.items()} | {"total_steps": 30000}
    (run_dir / "summary.json").write_text(json.dumps({"final_normalized_score": 1.0, "args": saved}))
    assert grid.main(args, []) == 2
    assert "--total-steps 30000 (now 20)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="the grid sets --seed itself"):
        grid.main(args, ["--seed", "3"])
    args.dry_run = True
    assert grid.main(args, ["--alpha", "3"]) == 0
    out = capsys.readouterr().out
    assert "# cheetah-run__medium-replay__td3_bc__lf0.05__smoke__alpha=3__1: new" in out
    assert re.search(r"^OMP_NUM_THREADS=\d+ python \S*td3_bc.py --env cheetah-run .* --alpha 3$", out, re.M)


def test_a_method_at_its_oracles_fraction_is_that_oracle(tiny):
    # C-LAP at 100% is C-LAP (Oracle): one run under the Oracle's name, whether the grid asks for one or both
    args = grid.Args(envs=("cheetah-run",), datasets=("medium-replay",), methods=("c_lap", "c_lap_oracle", "lawm"),
                     seeds=(1,), labeled_fractions=(0.05, 1.0), recipe="smoke", datasets_dir=str(tiny["datasets"]),
                     runs_dir=str(tiny["runs"]), report=None)  # fmt: skip
    runs = grid.plan(args, [], 1)
    names = [r.name.removeprefix("cheetah-run__medium-replay__").removesuffix("__smoke__1") for r in runs]
    assert names == ["c_lap__lf0.05", "c_lap_oracle__lf1", "lawm__lf0.05", "lawm__lf1"]
    oracle = runs[1]
    assert grid.flag_values(oracle.flags)["labeled_fraction"] == ["1.0"] and oracle.flags.count("--labeled-fraction") == 1
    assert oracle.info["title"] == "C-LAP (Oracle)" and oracle.info["fixed_fraction"]
    args.methods = ("c_lap",)
    assert [r.name for r in grid.plan(args, [], 1)] == [r.name for r in runs[:2]]


def test_flag_comparison():
    saved = {"total_steps": 30000, "cuda": True, "alpha": 2.5, "run_name": "x", "env": "cheetah-run"}
    assert grid.differences(["--total-steps", "30000", "--alpha", "2.5", "--run-name", "y"], saved) == []
    assert grid.differences(["--no-cuda", "--env", "walker-walk"], saved) == [
        "--cuda True (now False)", "--env cheetah-run (now walker-walk)"]  # fmt: skip
    assert grid.differences(["--new-flag", "1"], saved) == ["--new-flag not recorded (now 1)"]
    assert grid.tag(["--align-coef", "0", "--no-cuda"]) == "align-coef=0,no-cuda"
    assert grid.tag(["--a", "x" * 100]).startswith("x") and len(grid.tag(["--a", "x" * 100])) == 11


def fake_run(runs_dir: Path, method: str, env: str, dataset: str, seed: int, score: float, fraction: float = 0.05,
             recipe: str = "cpu", commit: str = "a" * 40, extra: str = "", commits: list = None):  # fmt: skip
    m = grid.METHODS[method]
    fixed = "--labeled-fraction" in m.flags
    fraction = 1.0 if fixed else fraction
    run_dir = runs_dir / f"{env}__{dataset}__{method}__lf{fraction:g}__{recipe}__{seed}{extra}"
    run_dir.mkdir(parents=True)
    info = dict(method=method, title=m.title, column=list(grid.METHODS).index(method), script=m.script, env=env,
                dataset=dataset, labeled_fraction=fraction, fixed_fraction=fixed, seed=seed, recipe=recipe,
                extra_flags=extra, tag=extra)  # fmt: skip
    (run_dir / "grid.json").write_text(json.dumps(info))
    args = {"labeled_fraction": fraction, "seed": seed}
    (run_dir / "summary.json").write_text(json.dumps({"final_normalized_score": score, "best_normalized_score": score + 1,
                                                      "args": args, "git_commit": commit,
                                                      "git_commits": commits or [commit]}))  # fmt: skip


def test_report_numbers_from_known_summaries(tmp_path):
    runs = tmp_path / "runs"
    scores = {"td3_bc_oracle": (30, 40), "td3_bc": (10, 20), "lawm": (25, 35)}  # seeds 1, 2 of cheetah-run expert
    for (method, (a, b)), seed in product(scores.items(), (1, 2)):
        fake_run(runs, method, "cheetah-run", "expert", seed, a if seed == 1 else b)
    fake_run(runs, "lawm", "cheetah-run", "medium", 1, 50.0)
    fake_run(runs, "lawm", "cheetah-run", "medium", 2, 60.0, commit="b" * 40 + "-dirty")  # another commit in a cell
    fake_run(runs, "td3_bc", "cheetah-run", "medium", 1, 5.0)
    fake_run(runs, "lawm", "cheetah-run", "expert", 1, 99.0, recipe="gpu")  # another recipe: another table
    fake_run(runs, "lawm", "cheetah-run", "expert", 1, 1.0, fraction=0.1)  # another fraction: the curve
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "grid.json").write_text("{}")
    out = tmp_path / "docs" / "results.md"
    report.write_report(runs, out)
    text = out.read_text()
    cpu = text.split("## cpu recipe, 5% action-labeled")[1].split("## ")[0]
    assert "| cheetah-run | expert | **35.0 ± 5.0** (2) | 15.0 ± 5.0 (2) | 30.0 ± 5.0 (2) |" in cpu
    assert "|  | medium | – | 5.0 ± 0.0 (1) | **55.0 ± 5.0** (2) † |" in cpu  # medium after expert, env not repeated
    assert "† cheetah-run medium LAWM: seed 1 ran `aaaaaaa`; seed 2 ran `bbbbbbb-dirty`" in cpu
    # LAWM's cells: expert (25, 35), medium (50, 60): IQM of the 4 runs = mean of 35 and 50
    assert re.search(r"^\| LAWM \| 42\.5 \| \[\d+\.\d, \d+\.\d\] \| 2 \| 4 \|$", cpu, re.M)
    assert "| TD3+BC (Oracle) | 35.0 | [30.0, 40.0] | 1 | 2 |" in cpu and "compare their aggregates with care" in cpu
    assert "99.0" not in cpu and "| cheetah-run | expert | **99.0 ± 0.0** (1) |" in text.split("## gpu recipe")[1]
    assert "## cpu recipe, 10% action-labeled" in text and "IQM against the labeled fraction" in text
    # the curve is over the cells that ran every fraction (expert, not medium): LAWM 5% = IQM of 25 and 35
    assert "Over the cells that ran every fraction: cheetah-run expert." in text
    assert re.search(r"^\| LAWM \| 30\.0 \[[^]]+\], 1 cell \| 1\.0 \[1\.0, 1\.0\], 1 cell \| – \|$", text, re.M)  # 5%, 10%
    assert re.search(r"^\| TD3\+BC \| 15\.0 \[[^]]+\], 1 cell \| – \| – \|$", text, re.M)  # medium's 5.0 left out
    for figure in ("results_cpu_lf0.05_iqm.png", "results_gpu_lf0.05_iqm.png", "results_cpu_fractions.png"):
        assert (out.parent / "figures" / figure).exists()


def test_a_run_resumed_on_other_code_marks_its_cell(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "lawm", "cheetah-run", "medium", 1, 50.0, commits=["c" * 40, "a" * 40])  # resumed after a pull
    fake_run(runs, "lawm", "cheetah-run", "medium", 2, 60.0)
    fake_run(runs, "td3_bc", "cheetah-run", "medium", 1, 5.0)
    fake_run(runs, "td3_bc", "cheetah-run", "medium", 2, 6.0, commits=["a" * 40, "a" * 40])  # the same code twice
    out = tmp_path / "docs" / "results.md"
    report.write_report(runs, out)
    text = out.read_text()
    assert "| cheetah-run | medium | 5.5 ± 0.5 (2) | **55.0 ± 5.0** (2) † |" in text  # TD3+BC's cell is one code
    assert "† cheetah-run medium LAWM: seed 2 ran `aaaaaaa`; seed 1 ran `ccccccc+aaaaaaa`" in text
    assert "TD3+BC:" not in text and "`aaaaaaa` (3 runs), `ccccccc+aaaaaaa` (1 run)" in text


def test_extra_flags_spelled_two_ways_share_a_table(tmp_path):
    # `-- --free-nats-u 3` and `--extra-flags=--free-nats-u=3` give the runs the same tag, hence the same names
    runs = tmp_path / "runs"
    for seed, spelling in ((1, "--free-nats-u 3"), (2, "--free-nats-u=3")):
        fake_run(runs, "lawm", "cheetah-run", "medium", seed, 20.0 + seed, extra="free-nats-u=3")
        path = next(runs.glob(f"*__{seed}free-nats-u=3")) / "grid.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"extra_flags": spelling}))
    out = tmp_path / "docs" / "results.md"
    report.write_report(runs, out)
    text = out.read_text()
    assert text.count("## cpu recipe, 5% action-labeled, extra flags") == 1
    assert "| cheetah-run | medium | **21.5 ± 0.5** (2) |" in text


def test_iqm_and_stratified_bootstrap_follow_their_definitions():
    assert report.iqm(np.arange(1, 9)) == 4.5  # 8 scores: drop 2 from each end, mean of 3, 4, 5, 6
    assert report.iqm([5, 1, 100, 3, 4]) == pytest.approx((3 + 4 + 5) / 3)  # int(5 / 4) = 1 cut from each end
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(0).normal(size=37)
    assert report.iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25))
    # two cells of two runs: a resample draws 2 runs of each cell with replacement, 16 equally likely outcomes; the
    # bootstrap's frequencies must match them (an unstratified resample could draw all four runs from one cell)
    cells = [[0.0, 1.0], [10.0, 20.0]]
    exact = {}
    for a in product(cells[0], repeat=2):
        for b in product(cells[1], repeat=2):
            value = report.iqm(list(a) + list(b))
            exact[value] = exact.get(value, 0) + 1 / 16
    estimates = report.bootstrap_iqms(cells, reps=40_000, seed=1)
    values, counts = np.unique(estimates, return_counts=True)
    assert set(values) == set(exact)
    for value, count in zip(values, counts, strict=True):
        assert count / len(estimates) == pytest.approx(exact[value], abs=0.01)
    mean, low, high = report.iqm_ci(cells, reps=40_000, seed=1)
    assert (mean, low, high) == (report.iqm([0, 1, 10, 20]), min(exact), max(exact))
    assert report.iqm_ci(cells, reps=1000, seed=3) == report.iqm_ci(cells, reps=1000, seed=3)  # seeded
    assert report.iqm_ci([[7.0], [7.0, 7.0]]) == (7.0, 7.0, 7.0)


def test_cluster_path_through_submitits_debug_executor(tiny):
    out = run_grid(tiny, "--cluster", "debug", "--methods", "td3_bc", "lawm", "--seeds", "1")
    assert "2/2 done" in out.stdout
    for method in ("td3_bc", "lawm"):
        run_dir = tiny["runs"] / f"cheetah-run__medium-replay__{method}__lf0.05__smoke__1"
        assert summary(run_dir)["args"]["exp_name"] == method
        assert json.loads((run_dir / "grid.json").read_text())["job"].startswith("DEBUG_")
    assert "LAWM" in tiny["report"].read_text()


def test_slurm_job_array_script_with_a_stand_in_sbatch(tiny, tmp_path):
    """A fake sbatch records the array script submitit writes; a fake sacct says the jobs are running, so the same
    command again submits nothing."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {record}.script\necho "$@" >> {record}\n'
                                    'echo "Submitted batch job 4242"\n')  # fmt: skip
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it to know it is on SLURM
    (bin_dir / "sacct").write_text('#!/bin/sh\necho "JobID|State|NodeList"\necho "4242_[0-3%3]|RUNNING|node1"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    flags = ["--cluster", "slurm", "--no-wait", "--methods", "td3_bc", "lawm", "--seeds", "1", "2", "--slurm-partition",
             "cpu", "--slurm-time-min", "60", "--slurm-parallelism", "3", "--slurm-max-requeues", "5", "--slurm-cpus-per-task",
             "4", "--slurm-setup", "source .venv/bin/activate", "--slurm-flags", "account=lawm"]  # fmt: skip
    out = run_grid(tiny, *flags, env=env)
    assert "submitted 4 runs: job 4242" in out.stdout and "4 threads a run" in out.stdout
    assert len(record.read_text().splitlines()) == 1  # one array, one sbatch
    script = Path(f"{record}.script").read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --time=60", "#SBATCH --partition=cpu", "#SBATCH --signal=USR2@90",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --account=lawm", "#SBATCH --job-name=grid",
                 "source .venv/bin/activate"):  # fmt: skip
        assert line in script
    assert re.search(r"^srun .* -u -m submitit\.core\._submit ", script, re.M)
    # each array task unpickles a Run of the grid: the script and flags, requeued up to 5 times after a timeout
    jobs = {}
    for run_dir in tiny["runs"].glob("cheetah-run__*"):
        jobs[run_dir.name] = json.loads((run_dir / "grid.json").read_text())["job"]
    assert sorted(jobs.values()) == ["4242_0", "4242_1", "4242_2", "4242_3"]
    name = "cheetah-run__medium-replay__lawm__lf0.05__smoke__2"
    pickle = tiny["runs"] / "submitit" / jobs[name] / f"{jobs[name]}_submitted.pkl"
    delayed = cloudpickle.loads(pickle.read_bytes())
    assert delayed.function.name == name and delayed.function.script == "lawm.py" and delayed.function.threads == 4
    assert "--seed" in delayed.function.flags and delayed._timeout_countdown == 5 and delayed._timeout_min == 60
    assert isinstance(delayed.function, submitit.helpers.Checkpointable)

    again = run_grid(tiny, *flags, env=env)
    assert "4 runs: 0 finished, 4 on the cluster, 0 to resume, 0 to start" in again.stdout
    assert len(record.read_text().splitlines()) == 1  # not submitted twice


def test_a_slurm_job_requeued_at_its_time_limit_continues_with_resume(tiny, tmp_path):
    """What a compute node does with the array script: submitit's job entry point runs the pickled Run; SLURM's
    warning signal before the time limit (USR2) makes submitit checkpoint the Run and requeue the job (a stand-in
    scontrol); the requeued job runs the same Run, which continues the training with --resume."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls"}\n')
    (bin_dir / "sacct").write_text('#!/bin/sh\necho "JobID|State|NodeList"\necho "4242|COMPLETED|node1"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    flags = ["--cluster", "slurm", "--methods", "td3_bc", "--seeds", "1", "--slurm-cpus-per-task", "1",
             "--extra-flags=--total-steps 3000 --eval-every 100"]  # fmt: skip
    run_grid(tiny, *flags, "--no-wait", env=env)
    run_dir = tiny["runs"] / "cheetah-run__medium-replay__td3_bc__lf0.05__smoke__total-steps=3000,eval-every=100__1"
    node = env | {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    job = [sys.executable, "-u", "-m", "submitit.core._submit", str(tiny["runs"] / "submitit" / "%j")]
    first = subprocess.Popen(job, env=node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGUSR2)
    log = first.communicate(timeout=60)[0]
    assert "Requeued job 4242" in log and (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "4242"]
    assert not (run_dir / "summary.json").exists()

    subprocess.run(job, env=node, check=True, capture_output=True)  # the requeued job
    grid_log = (run_dir / "grid.log").read_text()
    assert grid_log.count("== ") == 2 and grid_log.split("== ")[2].split("\n")[0].endswith("--resume")
    assert [e["step"] for e in summary(run_dir)["evaluations"]] == list(range(100, 3001, 100))
    out = run_grid(tiny, *flags, env=env)  # the same command again: the run is finished, the report written
    assert "1 runs: 1 finished" in out.stdout and "TD3+BC" in tiny["report"].read_text()


def test_the_report_outlives_its_run_folders(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "docs" / "results.md"
    for seed, score in ((1, 10.0), (2, 20.0)):
        fake_run(runs, "lawm", "cheetah-run", "medium", seed, score)
    fake_run(runs, "td3_bc", "cheetah-run", "medium", 1, 5.0, commit="b" * 40)
    report.write_report(runs, out)
    records = out.with_name("results_runs.jsonl")
    first, lines = out.read_text(), records.read_text().splitlines()
    assert len(lines) == 3 and {json.loads(line)["commit"] for line in lines} == {"a" * 40, "b" * 40}
    shutil.rmtree(runs)  # the folders are lost: the records alone make the same report
    again = tmp_path / "again" / "results.md"
    report.write_report(runs, again, [records])
    body = lambda text: text.split("\n", 3)[3]  # noqa: E731  (the line naming the command differs)
    assert body(again.read_text()) == body(first) and "| cheetah-run | medium | 5.0 ± 0.0 (1) | **15.0 ± 5.0** (2) |" in first
    assert f"--records {records}" in again.read_text()
    # new runs grow the report, and a run folder wins over the record of the same name
    fake_run(runs, "lawm", "cheetah-run", "medium", 3, 30.0)
    fake_run(runs, "lawm", "cheetah-run", "medium", 1, 40.0)
    report.write_report(runs, out, [records])
    assert "| cheetah-run | medium | 5.0 ± 0.0 (1) | **30.0 ± 8.2** (3) |" in out.read_text()  # 40, 20, 30
    assert len(records.read_text().splitlines()) == 4
    with pytest.raises(SystemExit, match="no file"):
        report.write_report(runs, out, [tmp_path / "missing.jsonl"])
