# Makes the offline datasets of "Latent Action World Models for Control with Unlabeled Trajectories"
# (Appendix E) on the DeepMind Control Suite: a SAC agent learns the task online from proprioceptive
# states; its policy snapshots and its replay become the expert, medium, medium-replay and random sets.
# Format and protocol: docs/datasets.md.
import os

os.environ.setdefault("MUJOCO_GL", "disable")  # states only: no OpenGL context is ever needed

import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

KINDS = ("expert", "medium", "medium-replay", "random")
FORMAT_VERSION = 1


@dataclass
class Args:
    env: str = "cheetah-run"
    """dm_control suite task as `domain-task`, e.g. cheetah-run, walker-walk, hopper-stand"""
    kinds: tuple[Literal["expert", "medium", "medium-replay", "random"], ...] = KINDS
    """which datasets to write; each becomes `{datasets_dir}/{env}/{kind}.hdf5`"""
    num_seeds: int = 5
    """number of SAC agents (seeds `seed`, `seed+1`, ...); each adds `trajectories_per_seed` to every dataset"""
    train_episodes: int = 600
    """episodes of online SAC training per seed; the final policy is the expert"""
    trajectories_per_seed: int = 400
    """trajectories that each seed contributes to each dataset (the paper: 400)"""
    datasets_dir: str = "datasets"
    """folder the datasets are written to"""
    runs_dir: str = "runs"
    """folder of the tensorboard logs of the SAC agents"""
    seed: int = 1
    """seed of the first agent"""
    resume: bool = False
    """continue an interrupted collection from its last checkpoint (in `{datasets_dir}/{env}/.work`)"""
    overwrite: bool = False
    """replace datasets that already exist"""
    cuda: bool = True
    """use the GPU for SAC when there is one"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (CPU runs are deterministic anyway)"""

    # Environment
    action_repeat: int = 2
    """physics steps per agent step (rewards are summed over the repeats)"""
    episode_length: int = 500
    """agent steps per episode"""

    # SAC (Haarnoja et al. 2018) arguments
    warmup_episodes: int = 10
    """episodes of uniform random actions before the first update"""
    update_every: int = 2
    """environment steps per gradient update (2: an update-to-data ratio of 0.5); updates run after each episode"""
    batch_size: int = 256
    """transitions per gradient update"""
    hidden_dim: int = 256
    """width of the two hidden layers of the actor and the critics"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor, the critics and the temperature"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    init_alpha: float = 0.1
    """initial entropy temperature (tuned automatically towards entropy -act_dim)"""
    eval_every: int = 10
    """training episodes between deterministic evaluations (each one keeps a policy snapshot)"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    checkpoint_every: int = 25
    """training episodes between checkpoints"""


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


class TanhGaussianActor(nn.Module):
    """Tanh-squashed Gaussian policy."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * act_dim)
        )

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, -1)
        # a smooth squash into [LOG_STD_MIN, LOG_STD_MAX] keeps gradients alive at the bounds
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(self, obs: torch.Tensor):
        """Returns a reparameterised action in (-1, 1) and its log-probability under the squashed Gaussian."""
        mean, log_std = self(obs)
        x = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # change of variables for tanh: log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)), stable for large |x|
        log_prob = log_prob - (2 * (math.log(2) - x - F.softplus(-2 * x))).sum(-1)
        return torch.tanh(x), log_prob


def sac_critic_loss(actor, critic, critic_target, log_alpha, batch, gamma: float) -> torch.Tensor:
    """Soft Bellman error of both critics against the clipped double-Q target."""
    obs, act, rew, next_obs, terminal = batch
    with torch.no_grad():
        next_act, next_log_prob = actor.sample(next_obs)
        next_v = critic_target(next_obs, next_act).min(0).values - log_alpha.exp() * next_log_prob
        target = rew + gamma * (1 - terminal) * next_v
    return ((critic(obs, act) - target) ** 2).mean(1).sum()


def sac_actor_loss(actor, critic, log_alpha, obs):
    """E[alpha log pi(a|s) - min Q(s, a)], a ~ pi; also returns log pi for the temperature loss."""
    act, log_prob = actor.sample(obs)
    loss = (log_alpha.exp().detach() * log_prob - critic(obs, act).min(0).values).mean()
    return loss, log_prob.detach()


def sac_alpha_loss(log_alpha, log_prob, target_entropy: float) -> torch.Tensor:
    """Raises the temperature when the policy's entropy -E[log pi] is below the target, lowers it above."""
    return -(log_alpha.exp() * (log_prob + target_entropy)).mean()


class SAC:
    """The agent's networks and optimizers, kept together so that a checkpoint is one state dict."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic = TwinCritic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic_target = TwinCritic(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(args.init_alpha), device=device, requires_grad=True)
        fused = device.type in ("cpu", "cuda")  # one kernel per optimizer step instead of one per tensor
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), args.learning_rate, fused=fused)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), args.learning_rate, fused=fused)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], args.learning_rate)
        self.target_entropy = -float(act_dim)

    def update(self, batch, args: Args) -> dict:
        loss_q = sac_critic_loss(self.actor, self.critic, self.critic_target, self.log_alpha, batch, args.gamma)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optimizer.step()

        self.critic.requires_grad_(False)  # the actor's gradient flows through Q(s, a) into a only
        loss_pi, log_prob = sac_actor_loss(self.actor, self.critic, self.log_alpha, batch[0])
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss_pi.backward()
        self.actor_optimizer.step()
        self.critic.requires_grad_(True)

        loss_alpha = sac_alpha_loss(self.log_alpha, log_prob, self.target_entropy)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        loss_alpha.backward()
        self.alpha_optimizer.step()

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)
        return {"qf_loss": loss_q, "actor_loss": loss_pi, "alpha": self.log_alpha.exp(), "entropy": -log_prob.mean()}

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict):
        for name in ("actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer", "alpha_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])


def policy_fn(actor: TanhGaussianActor, device: torch.device, deterministic: bool):
    """Wraps the actor as `obs (np) -> action (np)`: the tanh of the mean, or a sample."""

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(obs, device=device).unsqueeze(0)
        a = torch.tanh(actor(o)[0]) if deterministic else actor.sample(o)[0]
        return a[0].cpu().numpy()

    return act


def random_policy(rng: np.random.Generator, act_dim: int):
    return lambda obs: rng.uniform(-1, 1, act_dim).astype(np.float32)


def save_atomic(obj, path: Path):
    """torch.save to a temporary file, then rename: an interruption leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(env) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "env": env.task.random.get_state(),
    }


def set_rng_state(state: dict, env):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    env.task.random.set_state(state["env"])


def train_agent(args: Args, seed: int, work: Path, device: torch.device):
    """Trains one SAC agent online, resuming from `work/checkpoint.pt` when it exists.
    Returns the episodes it collected (a list of (obs, actions, rewards, terminal)) and its snapshots
    (a list of dicts with `episode`, `eval_return` and the actor's `state_dict`)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    env, eval_env = make_env(args.env, seed), make_env(args.env, seed + 10_000)
    obs_dim = flat_obs(env.reset().observation).shape[0]
    act_dim = env.action_spec().shape[0]
    agent = SAC(obs_dim, act_dim, args, device)
    episodes, snapshots, start = [], [], 0
    checkpoint = work / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)  # our own file: RNG states are numpy
        if state["config"] != sac_config(args):
            raise SystemExit(
                f"error: {checkpoint} was made with other settings {state['config']}; delete {work} to start over"
            )
        if state["episode"] > args.train_episodes:
            raise SystemExit(
                f"error: {checkpoint} is at episode {state['episode']}, past --train-episodes {args.train_episodes}"
            )
        agent.load_state_dict(state["agent"])
        episodes, snapshots, start = state["episodes"], state["snapshots"], state["episode"]
        set_rng_state(state["rng"], env)
        eval_env.task.random.set_state(state["eval_env_rng"])
        print(f"seed {seed}: resumed from {checkpoint} at episode {start}")

    writer = SummaryWriter(str(Path(args.runs_dir) / f"collect_data__{args.env}__{seed}"), purge_step=start)
    actor_policy = policy_fn(agent.actor, device, deterministic=False)
    rng = np.random.default_rng(seed)  # the warm-up's random actions
    if checkpoint.exists():
        rng.bit_generator.state = state["warmup_rng"]
    updates_per_episode = args.episode_length // args.update_every
    t0, episode0 = time.time(), start
    for episode in range(start, args.train_episodes):
        warmup = episode < args.warmup_episodes
        policy = random_policy(rng, act_dim) if warmup else actor_policy
        obs, actions, rewards, terminal = rollout(env, policy, args.episode_length, args.action_repeat)
        episodes.append((obs, actions, rewards, terminal))
        writer.add_scalar("charts/episodic_return", rewards.sum(), episode)

        if not warmup:
            # the replay as flat tensors, rebuilt per episode: sampling is then one randint and four gathers
            replay = [torch.as_tensor(np.concatenate(x), device=device) for x in zip(*transitions(episodes), strict=True)]
            for _ in range(updates_per_episode):
                idx = torch.randint(0, replay[0].shape[0], (args.batch_size,), device=device)
                metrics = agent.update([x[idx] for x in replay], args)
            for k, v in metrics.items():
                writer.add_scalar(f"losses/{k}", v.item(), episode)

        done = episode + 1
        if done % args.eval_every == 0 or done == args.train_episodes:
            eval_policy = policy_fn(agent.actor, device, deterministic=True)
            episodes_eval = [
                rollout(eval_env, eval_policy, args.episode_length, args.action_repeat) for _ in range(args.eval_episodes)
            ]
            eval_return = float(np.mean([e[2].sum() for e in episodes_eval]))
            actor_state = {k: v.detach().cpu().clone() for k, v in agent.actor.state_dict().items()}
            snapshots.append({"episode": done, "eval_return": eval_return, "actor": actor_state})
            sps = (done - episode0) * args.episode_length / (time.time() - t0)  # since the last evaluation
            eta = (args.train_episodes - done) * args.episode_length / sps
            t0, episode0 = time.time(), done
            writer.add_scalar("eval/episodic_return", eval_return, done)
            writer.add_scalar("charts/SPS", sps, done)
            print(
                f"seed {seed} | episode {done}/{args.train_episodes} | train return {rewards.sum():7.1f} "
                f"| eval return {eval_return:7.1f} | {sps:5.0f} env steps/s | ETA {eta / 60:5.1f} min",
                flush=True,
            )
        if done % args.checkpoint_every == 0 or done == args.train_episodes:
            state = {"config": sac_config(args), "agent": agent.state_dict(), "episodes": episodes, "snapshots": snapshots}
            state.update(episode=done, rng=rng_state(env), eval_env_rng=eval_env.task.random.get_state())
            state["warmup_rng"] = rng.bit_generator.state
            save_atomic(state, checkpoint)
    writer.close()
    return episodes, snapshots, obs_dim, act_dim


def sac_config(args: Args) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keep = ("env", "action_repeat", "episode_length", "warmup_episodes", "update_every")
    keep += ("batch_size", "hidden_dim", "learning_rate", "gamma", "tau", "init_alpha", "eval_every", "eval_episodes")
    return {k: getattr(args, k) for k in keep}


def transitions(episodes):
    """Episodes (obs (T+1, D), actions, rewards, terminal) -> flat per-transition arrays in D4RL convention."""
    for obs, actions, rewards, terminal in episodes:
        T = len(actions)
        terminals = np.zeros(T, dtype=np.float32)
        terminals[-1] = float(terminal)
        yield obs[:-1], actions, rewards, obs[1:], terminals


def collect_seed(args: Args, seed: int, work: Path, device: torch.device):
    """Trains the agent of one seed and writes its share of every requested dataset to `work/{kind}.npz`."""
    episodes, snapshots, obs_dim, act_dim = train_agent(args, seed, work, device)
    expert = snapshots[-1]
    # medium: the snapshot whose evaluation return is closest to half the expert's
    medium = min(snapshots, key=lambda s: abs(s["eval_return"] - expert["eval_return"] / 2))
    print(
        f"seed {seed}: expert snapshot at episode {expert['episode']} (eval {expert['eval_return']:.1f}), "
        f"medium at episode {medium['episode']} (eval {medium['eval_return']:.1f})"
    )
    env = make_env(args.env, seed + 20_000)
    rng = np.random.default_rng(seed + 20_000)
    torch.manual_seed(seed + 20_000)
    actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim).to(device)
    n = args.trajectories_per_seed
    for kind in args.kinds:
        out = work / f"{kind}.npz"
        if part_is_current(out, args):
            continue
        info = {"episode": -1, "eval_return": float("nan")}
        if kind == "medium-replay":
            # the training episodes up to the medium snapshot, evenly thinned to n when there are more
            replay = episodes[: medium["episode"]]
            if len(replay) < n:
                print(
                    f"warning: seed {seed} has only {len(replay)} training episodes up to the medium snapshot; "
                    f"medium-replay gets {len(replay)} of its {n} trajectories from it (train longer for more)"
                )
            picked = np.unique(np.linspace(0, len(replay) - 1, min(n, len(replay))).round().astype(int))
            chosen = [replay[i] for i in picked]
            info = {"episode": medium["episode"], "eval_return": medium["eval_return"]}
        else:
            if kind == "random":
                policy = random_policy(rng, act_dim)
            else:
                snapshot = expert if kind == "expert" else medium
                actor.load_state_dict(snapshot["actor"])
                policy = policy_fn(actor, device, deterministic=False)  # the behaviour policy samples, as in training
                info = {"episode": snapshot["episode"], "eval_return": snapshot["eval_return"]}
            chosen = [rollout(env, policy, args.episode_length, args.action_repeat) for _ in range(n)]
        arrays = [np.concatenate(x) for x in zip(*transitions(chosen), strict=True)]
        lengths = np.array([len(e[1]) for e in chosen])
        timeouts = np.zeros(lengths.sum(), dtype=bool)
        timeouts[np.cumsum(lengths) - 1] = True
        tmp = work / f"{kind}.tmp.npz"
        np.savez(
            tmp,
            observations=arrays[0],
            actions=arrays[1],
            rewards=arrays[2],
            next_observations=arrays[3],
            terminals=arrays[4].astype(bool),
            timeouts=timeouts & ~arrays[4].astype(bool),
            lengths=lengths,
            snapshot_episode=info["episode"],
            snapshot_eval_return=info["eval_return"],
            train_episodes=args.train_episodes,
            trajectories_per_seed=n,
        )
        os.replace(tmp, out)
        print(f"seed {seed}: wrote {len(chosen)} {kind} trajectories")


def part_is_current(path: Path, args: Args) -> bool:
    """A seed's share of a dataset is reused only if it was made from the same training length and size."""
    if not path.exists():
        return False
    with np.load(path) as part:
        return (
            int(part["train_episodes"]) == args.train_episodes
            and int(part["trajectories_per_seed"]) == args.trajectories_per_seed
        )


def return_stats(rewards: np.ndarray, ends: np.ndarray) -> dict:
    """Per-episode return statistics (the paper's Table 4) from flat rewards and episode-end flags."""
    returns = np.add.reduceat(rewards.astype(np.float64), np.r_[0, np.flatnonzero(ends)[:-1] + 1])
    q = np.percentile(returns, [25, 50, 75])
    return {
        "num_episodes": len(returns), "return_mean": returns.mean(), "return_std": returns.std(),
        "return_min": returns.min(), "return_p25": q[0], "return_median": q[1], "return_p75": q[2],
        "return_max": returns.max(),
    }  # fmt: skip


def write_dataset(args: Args, kind: str, parts: list[Path], seeds: list[int], path: Path, commit: str) -> dict:
    """Concatenates the per-seed parts into one HDF5 file, written to a temporary name and renamed."""
    data = [dict(np.load(p)) for p in parts]
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    tmp = path.with_name(path.name + ".tmp")
    stats = return_stats(
        np.concatenate([d["rewards"] for d in data]), np.concatenate([d["terminals"] | d["timeouts"] for d in data])
    )
    with h5py.File(tmp, "w") as f:
        for k in keys:
            f.create_dataset(k, data=np.concatenate([d[k] for d in data]))
        f.attrs.update(
            env=args.env,
            dataset=kind,
            action_repeat=args.action_repeat,
            episode_length=args.episode_length,
            obs_type="proprio",
            format_version=FORMAT_VERSION,
            collector="collect_data.py (SAC on states)",
            collector_seeds=np.array(seeds),
            git_commit=commit,
            snapshot_episodes=np.array([int(d["snapshot_episode"]) for d in data]),
            snapshot_eval_returns=np.array([float(d["snapshot_eval_return"]) for d in data]),
            **stats,
        )
    os.replace(tmp, path)
    return stats


def git_commit() -> str:
    """The commit of this file's checkout, with `-dirty` when tracked files have uncommitted changes."""
    try:
        cmd = ["git", "describe", "--always", "--dirty", "--abbrev=40"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def check_args(args: Args):
    """One-line errors for a user's mistakes, before any work starts."""
    positive = ("num_seeds", "train_episodes", "trajectories_per_seed", "action_repeat", "episode_length")
    positive += ("update_every", "batch_size", "hidden_dim", "eval_every", "eval_episodes", "checkpoint_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_episodes < 0 or args.warmup_episodes >= args.train_episodes:
        raise SystemExit(f"error: --warmup-episodes must be in [0, --train-episodes), got {args.warmup_episodes}")
    if args.episode_length % args.update_every:
        raise SystemExit("error: --episode-length must be a multiple of --update-every")
    if not args.kinds:
        raise SystemExit(f"error: --kinds needs at least one of {', '.join(KINDS)}")
    make_env(args.env, 0)  # exits with the list of valid names
    out = Path(args.datasets_dir) / args.env
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to {out}: {e.strerror}") from None
    existing = [str(out / f"{k}.hdf5") for k in args.kinds if (out / f"{k}.hdf5").exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"error: {', '.join(existing)} exists; pass --overwrite to replace it")


if __name__ == "__main__":
    args = tyro.cli(Args)
    commit = git_commit()  # recorded at the start: the code that runs, whatever changes later
    check_args(args)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    out = Path(args.datasets_dir) / args.env
    work_root = out / ".work"
    if work_root.exists() and not args.resume:
        raise SystemExit(
            f"error: {work_root} holds the checkpoints of an earlier collection; pass --resume to continue or extend it "
            "(a larger --train-episodes trains on), or delete it to start over"
        )
    start = time.time()
    seeds = [args.seed + k for k in range(args.num_seeds)]
    for seed in seeds:
        work = work_root / f"seed_{seed}"
        work.mkdir(parents=True, exist_ok=True)
        if not all(part_is_current(work / f"{kind}.npz", args) for kind in args.kinds):
            collect_seed(args, seed, work, device)
        print(f"seed {seed} done after {(time.time() - start) / 60:.1f} min", flush=True)

    print(
        f"\n{args.env}: {'dataset':<14} {'episodes':>8} {'mean':>7} {'std':>6} {'min':>7} {'p25':>7} "
        f"{'median':>7} {'p75':>7} {'max':>7}"
    )
    for kind in args.kinds:
        path = out / f"{kind}.hdf5"
        s = write_dataset(args, kind, [work_root / f"seed_{seed}" / f"{kind}.npz" for seed in seeds], seeds, path, commit)
        print(
            f"{' ' * len(args.env)}  {kind:<14} {s['num_episodes']:>8} {s['return_mean']:7.1f} {s['return_std']:6.1f} "
            f"{s['return_min']:7.1f} {s['return_p25']:7.1f} {s['return_median']:7.1f} {s['return_p75']:7.1f} "
            f"{s['return_max']:7.1f}"
        )
    print(f"wrote {', '.join(str(out / f'{k}.hdf5') for k in args.kinds)} in {(time.time() - start) / 60:.1f} min")
    sys.exit(0)
