# LAWM (Alles et al. 2025, "Latent Action World Models for Control with Unlabeled Trajectories"): a world
# model that learns from trajectories with actions (D_ac) and without them (D_af) through one latent action
# space, and the constrained latent-action actor-critic of C-LAP trained in its imagination. It is c_lap.py
# with two changes, so `diff c_lap.py lawm.py` shows the paper's contribution: the latent action prior is
# N(0, I), and an inverse dynamics model q(u_t | s_t, e_{t+1}) infers the latent action of an action-free
# window. Docs: docs/lawm.md.
# Names follow the paper: h (deterministic state), z (stochastic state), s = (h, z), u (latent action),
# e (observation embedding), prior / posterior, idm (the action-free latent action posterior).
import os
import sys

# states only: no OpenGL context is needed, but for --capture-video, which renders offscreen with EGL (README)
os.environ.setdefault("MUJOCO_GL", "egl" if {"--capture-video", "--capture_video"} & set(sys.argv[1:]) else "disable")
# back CPU tensors of 2 MB and more with transparent huge pages (PyTorch's switch, read at its first such
# allocation): the actor-critic's ~160 MB activations (5 value nets x 40,800 imagined states x 200) then cost
# far fewer page faults
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import hashlib
import io
import json
import math
import random
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal, Optional

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

    # Algorithm specific arguments (defaults: the GPU configuration; docs/lawm.md gives the CPU recipe)
    model_steps: int = 100_000
    """gradient steps of the world model"""
    agent_steps: int = 100_000
    """gradient steps of the actor-critic in imagination, on the frozen world model"""
    model_checkpoint: Optional[str] = None
    """`model.pt` of an earlier run: load its world model and train the agent only (with --agent-steps 0: load its
    actor too and only evaluate it)"""
    batch_size: int = 50
    """windows per world-model batch (also the imagination starts: batch_size x seq_len states)"""
    labeled_ratio: float = 0.25
    """share of each batch's windows drawn from trajectories with actions (the rest from action-free ones);
    sampling by trajectory count would give 5% at --labeled-fraction 0.05 and starve the action decoder"""
    seq_len: int = 50
    """transitions per window (L); a window never crosses an episode end"""
    deter_dim: int = 512
    """size of the deterministic state h_t (GRU with LayerNorm)"""
    stoch_dim: int = 30
    """size of the stochastic state z_t (diagonal Gaussian)"""
    hidden_dim: int = 512
    """width of every hidden layer of the model and the agent"""
    mlp_layers: int = 2
    """hidden layers of the encoder, the decoders and the latent action networks"""
    latent_action_dim: int = 8
    """size of the latent action u_t"""
    min_std: float = 0.1
    """lower bound of the standard deviations of z_t and u_t (of u_t unless --min-std-u is given)"""
    min_std_u: Optional[float] = None
    """lower bound of the standard deviations of the latent action posteriors q(u|s,a) and q_idm alone (None: the same
    as --min-std); a larger one makes u_t noisier, a remedy of latent-action papers against u_t carrying the next
    observation (docs/lawm.md)"""
    free_nats: Optional[float] = None
    """KL below this many nats is not penalised; default 1.0 on medium-replay and plan2explore, else 0 (paper Table 2)"""
    free_nats_u: Optional[float] = None
    """free nats of the latent action KL alone (None: the same as --free-nats); the u-KL caps what u_t can say about
    a_t, but with lawm.py on walker-walk 3 nats let the data's latent actions leave the constraint and 6 let u_t
    carry the next observation instead of the action (docs/lawm.md)"""
    kl_u_windows: Literal["all", "action-free"] = "all"
    """windows whose latent action KL enters the loss: `all` (the unified ELBO) or `action-free` only, a remedy of
    latent-action papers against the shortcut: q(u|s,a) reads no future observation, so only the IDM's u_t can carry
    one; the logged kl_u stays the mean over all windows (docs/lawm.md)"""
    kl_balance: float = 0.8
    """KL balancing: this share of the KL gradient trains the prior, the rest the posterior"""
    kl_balance_u: Optional[float] = 0.0
    """KL balancing of the latent action KL alone (None: the same as --kl-balance). The N(0, I) prior has no
    parameters, so a share `balance` of the u-KL gradient trains nothing and the u-KL acts on the posterior at weight
    1 - balance; 0 keeps the ELBO's weight 1, which keeps the data's latent actions where the constraint lets the
    actor act (at 0.8 the actor exploited the model on walker-walk: docs/lawm.md)"""
    action_loss_coef: float = 1.0
    """weight of -log p(a_t|s_t,u_t), a unit-variance Gaussian on actions in [-1, 1], in the world model's loss"""
    align_coef: float = 1.0
    """weight of the alignment term KL(sg q(u|s,a) || q_idm(u|s,e')) on windows with actions (0 turns it off)"""
    recovery_episodes: int = 20
    """action-free trajectories (picked by --split-seed) whose true actions, which training never reads, score the
    actions the IDM recovers (R2 against two controls, MSE); 0 turns the diagnostic off"""
    model_learning_rate: float = 3e-4
    """Adam learning rate of the world model"""
    grad_clip: float = 100.0
    """gradient norm clip of every optimizer"""
    horizon: int = 15
    """imagination horizon H"""
    gamma: float = 0.99
    """discount factor"""
    return_lambda: float = 0.95
    """lambda of the lambda-returns"""
    num_values: int = 5
    """value networks in the ensemble (the target is their mean)"""
    actor_learning_rate: float = 8e-5
    """Adam learning rate of the actor"""
    value_learning_rate: float = 8e-5
    """Adam learning rate of the value ensemble"""
    entropy_coef: float = 1e-4
    """weight of the policy's entropy bonus (the logprob regulariser)"""
    epsilon: float = 1.0
    """the constraint: the policy acts with u = mu_p(s) + epsilon * sigma_p(s) * b, b in (-1, 1)"""
    eval_filter: Literal["actor", "executed"] = "actor"
    """the latent action that advances the filter h_{t+1} = f(h_t, z_t, u_t) in the real environment: `actor`, the
    actor's u_t; `executed`, the mean of q(u_t | s_t, a_t) of the action a_t sent (as in training, where u_t is
    inferred from the executed action)"""
    target_update_every: int = 100
    """agent steps between copies of the value ensemble into its slow target"""
    log_every: int = 250
    """gradient steps between loss logs"""


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


def sample_windows(valid_starts: np.ndarray, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Indices (B, L) of `batch_size` windows of `seq_len` consecutive transitions; `valid_starts` holds
    every index at which a window fits inside one episode, so no window crosses an episode end."""
    pick = torch.randint(0, len(valid_starts), (batch_size,))
    start = torch.as_tensor(valid_starts, device=device)[pick.to(device)]
    return start[:, None] + torch.arange(seq_len, device=device)[None, :]  # (B,) -> (B, L)


def window_starts(episode_starts: np.ndarray, episode_ends: np.ndarray, episodes, seq_len: int) -> np.ndarray:
    """Every start index of a window of seq_len transitions that stays inside one of `episodes`."""
    ranges = [np.arange(episode_starts[e], episode_ends[e] - seq_len + 1) for e in episodes]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def consecutive_windows(episode_starts: np.ndarray, episode_ends: np.ndarray, episodes, seq_len: int) -> np.ndarray:
    """Indices (R, L) of the consecutive windows of seq_len transitions that cover `episodes` (but for a rest
    shorter than seq_len at each episode's end)."""
    ranges = [np.arange(episode_starts[e], episode_ends[e] - seq_len + 1, seq_len) for e in episodes]
    starts = np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)
    return starts[:, None] + np.arange(seq_len)[None, :]  # (R,) -> (R, L)


def recovery_set(action_free_episodes: np.ndarray, num: int, split_seed: int) -> np.ndarray:
    """The recovery set: `num` of the action-free trajectories (all of them when there are fewer), picked with the
    split seed, sorted. LAWM trains on them without actions, like on every action-free trajectory; only the
    action-recovery diagnostic reads their true actions (read_recovery_actions)."""
    return np.sort(np.random.default_rng(split_seed).permutation(action_free_episodes)[:num])


def read_recovery_actions(dataset: dict, episodes) -> np.ndarray:
    """The true actions of the recovery set, for the action-recovery diagnostic alone: load_dataset replaced the
    actions of every action-free trajectory by NaN, so those of `episodes` are read again from the dataset file.
    Returns an array shaped like the dataset's actions (N, A), NaN outside `episodes`."""
    actions = np.full(dataset["actions"].shape, np.nan, dtype=np.float32)
    with h5py.File(dataset["path"], "r") as f:
        for e in episodes:
            start, end = dataset["episode_starts"][e], dataset["episode_ends"][e]
            actions[start:end] = f["actions"][start:end]
    return actions


def windows_with_actions(batch_size: int, labeled_ratio: float, has_action_free: bool) -> int:
    """How many of a batch's windows come from trajectories with actions: labeled_ratio of them, but at least
    one of each kind while both kinds exist (all of them when there is no action-free data)."""
    if not has_action_free or labeled_ratio >= 1:
        return batch_size
    return min(max(1, round(labeled_ratio * batch_size)), batch_size - 1)


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """`layers` x (Linear, LayerNorm, Swish), then a Linear output."""
    blocks = []
    for i in range(layers):
        blocks += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.SiLU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, out_dim))


class Gaussian(nn.Module):
    """A diagonal Gaussian whose mean and std (softplus, at least min_std) an MLP reads off its input."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, layers: int, min_std: float):
        super().__init__()
        self.net, self.min_std = mlp(in_dim, 2 * out_dim, hidden, layers), min_std

    def forward(self, x: torch.Tensor):
        mean, std = self.net(x).chunk(2, -1)
        return mean, F.softplus(std) + self.min_std


def kl_gaussian(mean1, std1, mean2, std2) -> torch.Tensor:
    """KL(N(mean1, std1) || N(mean2, std2)) of diagonal Gaussians, summed over the last dimension."""
    var_ratio = (std1 / std2) ** 2
    return 0.5 * (var_ratio + ((mean1 - mean2) / std2) ** 2 - 1 - torch.log(var_ratio)).sum(-1)


def kl_loss(post, prior, balance: float, free_nats: float):
    """KL balancing (DreamerV2): `balance` of the gradient moves the prior towards the posterior, the rest
    the posterior towards the prior; each side's mean KL is clamped below at `free_nats`.
    `post` and `prior` are (mean, std) pairs; returns (loss, mean KL)."""
    sg = lambda d: tuple(x.detach() for x in d)  # noqa: E731
    kl_prior = kl_gaussian(*sg(post), *prior).mean()  # trains the prior
    kl_post = kl_gaussian(*post, *sg(prior)).mean()  # trains the posterior
    loss = balance * kl_prior.clamp(min=free_nats) + (1 - balance) * kl_post.clamp(min=free_nats)
    return loss, kl_prior.detach()


def default_free_nats(dataset: str) -> float:
    """The paper's free nats (Table 2): 1.0 on the broad, multi-policy datasets medium-replay and plan2explore,
    where a tight KL would squeeze the posterior of very different behaviours, 0 on the others."""
    return 1.0 if dataset in ("medium-replay", "plan2explore") else 0.0


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """-log N(x | mean, 1), summed over the last dimension."""
    return (0.5 * (x - mean) ** 2 + 0.5 * math.log(2 * math.pi)).sum(-1)


class LayerNormGRUCell(nn.Module):
    """GRU cell with LayerNorm on the gates (as in DreamerV2): h' = g * tanh(r * c) + (1 - g) * h."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(in_dim + hidden, 3 * hidden, bias=False)
        self.norm = nn.LayerNorm(3 * hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1)  # starts by mostly keeping h
        return update * cand + (1 - update) * h


class WorldModel(nn.Module):
    """The latent action state-space model. Model state s_t = (h_t, z_t), latent action u_t.

    Time alignment, for a window of L transitions (L + 1 observations):

        o_1 ─enc─> e_1          o_2 ─enc─> e_2                    o_{L+1} ─enc─> e_{L+1}
        h_1 = 0                 h_2 = GRU(h_1, [z_1, u_1])        h_{L+1} = GRU(h_L, [z_L, u_L])
        z_1 ~ q(z | h_1, e_1)   z_2 ~ q(z | h_2, e_2)             z_{L+1} ~ q(z | h_{L+1}, e_{L+1})
        u_1 ~ q(u | s_1, a_1)   u_2 ~ q(u | s_2, a_2)   ...       (a window with actions)
        u_1 ~ q_idm(u | s_1, e_2)                       ...       (an action-free window: the IDM sees e_{t+1})
        o_t is decoded from s_t; a_t from (s_t, u_t); r_t (the reward after a_t) from s_{t+1}.
    Priors: p(z_t | h_t) and p(u_t) = N(0, I), the same for both kinds of window, so their latent actions
    share one space."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        H, L, d_u = args.hidden_dim, args.mlp_layers, args.latent_action_dim
        feat = args.deter_dim + args.stoch_dim
        self.deter_dim, self.stoch_dim, self.latent_action_dim = args.deter_dim, args.stoch_dim, d_u
        self.encoder = mlp(obs_dim, H, H, L)
        self.transition_in = nn.Sequential(nn.Linear(args.stoch_dim + d_u, H), nn.LayerNorm(H), nn.SiLU())
        self.gru = LayerNormGRUCell(H, args.deter_dim)
        self.z_prior = Gaussian(args.deter_dim, args.stoch_dim, H, 1, args.min_std)
        self.z_posterior = Gaussian(args.deter_dim + H, args.stoch_dim, H, 1, args.min_std)
        min_std_u = args.min_std if args.min_std_u is None else args.min_std_u
        self.u_posterior = Gaussian(feat + act_dim, d_u, H, L, min_std_u)
        self.idm = Gaussian(feat + H, d_u, H, L, min_std_u)
        self.action_decoder = mlp(feat + d_u, act_dim, H, L)
        self.obs_decoder = mlp(feat, obs_dim, H, L)
        self.reward_decoder = mlp(feat, 1, H, L)

    def u_prior(self, feat: torch.Tensor):
        """p(u_t) = N(0, I): no parameters, the same for every state; (mean, std) of shape (..., U)."""
        mean = feat.new_zeros(*feat.shape[:-1], self.latent_action_dim)
        return mean, torch.ones_like(mean)

    def step(self, h: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """h_{t+1} = GRU(h_t, MLP([z_t, u_t]))."""
        return self.gru(self.transition_in(torch.cat([z, u], -1)), h)

    def observe(self, embed: torch.Tensor, actions: torch.Tensor):
        """Filters a batch of windows whose first B_ac have actions and whose other B - B_ac are action-free:
        embed (B, L+1, E), actions (B_ac, L, A), of the first B_ac windows only, so the action-free path has no
        action to read. Their latent actions come from q(u_t | s_t, a_t) and from the IDM q_idm(u_t | s_t, e_{t+1}).
        Only what feeds the recurrence (h, and the posterior samples of z and u) runs in the loop; the encoder
        ran on all steps before it, and the priors, like the decoders, run on all states at once after it.
        Returns features s_t = [h_t, z_t] (B, L+1, F), the z posteriors and priors ((B, L+1, Z) mean/std), the
        u posteriors in use and the priors ((B, L, U) mean/std), the sampled u (B, L, U), and the IDM on the
        windows with actions ((B_ac, L, U) mean/std, for the alignment term)."""
        B, L, n_ac = embed.shape[0], embed.shape[1] - 1, actions.shape[0]
        h = embed.new_zeros(B, self.deter_dim)
        hs, zs, zq, us, uq = [], [], [], [], []
        embeds = embed.unbind(1)  # one backward for all steps; embed[:, t] would fill a zero tensor per step
        for t in range(L + 1):
            zq_mean, zq_std = self.z_posterior(torch.cat([h, embeds[t]], -1))
            z = zq_mean + zq_std * torch.randn_like(zq_std)
            hs.append(h)
            zs.append(z)
            zq.append((zq_mean, zq_std))
            if t == L:
                break
            s = torch.cat([h, z], -1)
            ac_mean, ac_std = self.u_posterior(torch.cat([s[:n_ac], actions[:, t]], -1))  # (B_ac, U)
            af_mean, af_std = self.idm(torch.cat([s[n_ac:], embeds[t + 1][n_ac:]], -1))  # (B - B_ac, U)
            uq_mean, uq_std = torch.cat([ac_mean, af_mean]), torch.cat([ac_std, af_std])  # (B, U)
            u = uq_mean + uq_std * torch.randn_like(uq_std)
            us.append(u)
            uq.append((uq_mean, uq_std))
            h = self.step(h, z, u)
        h = torch.stack(hs, 1)  # lists over time -> (B, T, D)
        feat = torch.cat([h, torch.stack(zs, 1)], -1)
        out = {"feat": feat, "u": torch.stack(us, 1)}
        out["zq_mean"], out["zq_std"] = (torch.stack(x, 1) for x in zip(*zq, strict=True))
        out["uq_mean"], out["uq_std"] = (torch.stack(x, 1) for x in zip(*uq, strict=True))
        out["zp_mean"], out["zp_std"] = self.z_prior(h)
        out["up_mean"], out["up_std"] = self.u_prior(feat[:, :-1])
        out["idm_mean"], out["idm_std"] = self.idm(torch.cat([feat[:n_ac, :-1], embed[:n_ac, 1:]], -1))
        return out


def unified_elbo_loss(wm: WorldModel, obs, actions, rewards, args: Args, free_nats: float):
    """The negative unified ELBO of LAWM on a batch whose first B_ac windows have actions: obs (B, L+1, D),
    actions (B_ac, L, A), rewards (B, L). Every window: -log p(o_t|s_t) - log p(r_t|s_{t+1}) + KL(q(z_t)||p(z_t))
    + KL(q(u_t)||N(0, I)), with q(u_t) = q(u_t|s_t,a_t) or q_idm(u_t|s_t,e_{t+1}); windows with actions add
    -log p(a_t|s_t,u_t) and, weighted by align_coef, the alignment KL(sg q(u_t|s_t,a_t) || q_idm(u_t|s_t,e_{t+1})).
    Every term is a mean over windows and time, so a term of the labeled windows only counts with their share
    B_ac / B of the batch (with B_ac = B this is C-LAP's ELBO with a standard normal prior); the action term is
    weighted by --action-loss-coef, the u-KL balanced by --kl-balance-u (and on the action-free windows alone with
    --kl-u-windows action-free).
    Returns (loss, metrics, states); `action_loss` and `align` in metrics are per labeled step."""
    embed = wm.encoder(obs)  # (B, L+1, D) -> (B, L+1, E), all steps at once
    s = wm.observe(embed, actions)
    feat, n_ac, share = s["feat"], len(actions), len(actions) / len(obs)
    obs_loss = gaussian_nll(obs, wm.obs_decoder(feat)).mean()
    reward_loss = gaussian_nll(rewards[..., None], wm.reward_decoder(feat[:, 1:])).mean()
    kl_z_loss, kl_z = kl_loss((s["zq_mean"], s["zq_std"]), (s["zp_mean"], s["zp_std"]), args.kl_balance, free_nats)
    balance_u = args.kl_balance if args.kl_balance_u is None else args.kl_balance_u
    free_nats_u = free_nats if args.free_nats_u is None else args.free_nats_u
    uq, up = (s["uq_mean"], s["uq_std"]), (s["up_mean"], s["up_std"])
    kl_u_loss, kl_u = kl_loss(uq, up, balance_u, free_nats_u)  # kl_u, the logged diagnostic: over all windows
    if args.kl_u_windows == "action-free":  # the u-KL of the IDM's windows alone: (B, L, U) -> (B - B_ac, L, U)
        uq_af, up_af = tuple(x[n_ac:] for x in uq), tuple(x[n_ac:] for x in up)
        kl_u_loss = kl_loss(uq_af, up_af, balance_u, free_nats_u)[0] if n_ac < len(obs) else kl_u_loss * 0
    loss = obs_loss + reward_loss + kl_z_loss + kl_u_loss
    metrics = {"obs_loss": obs_loss, "reward_loss": reward_loss, "kl_z": kl_z, "kl_u": kl_u}
    if n_ac > 0:  # (a mean over no windows would be NaN)
        action_loss = gaussian_nll(actions, wm.action_decoder(torch.cat([feat[:n_ac, :-1], s["u"][:n_ac]], -1))).mean()
        sg_posterior = (s["uq_mean"][:n_ac].detach(), s["uq_std"][:n_ac].detach())
        align = kl_gaussian(*sg_posterior, s["idm_mean"], s["idm_std"]).mean()
        loss = loss + share * (args.action_loss_coef * action_loss + args.align_coef * align)
        metrics.update(action_loss=action_loss, align=align)
    return loss, metrics, s


class LatentActor(nn.Module):
    """TanhGaussian policy over b in (-1, 1)^U; the latent action is u = mu_p(s) + epsilon * sigma_p(s) * b."""

    def __init__(self, feat_dim: int, u_dim: int, hidden: int, layers: int):
        super().__init__()
        self.net = mlp(feat_dim, 2 * u_dim, hidden, layers)

    def forward(self, feat: torch.Tensor, deterministic: bool = False):
        mean, std = self.net(feat).chunk(2, -1)
        std = F.softplus(std) + 1e-4
        x = mean if deterministic else mean + std * torch.randn_like(mean)
        log_prob = (-0.5 * ((x - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - x - F.softplus(-2 * x))).sum(-1)
        return torch.tanh(x), log_prob


def constrained_latent_action(wm: WorldModel, feat: torch.Tensor, b: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The constraint of C-LAP: u stays within epsilon standard deviations of the latent action prior."""
    mean, std = wm.u_prior(feat)
    return mean + epsilon * std * b


class ValueEnsemble(nn.Module):
    """`n` value networks as one network of batched matmuls: (B, F) -> (n, B)."""

    def __init__(self, n: int, feat_dim: int, hidden: int):
        super().__init__()
        self.n = n
        self.net = nn.Sequential(
            VectorizedLinear(n, feat_dim, hidden),
            nn.SiLU(),
            VectorizedLinear(n, hidden, hidden),
            nn.SiLU(),
            VectorizedLinear(n, hidden, 1),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = feat.reshape(1, -1, feat.shape[-1]).expand(self.n, -1, -1)  # (..., F) -> (n, N, F)
        return self.net(x).reshape(self.n, *feat.shape[:-1])  # (n, N, 1) -> (n, ...)


def imagine(wm: WorldModel, actor: LatentActor, h: torch.Tensor, z: torch.Tensor, horizon: int, epsilon: float):
    """Rolls the prior dynamics `horizon` steps from the states (h, z) (N starts) with the actor's latent
    actions. Gradients flow through the dynamics into the actor. Returns features (H+1, N, F) and the
    actor's log-probabilities (H, N)."""
    feats, log_probs = [torch.cat([h, z], -1)], []
    for _ in range(horizon):
        b, log_prob = actor(feats[-1])
        u = constrained_latent_action(wm, feats[-1], b, epsilon)
        h = wm.step(h, z, u)
        z_mean, z_std = wm.z_prior(h)
        z = z_mean + z_std * torch.randn_like(z_std)
        feats.append(torch.cat([h, z], -1))
        log_probs.append(log_prob)
    return torch.stack(feats), torch.stack(log_probs)


def lambda_return(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns: rewards (H, N) with r_t the reward of reaching s_{t+1}, values (H+1, N) of s_t.
    R_t = r_t + gamma * ((1 - lam) * v_{t+1} + lam * R_{t+1}), R_H = v_H. Returns (H, N)."""
    ret, out = values[-1], []
    for t in reversed(range(len(rewards))):
        ret = rewards[t] + gamma * ((1 - lam) * values[t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


def share_inside_constraint(u: torch.Tensor, prior_mean: torch.Tensor, prior_std: torch.Tensor, epsilon: float):
    """How much of the data the constrained actor can reach: the share of latent actions u (..., U) inside the box
    it acts in, |u - mu_p| <= epsilon * sigma_p in every dimension, and the share of dimensions inside, averaged.
    Returns (share of u inside, share per dimension)."""
    inside = (u - prior_mean).abs() <= epsilon * prior_std
    return inside.all(-1).float().mean().item(), inside.float().mean().item()


@torch.no_grad()
def policy_step(wm: WorldModel, actor: LatentActor, memory: dict, obs: torch.Tensor, epsilon: float, eval_filter: str):
    """One step of the policy in the real environment, which filters the model state from the observations:
    h_t = f(h_{t-1}, z_{t-1}, u_{t-1}) and z_t the mean of q(z_t | h_t, e_t); the actor's latent action u_t inside the
    constraint; the action a_t, the mean of p(a_t | s_t, u_t) clipped to [-1, 1]. The filter's next step reads the
    actor's u_t (eval_filter `actor`) or the mean of q(u_t | s_t, a_t) of the action sent (`executed`, as in
    training). `memory` holds h, z and u between steps (u None at an episode's start); obs (1, D), normalised.
    Returns the action (1, A) and the reward the model predicts for the previous step, read off s_t (None at first)."""
    if memory["u"] is not None:
        memory["h"] = wm.step(memory["h"], memory["z"], memory["u"])
    memory["z"] = wm.z_posterior(torch.cat([memory["h"], wm.encoder(obs)], -1))[0]
    feat = torch.cat([memory["h"], memory["z"]], -1)
    reward = None if memory["u"] is None else wm.reward_decoder(feat)[:, 0]  # r_{t-1} is read off s_t
    u = constrained_latent_action(wm, feat, actor(feat, deterministic=True)[0], epsilon)
    action = wm.action_decoder(torch.cat([feat, u], -1)).clamp(-1, 1)
    memory["u"] = u if eval_filter == "actor" else wm.u_posterior(torch.cat([feat, action], -1))[0]
    return action, reward


def reward_gap(imagined_reward: float, real_rewards: list, model_rewards: list) -> dict:
    """Model exploitation, in reward per step: the actor's imagined reward (`imagined_reward`, over the horizon-H
    rollouts from data states it trained on since the last evaluation), the real reward of the evaluation episodes
    (`real_rewards`, one (T,) array per episode), and the reward the world model predicts along them (`model_rewards`,
    one sequence per episode, for its first T - 1 steps: the filter never sees the state after the last one).
    imagined - real is what the actor may exploit; model - real, on the same steps, is the reward model's share of it,
    the rest is imagination drifting off the data."""
    real = np.concatenate(real_rewards)
    model = np.concatenate([np.asarray(m, dtype=np.float64) for m in model_rewards])
    matched = np.concatenate([r[: len(m)] for r, m in zip(real_rewards, model_rewards, strict=True)])
    return {
        "imagined_reward": imagined_reward,
        "real_reward": float(real.mean()),
        "model_reward": float(model.mean()) if len(model) else None,
        "imagined_minus_real_reward": imagined_reward - float(real.mean()),
        "model_minus_real_reward": float((model - matched).mean()) if len(model) else None,
    }


@torch.no_grad()
def action_recovery(wm: WorldModel, obs: torch.Tensor, true_actions: torch.Tensor) -> dict:
    """Does the model understand action-free data? Windows of action-free trajectories are filtered as such (u_t from
    the IDM, which never sees a_t), the action is read off the IDM's mean latent action as the mean of
    p(a_t | s_t, u_t), clipped to [-1, 1] as when acting, and compared with the true a_t: R2 (averaged over action
    dimensions) and MSE. Two controls decode from the same states s_t with u_t = 0 (the prior's mean) and with the
    IDM's u_t shuffled in time within each window: a decoder that clones behaviour from s_t alone scores as well with
    them; only the margin over them is the IDM's. obs (R, L+1, D), true_actions (R, L, A).
    Returns {"r2", "mse", "r2_u_zero", "r2_u_shuffled"}."""
    s = wm.observe(wm.encoder(obs), true_actions[:0])  # (0, L, A): no window has actions
    feat, u, true = s["feat"][:, :-1], s["uq_mean"], true_actions.flatten(0, 1)  # (R, L, A) -> (R * L, A)
    shuffled = u.gather(1, torch.rand(u.shape[:2], device=u.device).argsort(1)[..., None].expand_as(u))  # per window

    def decoded(u: torch.Tensor) -> torch.Tensor:
        return wm.action_decoder(torch.cat([feat, u], -1)).clamp(-1, 1).flatten(0, 1)  # (R * L, A)

    def r2(predicted: torch.Tensor) -> float:
        return (1 - ((predicted - true) ** 2).sum(0) / ((true - true.mean(0)) ** 2).sum(0).clamp(min=1e-8)).mean().item()

    predicted = decoded(u)
    return {
        "r2": r2(predicted),
        "mse": ((predicted - true) ** 2).mean().item(),
        "r2_u_zero": r2(decoded(torch.zeros_like(u))),
        "r2_u_shuffled": r2(decoded(shuffled)),
    }


@torch.no_grad()
def open_loop_prediction(wm: WorldModel, obs, actions, context: int, horizon: int):
    """Filters the first `context` steps of each window, then predicts `horizon` steps open loop (prior z,
    latent actions inferred from the true actions). Returns the decoded (normalised) observations and the
    true ones, both (B, horizon, D)."""
    s = wm.observe(wm.encoder(obs[:, : context + 1]), actions[:, :context])
    h, z = s["feat"][:, -1, : wm.deter_dim], s["feat"][:, -1, wm.deter_dim :]
    predictions = []
    for t in range(context, context + horizon):
        u = wm.u_posterior(torch.cat([h, z, actions[:, t]], -1))[0]
        h = wm.step(h, z, u)
        z = wm.z_prior(h)[0]
        predictions.append(wm.obs_decoder(torch.cat([h, z], -1)))
    return torch.stack(predictions, 1), obs[:, context + 1 : context + 1 + horizon]  # (B, H, D) each


def open_loop_figure(predicted: np.ndarray, true: np.ndarray, dims: int = 4):
    """Predicted against true trajectories of the first `dims` observation dimensions of one window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = min(dims, true.shape[1])
    fig, axes = plt.subplots(1, dims, figsize=(3 * dims, 2.5), squeeze=False)
    axes = axes[0]
    for d, ax in enumerate(axes):
        ax.plot(true[:, d], label="true")
        ax.plot(predicted[:, d], "--", label="open-loop prediction")
        ax.set_title(f"observation dim {d} (normalised)", fontsize=8)
        ax.set_xlabel("steps ahead")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# what a reused world model (--model-checkpoint) must share with the run that loads it: the data and labels it was
# trained on (or a 5% run could load a model that saw the actions of every trajectory), and its sizes
WORLD_MODEL_FLAGS = ("env", "dataset", "labeled_fraction", "split_seed", "deter_dim", "stoch_dim", "hidden_dim",
                     "mlp_layers", "latent_action_dim", "min_std", "min_std_u")  # fmt: skip


if __name__ == "__main__":
    args = tyro.cli(Args)
    commit = git_commit()  # recorded at the start: the code that runs, whatever changes later
    for name in (
        "model_steps",
        "agent_steps",
        "batch_size",
        "seq_len",
        "horizon",
        "eval_every",
        "eval_episodes",
        "num_values",
        "deter_dim",
        "stoch_dim",
        "hidden_dim",
        "mlp_layers",
        "latent_action_dim",
        "log_every",
        "target_update_every",
        "final_eval_episodes",
    ):
        if getattr(args, name) < 1 and not (name in ("model_steps", "agent_steps") and args.model_checkpoint):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.kl_balance_u is not None and not 0 <= args.kl_balance_u <= 1:
        raise SystemExit(f"error: --kl-balance-u must be in [0, 1], got {args.kl_balance_u}")
    if args.free_nats_u is not None and args.free_nats_u < 0:
        raise SystemExit(f"error: --free-nats-u must be at least 0, got {args.free_nats_u}")
    if args.min_std_u is not None and args.min_std_u <= 0:
        raise SystemExit(f"error: --min-std-u must be above 0, got {args.min_std_u}")
    if args.action_loss_coef < 0:
        raise SystemExit(f"error: --action-loss-coef must be at least 0, got {args.action_loss_coef}")
    if args.seq_len < 2:
        raise SystemExit(
            f"error: --seq-len must be at least 2 (the open-loop check predicts seq_len // 2 steps), got {args.seq_len}"
        )
    if not 0 < args.labeled_ratio <= 1:
        raise SystemExit(f"error: --labeled-ratio must be in (0, 1], got {args.labeled_ratio}")
    if args.recovery_episodes < 0:
        raise SystemExit(f"error: --recovery-episodes must be at least 0, got {args.recovery_episodes}")
    if args.batch_size < 2:
        raise SystemExit(f"error: --batch-size must be at least 2 (windows with actions and without), got {args.batch_size}")
    # every input is checked before any work: the dataset, the split, rendering, the reused model, the run folder
    dataset = load_dataset(args)
    # LAWM sees every trajectory: the labeled ones (those of every baseline) with their actions, the others without
    episodes_ac = dataset["labeled_episodes"]
    episodes_af = np.setdiff1d(np.arange(len(dataset["episode_starts"])), episodes_ac)  # trained on without actions
    check_split(dataset, args, episodes_ac, episodes_af, args.seq_len, min_with_actions=1)
    starts_ac = window_starts(dataset["episode_starts"], dataset["episode_ends"], episodes_ac, args.seq_len)
    starts_af = window_starts(dataset["episode_starts"], dataset["episode_ends"], episodes_af, args.seq_len)
    # the recovery set: action-free trajectories whose true actions, read from the file for the diagnostic alone,
    # score the actions the IDM recovers on data the model learns from without actions
    lengths = dataset["episode_ends"] - dataset["episode_starts"]
    recovery_episodes = recovery_set(
        episodes_af[lengths[episodes_af] >= args.seq_len], args.recovery_episodes, args.split_seed
    )
    recovery_actions = read_recovery_actions(dataset, recovery_episodes)  # (N, A), NaN outside the recovery set
    check_video(args)
    settings = run_settings(args, dataset, commit)
    if args.model_checkpoint and not args.resume:
        world_model = load_checkpoint(Path(args.model_checkpoint))
        check_settings(Path(args.model_checkpoint), world_model, args, dataset, WORLD_MODEL_FLAGS)
        settings["world_model_from"] = world_model["settings"]  # the settings the reused world model was trained with
        if args.agent_steps == 0 and not world_model.get("agent_step"):
            raise SystemExit(
                f"error: {args.model_checkpoint} holds no trained actor: --agent-steps 0 evaluates the actor of a run "
                f"that trained one"
            )
    run_dir = make_run_dir(args)
    if args.resume:
        state, settings = resume_settings(run_dir, args, dataset, commit)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    free_nats = default_free_nats(args.dataset) if args.free_nats is None else args.free_nats

    n_ac = windows_with_actions(args.batch_size, args.labeled_ratio, has_action_free=len(starts_af) > 0)
    print(
        f"{run_dir.name}: {len(episodes_ac)} trajectories with actions ({len(starts_ac)} windows of {args.seq_len} "
        f"steps), {len(episodes_af)} without ({len(starts_af)} windows), {len(recovery_episodes)} of them scored by "
        f"the action-recovery diagnostic; {n_ac} of {args.batch_size} windows per batch have actions"
    )
    if len(episodes_af) == 0:  # --labeled-fraction 1.0
        print(
            "no action-free trajectories: every window has actions, so the ELBO is C-LAP's with the N(0, I) latent action "
            "prior, the IDM learns from the alignment term alone, and the action-recovery diagnostic is off"
        )
    mean, std = compute_mean_std(dataset["observations"])
    to_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)  # noqa: E731
    normalized = lambda m, s: (to_tensor((dataset[k] - m) / s) for k in ("observations", "next_observations"))  # noqa: E731
    obs_t, next_obs_t = normalized(mean, std)
    actions_t, rewards_t = to_tensor(dataset["actions"]), to_tensor(dataset["rewards"])

    def batch(batch_size: int, n_ac: int):
        """A batch of windows, the n_ac with actions first: observations (B, L+1, D), actions (n_ac, L, A) of
        those n_ac only (an action-free window's actions are never indexed), rewards (B, L)."""
        idx_ac = sample_windows(starts_ac, n_ac, args.seq_len, device)  # (n_ac, L)
        idx_af = sample_windows(starts_af, batch_size - n_ac, args.seq_len, device) if batch_size > n_ac else idx_ac[:0]
        idx = torch.cat([idx_ac, idx_af])  # (B, L)
        obs = torch.cat([obs_t[idx], next_obs_t[idx[:, -1:]]], 1)  # (B, L, D) + (B, 1, D) -> (B, L+1, D)
        return obs, actions_t[idx_ac], rewards_t[idx]

    recovery_idx = torch.as_tensor(
        consecutive_windows(dataset["episode_starts"], dataset["episode_ends"], recovery_episodes, args.seq_len), device=device
    )
    recovery_true_actions = to_tensor(recovery_actions)[recovery_idx]  # (R, L, A), once: the file's actions never change

    obs_dim, act_dim = obs_t.shape[1], actions_t.shape[1]
    feat_dim = args.deter_dim + args.stoch_dim
    wm = WorldModel(obs_dim, act_dim, args).to(device)
    actor = LatentActor(feat_dim, args.latent_action_dim, args.hidden_dim, args.mlp_layers).to(device)
    values = ValueEnsemble(args.num_values, feat_dim, args.hidden_dim).to(device)
    values_target = ValueEnsemble(args.num_values, feat_dim, args.hidden_dim).to(device)
    values_target.load_state_dict(values.state_dict())
    values_target.requires_grad_(False)
    model_optimizer = torch.optim.Adam(wm.parameters(), lr=args.model_learning_rate)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_learning_rate)
    value_optimizer = torch.optim.Adam(values.parameters(), lr=args.value_learning_rate)
    nets = {"world_model": wm, "actor": actor, "values": values, "values_target": values_target}
    nets.update(model_optimizer=model_optimizer, actor_optimizer=actor_optimizer, value_optimizer=value_optimizer)

    model_step, agent_step, evals, exploitation = 0, 0, [], {}  # exploitation: reward_gap at the last evaluation
    if args.model_checkpoint and not args.resume:  # (a resumed run has its world model in its own checkpoint)
        wm.load_state_dict(world_model["world_model"])
        mean, std = world_model["obs_mean"].numpy(), world_model["obs_std"].numpy()
        obs_t, next_obs_t = normalized(mean, std)
        model_step = args.model_steps
        print(f"loaded the world model of {args.model_checkpoint}")
        if args.agent_steps == 0:  # evaluation only: the saved actor, on the saved world model
            actor.load_state_dict(world_model["actor"])
            print(f"loaded the actor of {args.model_checkpoint} (agent step {world_model['agent_step']}): evaluation only")
    if args.resume:
        for k, net in nets.items():
            net.load_state_dict(state[k])
        model_step, agent_step, evals = state["model_step"], state["agent_step"], [tuple(e) for e in state["evals"]]
        exploitation = state["exploitation"]
        torch.set_rng_state(state["torch_rng"])
        mean, std = state["obs_mean"].numpy(), state["obs_std"].numpy()
        obs_t, next_obs_t = normalized(mean, std)
        print(f"resumed {run_dir} at model step {model_step}, agent step {agent_step}")

    def save_checkpoint():
        state = {k: net.state_dict() for k, net in nets.items()}
        state.update(model_step=model_step, agent_step=agent_step, evals=evals, torch_rng=torch.get_rng_state())
        state.update(exploitation=exploitation)
        state.update(obs_mean=torch.as_tensor(mean), obs_std=torch.as_tensor(std), settings=settings)
        save_safely(state, run_dir / "checkpoint.pt")

    @torch.no_grad()
    def constraint_share():
        """Share of the data's latent actions (the means of the posteriors q(u | .) of a batch of windows, as in
        training) inside the box the actor acts in (share_inside_constraint)."""
        obs, actions, _ = batch(args.batch_size, n_ac)
        s = wm.observe(wm.encoder(obs), actions)
        return share_inside_constraint(s["uq_mean"], s["up_mean"], s["up_std"], args.epsilon)

    def recovered_actions() -> dict:
        """action_recovery on the recovery set, keyed as in summary.json and tensorboard (idm_action_r2, ...)."""
        obs = torch.cat([obs_t[recovery_idx], next_obs_t[recovery_idx[:, -1:]]], 1)  # (R, L+1, D)
        scores = action_recovery(wm, obs, recovery_true_actions)
        return {f"idm_action_{k}": v for k, v in scores.items()}

    # 1. the world model
    start_time, start_step = time.time(), model_step
    while model_step < args.model_steps:
        obs, actions, rewards = batch(args.batch_size, n_ac)
        loss, metrics, _ = unified_elbo_loss(wm, obs, actions, rewards, args, free_nats)
        model_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(wm.parameters(), args.grad_clip)
        model_optimizer.step()
        model_step += 1
        if model_step % args.log_every == 0 or model_step == args.model_steps:
            sps = (model_step - start_step) / (time.time() - start_time)
            for k, v in metrics.items():
                writer.add_scalar(f"world_model/{k}", v.item(), model_step)
            writer.add_scalar("world_model/loss", loss.item(), model_step)
            writer.add_scalar("world_model/grad_norm", grad_norm.item(), model_step)
            writer.add_scalar("charts/model_SPS", sps, model_step)
            predicted, true = open_loop_prediction(
                wm, *batch(args.batch_size, args.batch_size)[:2], args.seq_len // 2, min(args.horizon, args.seq_len // 2)
            )
            errors = ((predicted - true) ** 2).mean(dim=(0, 2))  # (B, H, D) -> (H,): error by steps ahead
            writer.add_scalar("world_model/open_loop_error_final", errors[-1].item(), model_step)
            writer.add_scalar("world_model/open_loop_error_mean", errors.mean().item(), model_step)
            eta = (args.model_steps - model_step) / sps
            print(
                f"model step {model_step}/{args.model_steps} | loss {loss.item():8.2f} "
                f"| obs {metrics['obs_loss'].item():7.2f} | kl_z {metrics['kl_z'].item():5.2f} "
                f"| kl_u {metrics['kl_u'].item():5.2f} "
                f"| open-loop error {errors[-1].item():6.3f} | {sps:4.1f} steps/s | ETA {eta / 60:5.1f} min",
                flush=True,
            )
        if model_step % args.eval_every == 0 or model_step == args.model_steps:
            predicted, true = open_loop_prediction(wm, *batch(1, 1)[:2], args.seq_len // 2, args.seq_len // 2)
            figure = open_loop_figure(predicted[0].cpu().numpy(), true[0].cpu().numpy())
            writer.add_figure("world_model/open_loop", figure, model_step)
            u_inside, u_inside_per_dim = constraint_share()
            writer.add_scalar("world_model/u_inside_constraint", u_inside, model_step)
            writer.add_scalar("world_model/u_inside_constraint_per_dim", u_inside_per_dim, model_step)
            if len(recovery_idx) > 0:
                recovery = recovered_actions()
                for k, v in recovery.items():
                    writer.add_scalar(f"world_model/{k}", v, model_step)
                print(
                    f"model step {model_step}: actions recovered by the IDM: R2 {recovery['idm_action_r2']:.3f} (controls: "
                    f"u = 0 {recovery['idm_action_r2_u_zero']:.3f}, u shuffled {recovery['idm_action_r2_u_shuffled']:.3f}), "
                    f"MSE {recovery['idm_action_mse']:.4f}",
                    flush=True,
                )
            save_checkpoint()
    wm.requires_grad_(False)  # frozen: the actor's gradient flows through it, its weights stay

    def make_policy(model_rewards: Optional[list] = None):
        """A fresh policy for one episode (policy_step: posterior filtering, --eval-filter; the action sent is the mean
        of p(a | s, u)); it appends to `model_rewards` the list of the rewards the model predicts along the episode."""
        memory, predicted = {"h": torch.zeros(1, args.deter_dim, device=device), "z": None, "u": None}, []
        if model_rewards is not None:
            model_rewards.append(predicted)

        def act(o: np.ndarray) -> np.ndarray:
            action, reward = policy_step(wm, actor, memory, to_tensor((o - mean) / std)[None], args.epsilon, args.eval_filter)
            if reward is not None:
                predicted.append(reward.item())
            return action[0].cpu().numpy()

        return act

    # 2. the actor-critic in imagination, on the frozen model
    start_time, start_step, imagined_since_eval = time.time(), agent_step, []
    while agent_step < args.agent_steps:
        obs, actions, rewards = batch(args.batch_size, n_ac)
        with torch.no_grad():
            feat = wm.observe(wm.encoder(obs), actions)["feat"].reshape(-1, feat_dim)  # (B, L+1, F) -> (N, F)
        feats, log_probs = imagine(wm, actor, feat[:, : args.deter_dim], feat[:, args.deter_dim :], args.horizon, args.epsilon)
        imagined_rewards = wm.reward_decoder(feats[1:]).squeeze(-1)  # (H, N): r_t read off s_{t+1}
        imagined_since_eval.append(imagined_rewards.detach().mean())
        returns = lambda_return(imagined_rewards, values_target(feats).mean(0), args.gamma, args.return_lambda)
        actor_loss = -returns.mean() + args.entropy_coef * log_probs.mean()
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        nn.utils.clip_grad_norm_(actor.parameters(), args.grad_clip)
        actor_optimizer.step()

        value_loss = ((values(feats[:-1].detach()) - returns.detach()) ** 2).mean(dim=(1, 2)).sum()
        value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        nn.utils.clip_grad_norm_(values.parameters(), args.grad_clip)
        value_optimizer.step()
        agent_step += 1
        if agent_step % args.target_update_every == 0:
            values_target.load_state_dict(values.state_dict())

        if agent_step % args.log_every == 0:
            writer.add_scalar("losses/actor_loss", actor_loss.item(), agent_step)
            writer.add_scalar("losses/value_loss", value_loss.item(), agent_step)
            writer.add_scalar("losses/entropy", -log_probs.mean().item(), agent_step)
            writer.add_scalar("losses/imagined_return", returns.mean().item(), agent_step)
            writer.add_scalar("losses/epsilon", args.epsilon, agent_step)
            writer.add_scalar("charts/agent_SPS", (agent_step - start_step) / (time.time() - start_time), agent_step)
        if agent_step % args.eval_every == 0 or agent_step == args.agent_steps:
            model_rewards = []
            returns_eval, rewards_eval, video = evaluate(
                args, partial(make_policy, model_rewards), dataset["attrs"], seed=args.seed + agent_step
            )
            if video is not None:
                write_video(writer, run_dir, video, agent_step)
            evals.append((agent_step, float(returns_eval.mean())))
            writer.add_scalar("eval/episodic_return", returns_eval.mean(), agent_step)
            writer.add_scalar("eval/normalized_score", returns_eval.mean() / 10, agent_step)
            exploitation = reward_gap(torch.stack(imagined_since_eval).mean().item(), rewards_eval, model_rewards)
            imagined_since_eval = []
            for k, v in exploitation.items():
                if v is not None:
                    writer.add_scalar(f"eval/{k}", v, agent_step)
            sps = (agent_step - start_step) / (time.time() - start_time)
            eta = (args.agent_steps - agent_step) / sps
            print(
                f"agent step {agent_step}/{args.agent_steps} | return {returns_eval.mean():7.1f} ± {returns_eval.std():5.1f} "
                f"| imagined return {returns.mean().item():7.2f} | reward per step: imagined "
                f"{exploitation['imagined_reward']:.3f}, real {exploitation['real_reward']:.3f} | {sps:4.1f} steps/s "
                f"| ETA {eta / 60:5.1f} min",
                flush=True,
            )
            save_checkpoint()

    if not (run_dir / "checkpoint.pt").exists():  # evaluation only (--agent-steps 0): the loaded networks
        save_checkpoint()
    u_inside, u_inside_per_dim = constraint_share()
    diagnostics = {"u_inside_constraint": u_inside, "u_inside_constraint_per_dim": u_inside_per_dim, **exploitation}
    keys = ("idm_action_r2", "idm_action_mse", "idm_action_r2_u_zero", "idm_action_r2_u_shuffled")
    diagnostics.update(recovered_actions() if len(recovery_idx) > 0 else dict.fromkeys(keys))  # null: no recovery set
    diagnostics.update(recovery_episodes=recovery_episodes.tolist())
    final = final_evaluation(args, make_policy, dataset["attrs"], writer, agent_step)
    write_summary(run_dir, args, settings, evals, final, dataset["labeled_episodes"], free_nats=free_nats, **diagnostics)
    if args.save_model:
        save_safely(load_checkpoint(run_dir / "checkpoint.pt"), run_dir / "model.pt")
    writer.close()
    best = f" (best periodic evaluation {max(r for _, r in evals) / 10:.1f})" if evals else ""
    print(f"final normalized score {final['final_return'] / 10:.1f}{best}; see {run_dir}")
