# Runs a grid of the training scripts (environments × datasets × methods × labeled fractions × seeds): Table 1 of
# the paper, or a variation of it. Locally with a pool of worker processes, or on a SLURM cluster through submitit
# (job arrays, time limit, requeue that continues with --resume). Then writes the report (utils/report.py).
# No algorithm imports this file. Docs: docs/grid.md.
import concurrent.futures
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import submitit
import tyro

ROOT = Path(__file__).resolve().parents[1]  # the training scripts


@dataclass(frozen=True)
class Method:
    title: str
    """the column's title in the report"""
    script: str
    """the training script"""
    flags: tuple[str, ...] = ()
    """its flags; a method without its own --labeled-fraction runs at each of the grid's --labeled-fractions"""


# Table 1's six columns, in its order
METHODS = {
    "td3_bc_oracle": Method("TD3+BC (Oracle)", "td3_bc.py", ("--labeled-fraction", "1.0")),
    "c_lap_oracle": Method("C-LAP (Oracle)", "c_lap.py", ("--labeled-fraction", "1.0")),
    "td3_bc": Method("TD3+BC", "td3_bc.py"),
    "c_lap": Method("C-LAP", "c_lap.py"),
    "idm_td3_bc": Method("IDM-TD3+BC", "idm_td3_bc.py"),
    "lawm": Method("LAWM", "lawm.py"),
}
# the flags of a recipe, per script. "cpu": the budgets of docs/td3_bc.md, docs/c_lap.md and the README (16-20
# minutes a model-based run, about 7 a model-free one, with one thread); "gpu": the scripts' defaults (paper-like
# sizes and budgets); "smoke": a few steps at tiny sizes, to try a grid end to end in a minute (scores mean nothing)
WORLD_MODEL_CPU = ("--deter-dim 128 --stoch-dim 16 --hidden-dim 128 --batch-size 16 --seq-len 32 --num-values 2 "
                   "--model-steps 5000 --agent-steps 1000 --eval-every 250 --eval-episodes 5")  # fmt: skip
WORLD_MODEL_SMOKE = ("--model-steps 4 --agent-steps 4 --eval-every 2 --eval-episodes 1 --batch-size 4 --seq-len 10 "
                     "--deter-dim 16 --stoch-dim 4 --hidden-dim 16 --latent-action-dim 3 --horizon 3 --num-values 2 "
                     "--log-every 2 --final-eval-episodes 1")  # fmt: skip
TD3_BC_SMOKE = "--total-steps 20 --batch-size 16 --hidden-dim 16 --eval-every 10 --eval-episodes 1 --final-eval-episodes 1"
RECIPES = {
    "cpu": {"td3_bc.py": "--total-steps 30000", "idm_td3_bc.py": "--total-steps 30000", "c_lap.py": WORLD_MODEL_CPU,
            "lawm.py": WORLD_MODEL_CPU},
    "gpu": {"td3_bc.py": "", "idm_td3_bc.py": "", "c_lap.py": "", "lawm.py": ""},
    "smoke": {"td3_bc.py": TD3_BC_SMOKE, "idm_td3_bc.py": TD3_BC_SMOKE + " --idm-steps 20 --idm-eval-every 10",
              "c_lap.py": WORLD_MODEL_SMOKE, "lawm.py": WORLD_MODEL_SMOKE},
}  # fmt: skip
# flags the grid gives every run itself, not to be passed as extra flags
GRID_FLAGS = ("env", "dataset", "datasets_dir", "labeled_fraction", "seed", "exp_name", "runs_dir", "run_name", "resume")
# flags that name files rather than settings: a finished run made with other values of these is still the same run
PATH_FLAGS = ("datasets_dir", "runs_dir", "run_name", "resume")
ACTIVE_SLURM_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


@dataclass
class Args:
    envs: tuple[str, ...] = ("cheetah-run", "hopper-stand", "walker-walk")
    """dm_control tasks (Table 1's rows, with the datasets)"""
    datasets: tuple[str, ...] = ("expert", "medium", "medium-replay", "plan2explore")
    """dataset kinds, read from `{datasets_dir}/{env}/{dataset}.hdf5`"""
    methods: tuple[str, ...] = tuple(METHODS)
    """methods to run, among td3_bc_oracle, c_lap_oracle, td3_bc, c_lap, idm_td3_bc and lawm (Table 1's columns)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds (`--seed` of the scripts)"""
    labeled_fractions: tuple[float, ...] = (0.05,)
    """fractions of action-labeled trajectories for the methods that do not fix theirs (the Oracles use 1.0; TD3+BC
    or C-LAP at 1.0 is its Oracle, run once under the Oracle's name)"""
    recipe: Literal["cpu", "gpu", "smoke"] = "cpu"
    """budgets and sizes: cpu (the CPU recipes of the docs), gpu (the scripts' defaults) or smoke (seconds a run)"""
    extra_flags: str = ""
    """flags passed to every script after the recipe's (later flags win), e.g. `--extra-flags='--align-coef 0'`, or
    everything after a lone `--`; they name the runs (a tag), so a variation never mixes with the plain grid"""
    datasets_dir: str = "datasets"
    """folder that collect_data.py wrote the datasets to"""
    runs_dir: str = "runs"
    """folder of the run folders (`{runs_dir}/{run name}`)"""
    report: Optional[str] = "{runs_dir}/results.md"
    """the report written at the end from every grid run in `--runs-dir` (figures beside it; `{runs_dir}` stands for
    `--runs-dir`); None: no report. Not inside the checkout by default: a report there leaves the checkout modified,
    and every later run from it records a `-dirty` commit, which the report then marks as mixed code"""
    dry_run: bool = False
    """print what would run (each run's command and whether it is finished, resumed or new), run nothing"""
    cluster: Literal["local", "slurm", "debug"] = "local"
    """local: `--workers` processes on this machine; slurm: a submitit job array; debug: submitit's debug executor
    (the jobs run one after the other in this process: a test of the cluster path without a cluster)"""
    workers: int = 1
    """runs at a time on this machine (`--cluster local`)"""
    threads: Optional[int] = None
    """torch threads of each run (OMP_NUM_THREADS); default: the CPU count over `--workers` locally,
    `--slurm-cpus-per-task` on SLURM"""

    # SLURM (`--cluster slurm`), through submitit
    slurm_partition: Optional[str] = None
    """partition to run in (None: the cluster's default)"""
    slurm_time_min: int = 240
    """time limit of one job in minutes; a run that reaches it is requeued and continues with --resume"""
    slurm_max_requeues: int = 3
    """requeues after a time limit (requeues after a preemption are not counted)"""
    slurm_parallelism: int = 32
    """jobs of the array that run at once"""
    slurm_cpus_per_task: int = 2
    """CPUs of a job"""
    slurm_gpus_per_node: int = 0
    """GPUs of a job"""
    slurm_mem_gb: Optional[float] = None
    """memory of a job in GB (None: the cluster's default)"""
    slurm_setup: tuple[str, ...] = ()
    """shell lines the job runs first, e.g. `'source .venv/bin/activate'`"""
    slurm_flags: tuple[str, ...] = ()
    """other sbatch options as KEY=VALUE, e.g. `account=myproject qos=normal`"""
    wait: bool = True
    """wait for the cluster's jobs, showing progress, then write the report; --no-wait: submit and exit (run the same
    command again to follow them: runs still queued or running are not submitted twice)"""


@dataclass
class Run(submitit.helpers.Checkpointable):
    """One training run. Calling it trains (with --resume when the run folder holds a checkpoint) and returns the
    script's exit code; its output goes to `{run folder}/grid.log`. On SLURM, submitit calls `checkpoint` when the job
    reaches its time limit or is preempted and requeues this same Run, which then continues with --resume."""

    name: str
    script: str
    flags: list[str]
    runs_dir: str
    threads: int
    info: dict = field(default_factory=dict)  # method, env, dataset, ... as recorded in grid.json for the report

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def command(self) -> list[str]:
        resume = ["--resume"] if (self.run_dir / "checkpoint.pt").exists() else []
        return [sys.executable, str(ROOT / self.script), *self.flags, *resume]

    def shell(self) -> str:
        """The command as a user would type it from here."""
        script = os.path.relpath(ROOT / self.script)
        return f"OMP_NUM_THREADS={self.threads} python {shlex.join([script, *self.command()[2:]])}"

    def __call__(self, running: Optional[set] = None) -> int:
        """`running`: a set that holds the script's process while it runs (the local pool stops them on Ctrl-C)."""
        running = set() if running is None else running
        self.run_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        env = os.environ | {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        with open(self.run_dir / "grid.log", "a") as log:
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.add(process)
            try:
                return process.wait()
            finally:  # interrupted (Ctrl-C, or submitit exiting to requeue): stop the script, its checkpoint stays
                running.discard(process)
                if process.poll() is None:
                    process.kill()
                    process.wait()


def flag_values(flags: list[str]) -> dict:
    """`--flag v1 v2 --switch --no-other` -> {"flag": ["v1", "v2"], "switch": [], "no_other": []}."""
    values, key = {}, None
    for token in flags:
        if token.startswith("--"):
            key = token[2:].replace("-", "_")
            values[key] = []
        elif key is not None:
            values[key].append(token)
    return values


def same_value(saved, given: list[str]) -> bool:
    """Whether a value a script recorded in summary.json is the one the flag's text gives."""
    if isinstance(saved, (list, tuple)):
        return len(saved) == len(given) and all(same_value(s, [g]) for s, g in zip(saved, given, strict=True))
    if len(given) != 1:
        return False
    if isinstance(saved, bool) or saved is None:
        return str(saved).lower() == given[0].lower()
    try:
        return float(saved) == float(given[0])
    except (TypeError, ValueError):
        return str(saved) == given[0]


def differences(flags: list[str], saved: dict) -> list[str]:
    """The flags of `flags` whose values differ from the `args` a finished run recorded, as `--flag was (now)`."""
    out = []
    for key, given in flag_values(flags).items():
        if key in PATH_FLAGS:
            continue
        if not given and key.startswith("no_") and key[3:] in saved:  # --no-switch
            key, given = key[3:], ["False"]
        elif not given:  # --switch
            given = ["True"]
        if key not in saved or not same_value(saved[key], given):
            out.append(f"--{key.replace('_', '-')} {saved.get(key, 'not recorded')} (now {' '.join(given)})")
    return out


def read_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary.json if it is complete (the scripts write it last and atomically), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        float(summary["final_normalized_score"]), dict(summary["args"])
        return summary
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dataset_sha256(path: Path) -> Optional[str]:
    """The sha256 the training scripts record in summary.json: of the dataset's arrays as stored, in the order of their
    DATASET_KEYS (None when the file is missing or unreadable; check_datasets reports it)."""
    import h5py

    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r") as f:
            for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
                digest.update(f[key][()].tobytes())
    except (OSError, KeyError, TypeError):
        return None
    return digest.hexdigest()


def tag(extra: list[str]) -> str:
    """A short name for the extra flags: `--align-coef 0 --no-cuda` -> `align-coef=0,no-cuda` (a hash when long)."""
    parts = [k.replace("_", "-") + ("=" + "+".join(v) if v else "") for k, v in flag_values(extra).items()]
    text = "".join(c if c.isalnum() or c in "._,=+-" else "_" for c in ",".join(parts))
    return text if len(text) <= 60 else "x" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:10]


def oracle_twin(key: str, fraction: float) -> str:
    """The Oracle that `key` is at `fraction` (C-LAP at 100% is C-LAP (Oracle): same script, same flags), so that the
    grid runs it once, under the Oracle's name; otherwise `key`."""
    for other, method in METHODS.items():
        own = flag_values(list(method.flags))
        if not METHODS[key].flags and method.script == METHODS[key].script and list(own) == ["labeled_fraction"]:
            if float(own["labeled_fraction"][0]) == fraction:
                return other
    return key


def plan(args: Args, extra: list[str], threads: int) -> list[Run]:
    """Every run of the grid, each with a deterministic name: env, dataset, method, labeled fraction, recipe, the tag
    of the extra flags and seed."""
    runs, names = [], set()
    for env in args.envs:
        for dataset in args.datasets:
            for asked in args.methods:
                own = flag_values(list(METHODS[asked].flags)).get("labeled_fraction")
                for fraction in [float(own[0])] if own else args.labeled_fractions:
                    key = oracle_twin(asked, fraction)  # `asked` itself unless it is an Oracle at this fraction
                    method = METHODS[key]
                    fixed = "labeled_fraction" in flag_values(list(method.flags))
                    for seed in args.seeds:
                        name = f"{env}__{dataset}__{key}__lf{fraction:g}__{args.recipe}"
                        name += (f"__{tag(extra)}" if extra else "") + f"__{seed}"
                        if name in names:  # an Oracle, once for all the grid's fractions and its twin
                            continue
                        names.add(name)
                        flags = ["--env", env, "--dataset", dataset, "--datasets-dir", args.datasets_dir]
                        flags += [] if fixed else ["--labeled-fraction", f"{fraction:g}"]
                        flags += ["--seed", str(seed), "--exp-name", key, "--runs-dir", args.runs_dir, "--run-name", name]
                        flags += shlex.split(RECIPES[args.recipe][method.script]) + list(method.flags) + extra
                        info = dict(method=key, title=method.title, column=list(METHODS).index(key), script=method.script,
                                    env=env, dataset=dataset, labeled_fraction=fraction, fixed_fraction=bool(fixed),
                                    seed=seed, recipe=args.recipe, extra_flags=shlex.join(extra),
                                    tag=tag(extra) if extra else "")  # fmt: skip
                        runs.append(Run(name, method.script, flags, args.runs_dir, threads, info))
    return runs


def check_datasets(args: Args) -> list[str]:
    """One line per dataset of the grid that is missing or cannot be read, and the collect_data.py command that makes
    the missing ones."""
    import h5py

    problems, missing = [], {}
    for env in args.envs:
        for dataset in args.datasets:
            path = Path(args.datasets_dir) / env / f"{dataset}.hdf5"
            if not path.is_file():
                missing.setdefault(env, []).append(dataset)
                problems.append(f"{path} not found")
                continue
            try:
                with h5py.File(path, "r") as f:
                    if "observations" not in f or f.attrs.get("env") != env or f.attrs.get("dataset") != dataset:
                        problems.append(f"{path} is not the {env} {dataset} dataset (keys or attributes env, dataset)")
            except OSError as e:
                problems.append(f"{path} cannot be read as HDF5 ({e})")
    for env, kinds in missing.items():
        problems.append(f"make them with: python collect_data.py --env {env} --kinds {' '.join(kinds)} "
                        f"--datasets-dir {args.datasets_dir}")  # fmt: skip
    return problems


def write_json(path: Path, data: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def slurm_job(run: Run):
    """The SLURM job of an earlier submission of this run while it is still queued or running (asks sacct)."""
    try:
        job_id = json.loads((run.run_dir / "grid.json").read_text())["job"]
    except (OSError, ValueError, KeyError):
        return None
    job = submitit.SlurmJob(folder=Path(run.runs_dir) / "submitit" / "%j", job_id=job_id)
    return job if job.state.upper().split()[0] in ACTIVE_SLURM_STATES else None


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def time_left(pending: list, running: list, started: dict, times: dict, runs: dict, parallel: int) -> str:
    """The work left over the runs at a time: each run takes the mean duration of its method's runs that ended so
    far (of all runs, for a method with none), less what it has run already."""
    every = [t for ts in times.values() for t in ts]
    if not every:
        return "time left unknown until a run ends"
    mean = lambda name: (lambda ts: sum(ts) / len(ts))(times.get(runs[name].info["method"]) or every)
    work = sum(max(mean(n) - (time.time() - started[n]), 0) for n in running)
    work += sum(mean(n) for n in pending if n not in running)
    return f"about {duration(work / max(1, min(parallel, len(pending))))} left"


def follow(handles: dict, runs: dict, status, parallel: int, skipped: int) -> list[str]:
    """Waits for the runs `handles` (name -> future or submitit job; `status(handle)` is queued, running or done),
    printing each run that ends and, when the counts change or every minute, the counts and an estimate of the time
    left. Returns the names of the failed runs (those without a complete summary.json)."""
    start, started, times, failed, printed, shown = time.time(), {}, {}, [], 0.0, None
    pending = dict(handles)
    while pending:
        states = {name: status(handle) for name, handle in pending.items()}
        for name, state in states.items():
            if state == "running":
                started.setdefault(name, time.time())
            if state != "done":
                continue
            del pending[name]
            run, seconds = runs[name], time.time() - started.get(name, time.time())
            summary = read_summary(run.run_dir)
            if summary is None:
                failed.append(name)
                print(f"FAILED {name}: {last_line(run.run_dir / 'grid.log')}", flush=True)
                continue
            times.setdefault(run.info["method"], []).append(seconds)
            print(f"done   {name}: final score {summary['final_normalized_score']:.1f} "
                  f"(best {summary['best_normalized_score']:.1f}), {duration(seconds)}", flush=True)  # fmt: skip
        running = [n for n in pending if states[n] == "running"]
        counts = (len(handles) - len(pending) - len(failed), len(running), len(pending) - len(running), len(failed))
        if counts != shown or time.time() - printed > 60:
            left = time_left(list(pending), running, started, times, runs, parallel) if pending else "all ended"
            done = f"{counts[0] + skipped}/{len(handles) + skipped} done ({skipped} finished before)"
            print(f"[{duration(time.time() - start)}] {done}, {counts[1]} running, {counts[2]} queued, {counts[3]} "
                  f"failed; {left}", flush=True)  # fmt: skip
            shown, printed = counts, time.time()
        if pending:
            time.sleep(1.0)
    return failed


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"no log ({path}): it never started; on a cluster, see its job's log in {{runs_dir}}/submitit"
    return f"{lines[-1].strip()} (log: {path})" if lines else f"empty log ({path})"


def run_local(todo: list[Run], workers: int, skipped: int) -> list[str]:
    """Runs `todo` with `workers` processes at a time (submitit's local executor has no such limit)."""
    pool, running = concurrent.futures.ThreadPoolExecutor(max_workers=workers), set()
    futures = {run.name: pool.submit(run, running) for run in todo}
    try:
        status = lambda f: "done" if f.done() else "running" if f.running() else "queued"
        return follow(futures, {run.name: run for run in todo}, status, workers, skipped)
    except KeyboardInterrupt:  # stop the scripts (the ones a worker was just starting too); their checkpoints stay
        pool.shutdown(wait=False, cancel_futures=True)
        while not all(future.done() for future in futures.values()):
            for process in list(running):
                process.kill()
            time.sleep(0.1)
        raise
    finally:
        pool.shutdown(wait=True)


def run_cluster(args: Args, todo: list[Run], active: dict, runs: dict, skipped: int) -> Optional[list[str]]:
    """Submits `todo` as one submitit job array (or to the debug executor), records each run's job id in its
    grid.json, and follows them together with the jobs `active` (name -> job) of an earlier submission; None with
    --no-wait."""
    folder = Path(args.runs_dir) / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.slurm_max_requeues)
    executor.update_parameters(
        name="grid", timeout_min=args.slurm_time_min, cpus_per_task=args.slurm_cpus_per_task, stderr_to_stdout=True,
        gpus_per_node=args.slurm_gpus_per_node or None, mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
        slurm_array_parallelism=args.slurm_parallelism, slurm_setup=list(args.slurm_setup),
        slurm_additional_parameters=dict(flag.split("=", 1) for flag in args.slurm_flags),
    )  # fmt: skip
    jobs = dict(zip([run.name for run in todo], executor.submit_array(todo), strict=True)) if todo else {}
    for run in todo:
        write_json(run.run_dir / "grid.json", run.info | {"command": run.shell(), "job": jobs[run.name].job_id})
    if jobs:
        print(f"submitted {len(jobs)} runs: job {next(iter(jobs.values())).job_id.split('_')[0]} (logs: {folder})")
    jobs |= active
    if not args.wait:
        print("not waiting (--no-wait): run the same command again to follow the jobs and write the report")
        return None

    def status(job) -> str:
        if job.done():
            return "done"
        return "running" if job.state.upper().startswith(("RUNNING", "COMPLETING")) else "queued"

    return follow(jobs, runs, status, args.slurm_parallelism, skipped)


def main(args: Args, extra: list[str]) -> int:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown methods {', '.join(unknown)}; the methods are {', '.join(METHODS)}")
    if args.workers < 1 or not all(0 < f <= 1 for f in args.labeled_fractions) or not args.seeds:
        raise SystemExit("error: --workers must be at least 1, --labeled-fractions in (0, 1], --seeds not empty")
    taken = [f"--{k.replace('_', '-')}" for k in flag_values(extra) if k in GRID_FLAGS]
    if taken:
        raise SystemExit(f"error: the grid sets {', '.join(taken)} itself: use its --envs, --datasets, --seeds, "
                         "--labeled-fractions or --runs-dir instead of the extra flags")  # fmt: skip
    if args.cluster == "slurm" and shutil.which("srun") is None and not args.dry_run:
        raise SystemExit("error: srun not found: --cluster slurm submits from a SLURM login node")
    cores = len(os.sched_getaffinity(0))
    default_threads = max(1, cores // args.workers) if args.cluster == "local" else args.slurm_cpus_per_task
    threads = args.threads or default_threads
    runs = plan(args, extra, threads)

    # what is there already: finished runs (refused if made with other settings), interrupted ones, jobs on the cluster
    finished, conflicts, resumed, active, hashes = set(), [], set(), {}, {}
    for run in runs:
        summary = read_summary(run.run_dir)
        if summary is not None:
            differ = differences(run.flags, summary["args"])
            path = Path(args.datasets_dir) / run.info["env"] / f"{run.info['dataset']}.hdf5"
            if path not in hashes:
                hashes[path] = dataset_sha256(path)
            if hashes[path] is not None and summary.get("dataset_sha256") != hashes[path]:  # e.g. the data were remade
                differ.append(f"trained on another {path} (sha256 {str(summary.get('dataset_sha256'))[:12]}, "
                              f"now {hashes[path][:12]})")  # fmt: skip
            if differ:
                conflicts.append(f"  {run.run_dir}: {', '.join(differ)}")
            finished.add(run.name)
        elif args.cluster == "slurm" and not args.dry_run and (job := slurm_job(run)) is not None:
            active[run.name] = job
        elif (run.run_dir / "checkpoint.pt").exists():
            resumed.add(run.name)
    problems = check_datasets(args)
    todo = [run for run in runs if run.name not in finished and run.name not in active]
    print(f"{len(runs)} runs: {len(finished)} finished, {len(active)} on the cluster, {len(resumed)} to resume, "
          f"{len(todo) - len(resumed)} to start ({args.recipe} recipe, {threads} threads a run)")  # fmt: skip
    if args.dry_run:
        for run in runs:
            state = "finished" if run.name in finished else "on the cluster" if run.name in active else "run"
            print(f"# {run.name}: {state if state != 'run' else 'resume' if run.name in resumed else 'new'}")
            print(run.shell())
        for line in conflicts + problems:
            print(f"note: {line.strip()}")
        return 0
    if conflicts:
        print("error: these finished runs were made with other settings than this grid asks for (move them away, or "
              "pick another --runs-dir):\n" + "\n".join(conflicts), file=sys.stderr)  # fmt: skip
        return 2
    if problems:
        print("error: the grid's datasets are not all there:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2

    for run in todo:  # what the report reads besides summary.json
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "grid.json", run.info | {"command": run.shell()})
    if args.cluster == "local":
        failed = run_local(todo, args.workers, len(finished)) if todo else []
    else:
        failed = run_cluster(args, todo, active, {run.name: run for run in runs}, len(finished))
        if failed is None:
            return 0
    if args.report:
        import report

        out = Path(args.report.replace("{runs_dir}", args.runs_dir))
        report.write_report(Path(args.runs_dir), out)
        print(f"report: {out}")
    if failed:
        print(f"error: {len(failed)} runs failed (their logs: {{run folder}}/grid.log):", file=sys.stderr)
        for name in failed:
            print(f"  {name}: {last_line(Path(args.runs_dir) / name / 'grid.log')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = tyro.cli(Args, args=argv[:split])
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops the runs too, as Ctrl-C does
    try:
        sys.exit(main(args, shlex.split(args.extra_flags) + argv[split + 1 :]))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue (finished runs are skipped, the others resume)")
        sys.exit(130)
