# TD3+BC (Fujimoto & Gu 2021, "A Minimalist Approach to Offline Reinforcement Learning"), the model-free
# baseline of the LAWM paper: trained on the action-labeled trajectories only (`--labeled-fraction 1.0`
# is the paper's "Oracle" row). Docs: docs/td3_bc.md.
import os
import sys

# states only: no OpenGL context is needed, but for --capture-video, which renders offscreen with EGL (README)
os.environ.setdefault("MUJOCO_GL", "egl" if {"--capture-video", "--capture_video"} & set(sys.argv[1:]) else "disable")

import hashlib
import io
import json
import math
import random
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    env: str = "cheetah-run"
    """dm_control suite task as `domain-task`; its datasets are read from `{datasets_dir}/{env}/`"""
    dataset: str = "medium-replay"
    """dataset kind: expert, medium, medium-replay, random or plan2explore"""
    datasets_dir: str = "datasets"
    """folder that collect_data.py wrote the datasets to"""
    labeled_fraction: float = 0.05
    """fraction of the trajectories that keep their actions, in (0, 1]; 1.0 is the paper's Oracle"""
    split_seed: int = 0
    """seed of the permutation that picks the labeled trajectories (same seed, same split in every script)"""
    seed: int = 1
    """seed of the run: python, numpy, torch and the evaluation environments"""
    runs_dir: str = "runs"
    """folder of the run folders"""
    run_name: Optional[str] = None
    """name of the run folder; default `{env}__{dataset}__{exp_name}__{seed}__{unix time}`"""
    cuda: bool = True
    """use the GPU when there is one"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (CPU runs are deterministic anyway)"""
    eval_every: int = 5_000
    """gradient steps between evaluations (each one also writes a checkpoint)"""
    eval_episodes: int = 10
    """episodes per evaluation in the real environment"""
    final_eval_episodes: int = 50
    """episodes of the final evaluation of the trained policy, whose mean return is the run's result (`final_return`
    in summary.json, with its standard error); the periodic evaluations only show the learning curve"""
    save_model: bool = False
    """write the final networks and optimizers to `{run folder}/model.pt`"""
    resume: bool = False
    """continue the run `--run-name` from its last checkpoint"""
    capture_video: bool = False
    """render the first episode of every evaluation (offscreen MuJoCo; README) to `{run folder}/videos/` and tensorboard"""
    video_size: int = 128
    """height and width of the rendered frames in pixels, a multiple of 16"""

    # Algorithm specific arguments
    total_steps: int = 1_000_000
    """gradient steps"""
    batch_size: int = 256
    """transitions per gradient step"""
    hidden_dim: int = 256
    """width of the two hidden layers of the actor and the critics"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor and the critics"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target networks"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise"""
    noise_clip: float = 0.5
    """the smoothing noise is clipped to [-noise_clip, noise_clip]"""
    policy_freq: int = 2
    """critic steps per actor and target update"""
    alpha: float = 2.5
    """weight of Q against behaviour cloning: lambda = alpha / mean|Q(s, pi(s))|"""


def make_env(name: str, seed: int):
    """Loads a dm_control suite task from its `domain-task` name, without time limit (episodes are cut by us)."""
    from absl import logging as absl_logging
    from dm_control import suite

    absl_logging.set_verbosity(absl_logging.ERROR)  # mujoco's deprecation notes on every load
    domain, _, task = name.partition("-")
    if (domain, task) not in suite.ALL_TASKS:
        valid = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
        raise SystemExit(f"error: unknown env {name!r}; valid names: {valid}")
    return suite.load(domain, task, task_kwargs={"random": seed, "time_limit": float("inf")})


def flat_obs(observation) -> np.ndarray:
    """The proprioceptive observation dict flattened, keys in the order dm_control returns them."""
    return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])


def rollout(env, policy, episode_length: int, action_repeat: int):
    """Runs one episode of `episode_length` agent steps; `policy(obs) -> action in [-1, 1]`.
    Returns (observations (T+1, obs_dim), actions (T, act_dim), rewards (T,), terminal)."""
    obs = [flat_obs(env.reset().observation)]
    actions, rewards, terminal = [], [], False
    for _ in range(episode_length):
        action = np.asarray(policy(obs[-1]), dtype=np.float32)
        reward = 0.0
        for _ in range(action_repeat):
            ts = env.step(action)
            reward += ts.reward or 0.0
            if ts.last():  # the time limit is off, so this is a true termination
                terminal = True
                break
        obs.append(flat_obs(ts.observation))
        actions.append(action)
        rewards.append(reward)
        if terminal:
            break
    return np.stack(obs), np.stack(actions), np.asarray(rewards, dtype=np.float32), terminal


DATASET_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
DATASET_ATTRS = ("env", "dataset", "action_repeat", "episode_length", "obs_type", "format_version")
FORMAT_VERSION = 1  # the newest dataset format this file reads
# flags a resumed run may change (how long it trains, how it evaluates and logs, where its files are): a change of
# any other flag would make one run of two settings, so --resume refuses it
RESUMABLE_FLAGS = ("resume", "run_name", "runs_dir", "datasets_dir", "exp_name", "cuda", "torch_deterministic", "eval_every",
                   "eval_episodes", "final_eval_episodes", "save_model", "capture_video", "video_size", "log_every",
                   "total_steps", "model_steps", "agent_steps")  # fmt: skip


def env_dims(name: str) -> tuple[int, int]:
    """Sizes of the flattened observation and of the action of a suite task (make_env rejects an unknown name)."""
    env = make_env(name, 0)
    obs_dim = sum(int(np.prod(spec.shape)) for spec in env.observation_spec().values())
    return obs_dim, int(np.prod(env.action_spec().shape))


def read_hdf5(path: Path, remake: str) -> tuple[dict, dict]:
    """The arrays and attributes of a dataset file, with a one-line error for a file h5py cannot read."""
    if not os.access(path, os.R_OK):
        raise SystemExit(f"error: cannot read {path}: permission denied")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in DATASET_KEYS if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                raise SystemExit(f"error: {path} lacks the keys {', '.join(missing)}; {remake}")
            return {k: f[k][()] for k in DATASET_KEYS}, dict(f.attrs)
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py's words for a damaged file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
    if path.is_dir():
        raise SystemExit(f"error: {path} is a folder, not a dataset file; {remake}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89HDF\r\n\x1a\n":
        what = "is empty" if not head else f"is not an HDF5 file (it starts with {head!r})"
        raise SystemExit(f"error: {path} {what}; a download or copy cut short? copy it again or {remake}")
    raise SystemExit(
        f"error: {path} is truncated or damaged ({reason}); a download or copy cut short? copy it again or {remake}"
    )


def check_dataset(path: Path, data: dict, attrs: dict, args: Args, obs_dim: int, act_dim: int, remake: str):
    """One-line errors for every way a dataset file can be wrong: attributes missing or of another env or kind,
    arrays of the wrong type or shape, sizes that do not fit the env, values that are not finite or out of range,
    and episodes that are not stored contiguously (o_{t+1} of a step is o_t of the next one inside an episode)."""
    missing = [a for a in DATASET_ATTRS if a not in attrs]
    if missing:
        raise SystemExit(
            f"error: {path} lacks the attributes {', '.join(missing)} (not written by collect_data.py?); {remake}"
        )
    if attrs["env"] != args.env:
        moved = Path(args.datasets_dir) / str(attrs["env"]) / path.name
        raise SystemExit(
            f"error: {path} holds {attrs['env']} data (its attribute env), not {args.env}: its place is {moved} "
            f"(--env {attrs['env']}); make the {args.env} one with: python collect_data.py --env {args.env} "
            f"--kinds {args.dataset} --datasets-dir {args.datasets_dir}"
        )
    if attrs["dataset"] != args.dataset:
        renamed = path.with_name(f"{attrs['dataset']}.hdf5")
        raise SystemExit(
            f"error: {path} holds the {attrs['dataset']} dataset (its attribute dataset), not {args.dataset}: rename it "
            f"to {renamed} and pass --dataset {attrs['dataset']}, or {remake}"
        )
    if attrs["obs_type"] != "proprio":
        raise SystemExit(f"error: {path} holds {attrs['obs_type']} observations; this file trains on proprio states")
    if not str(attrs["format_version"]).isdigit() or int(attrs["format_version"]) > FORMAT_VERSION:
        raise SystemExit(
            f"error: {path} has format version {attrs['format_version']}, newer than {FORMAT_VERSION}: update this code"
        )
    for a in ("action_repeat", "episode_length"):
        if not str(attrs[a]).isdigit() or int(attrs[a]) < 1:
            raise SystemExit(f"error: {path}: attribute {a} is {attrs[a]}, not a positive integer; {remake}")
    n = len(data["rewards"])
    expected = {"observations": 2, "actions": 2, "rewards": 1, "next_observations": 2, "terminals": 1, "timeouts": 1}
    for k, ndim in expected.items():
        if data[k].dtype.kind not in "biuf":
            raise SystemExit(f"error: {path}: {k} holds {data[k].dtype} values, not numbers; {remake}")
        if data[k].ndim != ndim or len(data[k]) != n:
            raise SystemExit(f"error: {path}: {k} has shape {data[k].shape}, expected {ndim} dims and {n} rows; {remake}")
    if n == 0:
        raise SystemExit(f"error: {path} holds no transitions; {remake}")
    if data["next_observations"].shape != data["observations"].shape:
        raise SystemExit(f"error: {path}: next_observations {data['next_observations'].shape} != observations; {remake}")
    for k, size in (("observations", obs_dim), ("actions", act_dim)):
        if data[k].shape[1] != size:
            raise SystemExit(
                f"error: {path} has {k} of size {data[k].shape[1]}, but {args.env} has {size}: a dataset of another "
                f"env? {remake}"
            )
    for k in ("observations", "actions", "rewards", "next_observations"):
        if not np.isfinite(data[k]).all():
            raise SystemExit(f"error: {path}: {k} holds NaN or inf values; {remake}")
        data[k] = data[k].astype(np.float32)
    if np.abs(data["actions"]).max() > 1 + 1e-6:
        raise SystemExit(f"error: {path}: actions reach {np.abs(data['actions']).max():.3g}, outside [-1, 1]; {remake}")
    for k in ("terminals", "timeouts"):
        if not np.isin(data[k], (0, 1)).all():
            raise SystemExit(f"error: {path}: {k} holds values other than 0 and 1; {remake}")
    ends = data["terminals"].astype(bool) | data["timeouts"].astype(bool)
    if not ends[-1]:
        raise SystemExit(f"error: {path}: the last transition does not end an episode (terminals | timeouts); {remake}")
    lengths = np.diff(np.r_[0, np.flatnonzero(ends) + 1])
    if lengths.max() > int(attrs["episode_length"]):
        raise SystemExit(
            f"error: {path} has an episode of {lengths.max()} steps, longer than its attribute episode_length "
            f"{attrs['episode_length']}; {remake}"
        )
    broken = np.flatnonzero(~ends[:-1] & (data["next_observations"][:-1] != data["observations"][1:]).any(1))
    if len(broken):
        raise SystemExit(
            f"error: {path}: next_observations[{broken[0]}] is not observations[{broken[0] + 1}] inside an episode "
            f"(rows out of order, or an episode end missing from terminals | timeouts); {remake}"
        )


def load_dataset(args: Args) -> dict:
    """Reads `{datasets_dir}/{env}/{dataset}.hdf5`, checks it (check_dataset), and splits it by trajectory into
    labeled (D_ac) and action-free (D_af) parts. The actions of D_af are replaced by NaN, so that any use of them
    shows up. Returns the flat arrays plus `episode_starts`, `episode_ends` (exclusive), `labeled` (per
    transition), `labeled_episodes` (0-based, file order), the file's attributes, path and `sha256` (of its arrays)."""
    path = Path(args.datasets_dir) / args.env / f"{args.dataset}.hdf5"
    if not 0 < args.labeled_fraction <= 1:
        raise SystemExit(f"error: --labeled-fraction must be in (0, 1], got {args.labeled_fraction}")
    obs_dim, act_dim = env_dims(args.env)
    command = f"python collect_data.py --env {args.env} --kinds {args.dataset} --datasets-dir {args.datasets_dir}"
    if not path.exists():
        raise SystemExit(f"error: {path} not found; make it with: {command}")
    remake = f"make it again with: {command}"
    data, attrs = read_hdf5(path, remake)
    check_dataset(path, data, attrs, args, obs_dim, act_dim, remake)
    sha256 = hashlib.sha256()
    for k in DATASET_KEYS:
        sha256.update(np.ascontiguousarray(data[k]).tobytes())
    n = len(data["rewards"])
    ends = data["terminals"].astype(bool) | data["timeouts"].astype(bool)
    episode_ends = np.flatnonzero(ends) + 1
    episode_starts = np.r_[0, episode_ends[:-1]]
    # the split: a permutation of the trajectories seeded by split_seed; the first k keep their actions
    num_episodes = len(episode_starts)
    k = max(1, round(args.labeled_fraction * num_episodes))
    labeled_episodes = np.sort(np.random.default_rng(args.split_seed).permutation(num_episodes)[:k])
    labeled = np.zeros(n, dtype=bool)
    for e in labeled_episodes:
        labeled[episode_starts[e] : episode_ends[e]] = True
    data["actions"][~labeled] = np.nan
    data["terminals"] = data["terminals"].astype(np.float32)
    data.update(episode_starts=episode_starts, episode_ends=episode_ends, labeled=labeled, attrs=attrs)
    data.update(labeled_episodes=labeled_episodes, path=path, sha256=sha256.hexdigest())
    return data


def check_split(dataset: dict, args: Args, with_actions, action_free, seq_len: int, min_with_actions: int):
    """One-line errors, before any training, for a split that leaves the algorithm nothing to learn from: fewer than
    `min_with_actions` trajectories it trains on with actions (`with_actions`), none of them `seq_len` steps long,
    or action-free trajectories (`action_free`, [] for an algorithm that reads none) none of which is seq_len steps
    long. No action-free trajectory at all is a valid split (--labeled-fraction 1.0): the IDM has nothing to label."""
    script, lengths = os.path.basename(__file__), dataset["episode_ends"] - dataset["episode_starts"]
    total = len(lengths)
    if len(with_actions) < min_with_actions:
        raise SystemExit(
            f"error: {script} needs at least {min_with_actions} labeled trajectories to train on; --labeled-fraction "
            f"{args.labeled_fraction} of {total} trajectories leaves {len(with_actions)}: raise --labeled-fraction"
        )
    for kind, episodes in (("labeled", with_actions), ("action-free", action_free)):
        longest = max(lengths[episodes], default=0)
        if len(episodes) and longest < seq_len:
            raise SystemExit(
                f"error: no {kind} trajectory is {seq_len} steps long (the longest has {longest}): lower --seq-len to "
                f"{longest} or less"
            )


def evaluate(args: Args, make_policy, attrs: dict, seed: int):
    """`args.eval_episodes` episodes in the real environment; `make_policy()` gives a fresh `obs -> action` for each
    episode (so a policy with memory starts clean). Returns their returns (episodes,), their rewards (a list of (T,)
    arrays, one per episode) and, with --capture-video, the first episode rendered, {"frames": (T, size, size, 3)
    uint8, each frame the state an action is taken in, "fps": ...}; else None."""
    env = make_env(args.env, seed)
    frames = []

    def filmed(policy):
        def act(obs):
            frames.append(render_frame(env, args.video_size))
            return policy(obs)

        return act

    rewards = []
    for i in range(args.eval_episodes):
        policy = filmed(make_policy()) if args.capture_video and i == 0 else make_policy()
        rewards.append(rollout(env, policy, int(attrs["episode_length"]), int(attrs["action_repeat"]))[2])
    video = {"frames": np.stack(frames), "fps": 1 / (env.control_timestep() * int(attrs["action_repeat"]))} if frames else None
    return np.array([r.sum() for r in rewards]), rewards, video


def final_evaluation(args: Args, make_policy, attrs: dict, writer: SummaryWriter, step: int) -> dict:
    """The run's result: the final policy on `--final-eval-episodes` episodes, in an environment seeded with the run's
    seed (the periodic evaluations use seed + step), without video. Offline RL cannot pick its best checkpoint in the
    real environment, so this mean, not the best periodic evaluation, is the score to report. Returns the summary's
    `final_return`, `final_return_stderr` (sample std / sqrt(n); None for one episode) and `final_eval_episodes`;
    logs eval/final_return and eval/final_normalized_score at `step`."""
    final_args = replace(args, eval_episodes=args.final_eval_episodes, capture_video=False)
    returns = evaluate(final_args, make_policy, attrs, seed=args.seed)[0]
    n = len(returns)
    stderr = float(returns.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    writer.add_scalar("eval/final_return", returns.mean(), step)
    writer.add_scalar("eval/final_normalized_score", returns.mean() / 10, step)
    print(f"final evaluation: return {returns.mean():.1f} ± {stderr or 0:.1f} (standard error, {n} episodes)", flush=True)
    return {"final_return": float(returns.mean()), "final_return_stderr": stderr, "final_eval_episodes": n}


def render_frame(env, size: int) -> np.ndarray:
    """Camera 0 of the env, (size, size, 3) uint8, offscreen (MUJOCO_GL=egl or osmesa); without multisampling,
    shadows, reflections and the textured sky, which makes a CPU render several times faster and the GIF in
    tensorboard a third of the size."""
    env.physics.model.vis.quality.offsamples = 0  # read when the first render creates the context
    flags = {"shadow": False, "reflection": False, "skybox": False}
    return env.physics.render(size, size, camera_id=0, render_flag_overrides=flags)


def check_video(args: Args):
    """With --capture-video: renders a frame and finds the video encoder, so that a machine that cannot stops with
    one line before any training (README: rendering without a display)."""
    if not args.capture_video:
        return
    if args.video_size < 16 or args.video_size % 16:
        raise SystemExit(f"error: --video-size must be a positive multiple of 16 (the codec's block), got {args.video_size}")
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise SystemExit(f"error: --capture-video needs imageio-ffmpeg ({e}): pip install -r requirements.txt") from None
    try:
        env = make_env(args.env, 0)
        env.reset()
        render_frame(env, args.video_size)
    except Exception as e:  # each OpenGL backend fails in its own way
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(
            f"error: --capture-video cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({reason}); "
            f"set MUJOCO_GL=egl or osmesa, see the README"
        ) from None


def write_video(writer: SummaryWriter, run_dir: Path, video: dict, step: int):
    """An evaluation episode as `{run folder}/videos/eval_{step}.mp4` and, under tensorboard's Images, as the
    animated GIF that SummaryWriter.add_video writes (`eval/video`), encoded here without its moviepy dependency."""
    import imageio_ffmpeg
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    frames, fps = video["frames"], video["fps"]
    path = run_dir / "videos" / f"eval_{step}.mp4"
    try:
        path.parent.mkdir(exist_ok=True)
        out = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps, ffmpeg_log_level="error")
        out.send(None)  # starts ffmpeg
        for frame in frames:
            out.send(frame)
        out.close()
    except (OSError, RuntimeError) as e:  # a full disk, or ffmpeg failing
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: cannot write {path} ({reason}); free some space and continue with --resume") from None
    images = [Image.fromarray(frame) for frame in frames]
    gif = io.BytesIO()
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="eval/video", image=image)]), step)


def make_run_dir(args: Args) -> Path:
    """`runs/{run_name}`: a new folder, or the existing one with `--resume`; either must be writable."""
    if args.resume and args.run_name is None:
        raise SystemExit("error: --resume needs --run-name, the folder of the run to continue")
    run_name = args.run_name or f"{args.env}__{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.runs_dir) / run_name
    if args.resume and not (run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"error: {run_dir / 'checkpoint.pt'} not found: nothing to resume")
    if not args.resume and (run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"error: {run_dir} holds a run already; pass --resume to continue it or pick another --run-name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):  # a folder that is not writable would fail at the first checkpoint
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write to {run_dir}: {e.strerror}; pick another --runs-dir") from None
    return run_dir


def save_safely(obj, path: Path):
    """torch.save to a temporary file, then rename: an interruption leaves the old file or the new one. A write that
    fails (a full disk) stops the run with one line; the previous file is kept and the partial one removed, so the
    run continues with --resume once there is room."""
    tmp, buffer = path.with_name(path.name + ".tmp"), io.BytesIO()
    torch.save(obj, buffer)  # in memory first: a failed write is then an OSError that names its cause
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())  # a disk that fills up late says so here, before the rename
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(
            f"error: cannot write {path} ({e.strerror}); the previous one is kept: free some space and continue with "
            f"--resume --run-name {path.parent.name}"
        ) from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint or model file read on the CPU (torch.load with weights_only), with a one-line error for a
    missing, truncated or foreign file."""
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch reports a truncated archive, a foreign pickle, ... each in its own way
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: {path} cannot be read as a checkpoint ({reason}); a copy cut short?") from None
    if not isinstance(state, dict):
        raise SystemExit(f"error: {path} is not a checkpoint of this code")
    return state


def run_settings(args: Args, dataset: dict, commit: str) -> dict:
    """What a checkpoint records of the run that writes it, and checks when the run is resumed or its model reused:
    the script, every flag, the dataset file's content (sha256), the flags changed on resuming, and the commit of the
    code of every process that trained it (a run resumed after a `git pull` ran two versions of the code)."""
    return {
        "script": os.path.basename(__file__),
        "args": asdict(args),
        "dataset_sha256": dataset["sha256"],
        "changes": [],
        "commits": [commit],
    }


def check_settings(path: Path, state: dict, args: Args, dataset: dict, same) -> list:
    """Compares the settings a checkpoint records (`state`, read from `path`) with this run's. Refuses, in one line
    naming the differences, a checkpoint of another script, with other values of the flags in `same`, or of other
    data; returns the other flags that differ, as `--flag old -> new`."""
    settings, script = state.get("settings"), os.path.basename(__file__)
    if not isinstance(settings, dict):
        raise SystemExit(f"error: {path} records no settings (an older version of the code wrote it): start a new run")
    if settings["script"] != script:
        raise SystemExit(f"error: {path} was written by {settings['script']}, not {script}: pass one of {script}")
    saved, now, flag = settings["args"], asdict(args), lambda k: "--" + k.replace("_", "-")
    saved = asdict(type(args)()) | saved  # a flag added since the checkpoint was written: its default, the old behaviour
    differ = [k for k in now if k not in ("resume", "run_name") and saved[k] != now[k]]
    refused = [f"{flag(k)} {saved.get(k)} (this run: {now[k]})" for k in differ if k in same]
    if refused:
        raise SystemExit(f"error: {path} was made with {', '.join(refused)}: pass the same values, or do without it")
    if settings["dataset_sha256"] != dataset["sha256"]:
        raise SystemExit(
            f"error: {path} was made from other data than {dataset['path']} holds now (the file changed since): "
            f"start a new run"
        )
    return [f"{flag(k)} {saved.get(k)} -> {now[k]}" for k in differ if k not in same]


def resume_settings(run_dir: Path, args: Args, dataset: dict, commit: str) -> tuple[dict, dict]:
    """The checkpoint of the run to continue, and the settings to record from now on: a change of a flag outside
    RESUMABLE_FLAGS is refused, a change of one of them is printed and recorded, and so is a change of the code's
    commit (a checkpoint from before commits were recorded counts as "unknown")."""
    path = run_dir / "checkpoint.pt"
    state = load_checkpoint(path)
    changes = check_settings(path, state, args, dataset, [k for k in asdict(args) if k not in RESUMABLE_FLAGS])
    if changes:
        print(f"resuming with changed flags: {', '.join(changes)}")
    commits = list(state["settings"].get("commits", ["unknown"]))
    if commits[-1] != commit:
        print(f"resuming with other code: {commits[-1]} -> {commit}")
        commits.append(commit)
    return state, state["settings"] | {
        "args": asdict(args),
        "changes": state["settings"]["changes"] + changes,
        "commits": commits,
    }


def git_commit() -> str:
    """The commit of this file's checkout, with `-dirty` when tracked files have uncommitted changes."""
    try:
        cmd = ["git", "describe", "--always", "--dirty", "--abbrev=40"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_summary(run_dir: Path, args: Args, settings: dict, evals: list, final: dict, labeled_episodes, **extra):
    """`summary.json`: the result, `final_return` (the mean return of final_evaluation, with its standard error and
    number of episodes) and final_normalized_score = final_return / 10; best_normalized_score, the best periodic
    evaluation (null without one), for reference only, since offline RL cannot select a checkpoint in the real
    environment; the split and the settings (with the dataset's sha256, so that utils/grid.py knows a run made on other
    data); `git_commit`, the commit of the code that finished the run, and `git_commits`, that of every process that
    trained it (more than one when it was resumed after the code changed). Written to a temporary file and renamed,
    so a summary.json that exists is complete."""
    returns = [r for _, r in evals]
    summary = {
        **final,
        "final_normalized_score": final["final_return"] / 10,
        "best_normalized_score": max(returns) / 10 if returns else None,
        "evaluations": [{"step": s, "return": r} for s, r in evals],
        "labeled_episodes": [int(e) for e in labeled_episodes],
        "args": asdict(args),
        "script": settings["script"],
        "dataset_sha256": settings["dataset_sha256"],
        "flag_changes": settings["changes"],
        "git_commit": settings["commits"][-1],
        "git_commits": settings["commits"],
        **extra,
    }
    path, tmp = run_dir / "summary.json", run_dir / "summary.json.tmp"
    try:
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(
            f"error: cannot write {path} ({e.strerror}); the checkpoint is kept: free some space and write it with "
            f"--resume --run-name {run_dir.name}"
        ) from None


def compute_mean_std(observations: np.ndarray, eps: float = 1e-3):
    """State normalisation of TD3+BC: the dataset's per-dimension mean and std (+eps)."""
    return observations.mean(0), observations.std(0) + eps


class VectorizedLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinCritic(nn.Module):
    """Q1 and Q2 as one network: both critics run in the same batched matmuls."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            VectorizedLinear(2, obs_dim + act_dim, hidden),
            nn.ReLU(),
            VectorizedLinear(2, hidden, hidden),
            nn.ReLU(),
            VectorizedLinear(2, hidden, 1),
        )

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).unsqueeze(0).expand(2, -1, -1)  # (B, D) -> (2, B, D)
        return self.net(x).squeeze(-1)  # (2, B)

    def q1(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Q1 alone, for the actor (TD3 trains it on Q1 only): member 0 of every layer, half the arithmetic."""
        x = torch.cat([obs, act], -1)
        for layer in self.net:
            x = torch.addmm(layer.bias[0], x, layer.weight[0]) if isinstance(layer, VectorizedLinear) else layer(x)
        return x.squeeze(-1)  # (B, 1) -> (B,)


class Actor(nn.Module):
    """Deterministic policy pi(s) in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, act_dim), nn.Tanh()
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def critic_loss(critic, critic_target, actor_target, batch, args: Args) -> torch.Tensor:
    """TD3's clipped double-Q target with target policy smoothing; the sum of both critics' MSE."""
    obs, act, rew, next_obs, terminal = batch
    with torch.no_grad():
        noise = (torch.randn_like(act) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
        next_act = (actor_target(next_obs) + noise).clamp(-1, 1)
        target = rew + args.gamma * (1 - terminal) * critic_target(next_obs, next_act).min(0).values
    return ((critic(obs, act) - target) ** 2).mean(1).sum()


def actor_loss(actor, critic, batch, alpha: float):
    """-lambda Q1(s, pi(s)) + (pi(s) - a)^2, with lambda = alpha / mean|Q1| (not differentiated)."""
    obs, act = batch[0], batch[1]
    pi = actor(obs)
    q = critic.q1(obs, pi)
    lmbda = alpha / q.abs().mean().detach()
    return -lmbda * q.mean() + F.mse_loss(pi, act), lmbda


if __name__ == "__main__":
    args = tyro.cli(Args)
    commit = git_commit()  # recorded at the start: the code that runs, whatever changes later
    for name in ("total_steps", "batch_size", "eval_every", "eval_episodes", "final_eval_episodes", "policy_freq"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    # every input is checked before any work: the dataset, the split, rendering, the run folder, the checkpoint
    dataset = load_dataset(args)
    check_split(dataset, args, dataset["labeled_episodes"], [], 1, min_with_actions=1)
    check_video(args)
    run_dir = make_run_dir(args)
    state, settings = (
        resume_settings(run_dir, args, dataset, commit) if args.resume else (None, run_settings(args, dataset, commit))
    )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TD3+BC sees the labeled trajectories only
    train = {k: dataset[k][dataset["labeled"]] for k in DATASET_KEYS}
    print(f"{run_dir.name}: {len(dataset['labeled_episodes'])} labeled trajectories, {len(train['rewards'])} transitions")
    mean, std = compute_mean_std(train["observations"])
    keys = ("observations", "actions", "rewards", "next_observations", "terminals")
    normalize = {"observations": lambda x: (x - mean) / std, "next_observations": lambda x: (x - mean) / std}
    data = [torch.as_tensor(normalize.get(k, lambda x: x)(train[k]), dtype=torch.float32, device=device) for k in keys]
    obs_dim, act_dim = data[0].shape[1], data[1].shape[1]

    actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
    actor_target = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
    critic = TwinCritic(obs_dim, act_dim, args.hidden_dim).to(device)
    critic_target = TwinCritic(obs_dim, act_dim, args.hidden_dim).to(device)
    actor_target.load_state_dict(actor.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    actor_target.requires_grad_(False)
    critic_target.requires_grad_(False)
    fused = device.type in ("cpu", "cuda")  # one kernel per optimizer step instead of one per tensor
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=fused)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=fused)
    nets = {"actor": actor, "actor_target": actor_target, "critic": critic, "critic_target": critic_target}
    nets.update(actor_optimizer=actor_optimizer, critic_optimizer=critic_optimizer)

    start_step, evals = 0, []
    if args.resume:
        for k, net in nets.items():
            net.load_state_dict(state[k])
        start_step, evals = state["step"], [tuple(e) for e in state["evals"]]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {run_dir} at step {start_step}")

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor((obs - mean) / std, dtype=torch.float32, device=device)
        return actor(o.unsqueeze(0))[0].cpu().numpy()

    start_time, target_params = time.time(), list(critic_target.parameters()) + list(actor_target.parameters())
    online_params = list(critic.parameters()) + list(actor.parameters())
    for step in range(start_step, args.total_steps):
        idx = torch.randint(0, len(data[0]), (args.batch_size,), device=device)
        batch = [x[idx] for x in data]
        loss_q = critic_loss(critic, critic_target, actor_target, batch, args)
        critic_optimizer.zero_grad(set_to_none=True)
        loss_q.backward()
        critic_optimizer.step()

        if step % args.policy_freq == 0:
            critic.requires_grad_(False)  # the actor's gradient flows through Q1(s, a) into a only
            loss_pi, lmbda = actor_loss(actor, critic, batch, args.alpha)
            actor_optimizer.zero_grad(set_to_none=True)
            loss_pi.backward()
            actor_optimizer.step()
            critic.requires_grad_(True)
            with torch.no_grad():
                torch._foreach_lerp_(target_params, online_params, args.tau)

        if (step + 1) % 1000 == 0:
            sps = (step + 1 - start_step) / (time.time() - start_time)
            writer.add_scalar("losses/qf_loss", loss_q.item(), step + 1)
            writer.add_scalar("losses/actor_loss", loss_pi.item(), step + 1)
            writer.add_scalar("losses/lambda", lmbda.item(), step + 1)
            writer.add_scalar("charts/SPS", sps, step + 1)
            writer.add_scalar("charts/progress", (step + 1) / args.total_steps, step + 1)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.total_steps:
            returns, _, video = evaluate(args, lambda: act, dataset["attrs"], seed=args.seed + step + 1)
            if video is not None:
                write_video(writer, run_dir, video, step + 1)
            evals.append((step + 1, float(returns.mean())))
            writer.add_scalar("eval/episodic_return", returns.mean(), step + 1)
            writer.add_scalar("eval/normalized_score", returns.mean() / 10, step + 1)
            sps = (step + 1 - start_step) / (time.time() - start_time)
            eta = (args.total_steps - step - 1) / sps
            print(
                f"step {step + 1}/{args.total_steps} | return {returns.mean():7.1f} ± {returns.std():5.1f} "
                f"| score {returns.mean() / 10:5.1f} | {sps:4.0f} steps/s | ETA {eta / 60:5.1f} min",
                flush=True,
            )
            state = {k: net.state_dict() for k, net in nets.items()}
            state.update(step=step + 1, evals=evals, torch_rng=torch.get_rng_state(), settings=settings)
            save_safely(state, run_dir / "checkpoint.pt")

    final = final_evaluation(args, lambda: act, dataset["attrs"], writer, args.total_steps)
    write_summary(run_dir, args, settings, evals, final, dataset["labeled_episodes"])
    if args.save_model:
        stats = {"obs_mean": torch.as_tensor(mean), "obs_std": torch.as_tensor(std), "settings": settings}
        save_safely({k: net.state_dict() for k, net in nets.items()} | stats, run_dir / "model.pt")
    writer.close()
    best = max(r for _, r in evals) / 10
    print(f"final normalized score {final['final_return'] / 10:.1f} (best periodic evaluation {best:.1f}); see {run_dir}")
