# Makes the offline datasets of "Latent Action World Models for Control with Unlabeled Trajectories"
# (Appendix E) on the DeepMind Control Suite: a SAC agent learns the task online from proprioceptive
# states; its policy snapshots and its replay become the expert, medium, medium-replay and random sets.
# A second SAC agent that ignores the task and is rewarded by the disagreement of an ensemble of one-step
# dynamics models (as Plan2Explore) makes the plan2explore set: its replay, with the task rewards recorded.
# Format and protocol: docs/datasets.md.
import fcntl
import os

os.environ.setdefault("MUJOCO_GL", "disable")  # states only: no OpenGL context is ever needed

import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

KINDS = ("expert", "medium", "medium-replay", "random", "plan2explore")
FORMAT_VERSION = 1
PART_VERSION = 3  # how a seed's share is drawn from its agent; a part of another version is redrawn from the checkpoint
# Appendix E: the paper's Dreamer agents trained for 3,000 episodes per seed (1,500 on walker-walk)
PAPER_TRAIN_EPISODES = {"cheetah-run": 3000, "hopper-stand": 3000, "walker-walk": 1500}
SMOOTH_EVALS = 5  # evaluations averaged to tell a policy's level (medium snapshot, expert level): 50 episodes


@dataclass
class Args:
    env: str = "cheetah-run"
    """dm_control suite task as `domain-task`, e.g. cheetah-run, walker-walk, hopper-stand"""
    kinds: tuple[Literal["expert", "medium", "medium-replay", "random", "plan2explore"], ...] = KINDS
    """which datasets to write; each becomes `{datasets_dir}/{env}/{kind}.hdf5`"""
    num_seeds: int = 5
    """number of SAC agents (seeds `seed`, `seed+1`, ...); each adds `trajectories_per_seed` to every dataset"""
    train_episodes: int | None = None
    """episodes of online SAC training per seed (the paper's, Appendix E: 3000 for cheetah-run and hopper-stand,
    1500 for walker-walk; 3000 for other tasks); the agent at the end of training is the expert"""
    trajectories_per_seed: int = 400
    """trajectories each seed adds to each dataset (the paper: 400); the explorer collects this many after its warm-up"""
    datasets_dir: str = "datasets"
    """folder the datasets are written to"""
    runs_dir: str = "runs"
    """folder of the tensorboard logs of the SAC agents"""
    seed: int = 1
    """seed of the first agent"""
    medium_snapshots: tuple[int, ...] = ()
    """the shortcut that remakes a known medium-replay file: the training episode of each seed's medium snapshot (one
    per seed, from seed `--seed` on), as a full collection of the same draw recorded it (the `snapshot_episodes`
    attribute of its medium-replay.hdf5; Table 1's are in docs/datasets.md). Each seed is then trained to that episode
    only, in place of `--train-episodes`, and writes its medium-replay share; training episode k does not depend on
    how many follow it, so the file is the full collection's, in a fraction of the time. Only with `--kinds
    medium-replay` (the expert and medium kinds need the whole training)"""
    assemble: bool = True
    """write the datasets after the seeds are done; `--no-assemble` only trains the seeds and writes their shares, so
    that seeds can be collected in parallel processes (`--seed 2 --num-seeds 1 --no-assemble --resume`) and
    assembled by one more run over all of them (`--num-seeds 2 --resume`)"""
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
    """episodes of uniform random actions before the first update (the explorer's are the task agent's, same seed)"""
    update_every: int = 20
    """environment steps per gradient update of the task agent before episode `--late-episode` (20: an update-to-data
    ratio of 0.05); updates run after each episode. The slow early pace puts the medium snapshot (half the expert's
    return) after episode 400, so that medium-replay holds 400 trajectories per seed (at 0.5 all along SAC got there
    after 230 episodes on cheetah-run and 80 on walker-walk; at 0.1, after 310-340 on walker-walk)"""
    late_update_every: int = 2
    """environment steps per gradient update of the task agent from training episode `--late-episode` on (2: a ratio
    of 0.5; 0: `--update-every` all along). The faster late pace makes the expert (at a constant 0.1 SAC ended at
    660-780 on walker-walk and cheetah-run, still rising; docs/datasets.md)"""
    late_episode: int = 500
    """the training episode from which `--late-update-every` applies"""
    explorer_update_every: int = 2
    """environment steps per gradient update of the explorer (and of its ensemble) for plan2explore"""
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
    """training episodes between deterministic evaluations (each one keeps a policy snapshot); the explorer only reports"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    checkpoint_every: int = 25
    """training episodes between checkpoints"""

    # Exploration (the plan2explore kind): SAC with the disagreement of a dynamics ensemble as its only reward
    ensemble_size: int = 5
    """one-step dynamics models in the ensemble whose disagreement is the explorer's reward"""
    ensemble_hidden_dim: int = 256
    """width of the two hidden layers of each dynamics model"""
    disagreement_scale: float = 100.0
    """the explorer's reward is this times the ensemble's variance (in units of the standardised observation change);
    100 brings it to the order of the task rewards (cheetah-run: 0.7-1 per step in the first episodes)"""


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


class DynamicsEnsemble(nn.Module):
    """`n` one-step dynamics models in batched matmuls (Plan2Explore's ensemble, on states). Member k predicts
    the standardised change of the observation, (o_{t+1} - o_t - delta_mean) / delta_std, from the standardised
    o_t and a_t. The statistics are the replay's, refreshed before every block of updates; they are buffers, so a
    checkpoint keeps them."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.n = n
        self.net = nn.Sequential(
            VectorizedLinear(n, obs_dim + act_dim, hidden),
            nn.ReLU(),
            VectorizedLinear(n, hidden, hidden),
            nn.ReLU(),
            VectorizedLinear(n, hidden, obs_dim),
        )
        for name in ("obs_mean", "delta_mean"):
            self.register_buffer(name, torch.zeros(obs_dim))
        for name in ("obs_std", "delta_std"):
            self.register_buffer(name, torch.ones(obs_dim))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """(B, D) inputs go to every member, (n, B, D) inputs give each member its own batch; -> (n, B, obs_dim)."""
        x = torch.cat([(obs - self.obs_mean) / self.obs_std, act], -1)
        return self.net(x.expand(self.n, *x.shape[-2:]))  # (B, D) -> (n, B, D); (n, B, D) stays

    def target(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return (next_obs - obs - self.delta_mean) / self.delta_std

    @torch.no_grad()
    def set_statistics(self, obs: torch.Tensor, next_obs: torch.Tensor, eps: float = 1e-3):
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(obs.std(0) + eps)
        self.delta_mean.copy_((next_obs - obs).mean(0))
        self.delta_std.copy_((next_obs - obs).std(0) + eps)


def ensemble_loss(ensemble: DynamicsEnsemble, obs, act, next_obs) -> torch.Tensor:
    """Each member's mean squared error on its own batch (inputs (n, B, D)), summed over the members."""
    return ((ensemble(obs, act) - ensemble.target(obs, next_obs)) ** 2).mean((1, 2)).sum()


@torch.no_grad()
def disagreement(ensemble: DynamicsEnsemble, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Plan2Explore's intrinsic reward: the variance of the members' predictions of the next observation,
    averaged over its dimensions; (B, D) inputs -> (B,). Large where the models have not seen data."""
    return ensemble(obs, act).var(0, unbiased=False).mean(-1)


class Explorer:
    """The ensemble and its optimizer, kept together so that a checkpoint is one state dict (as `SAC`)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        self.ensemble = DynamicsEnsemble(args.ensemble_size, obs_dim, act_dim, args.ensemble_hidden_dim).to(device)
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(self.ensemble.parameters(), args.learning_rate, fused=fused)

    def update(self, obs, act, next_obs) -> torch.Tensor:
        loss = ensemble_loss(self.ensemble, obs, act, next_obs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"ensemble": self.ensemble.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        self.ensemble.load_state_dict(state["ensemble"])
        self.optimizer.load_state_dict(state["optimizer"])


class ReplayBuffer:
    """Every transition an agent collected, as preallocated flat tensors filled episode by episode (a copy of the
    whole replay per episode would cost O(episodes^2) over 3,000 episodes)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        dims = (obs_dim, act_dim, None, obs_dim, None)  # obs, actions, rewards, next_obs, terminals
        self.storage = [torch.empty((capacity,) if d is None else (capacity, d), device=device) for d in dims]
        self.size = 0

    def add(self, episode):
        for buf, x in zip(self.storage, next(transitions([episode])), strict=True):
            buf[self.size : self.size + len(x)] = torch.as_tensor(x)
        self.size += len(episode[1])

    def data(self) -> list:
        return [buf[: self.size] for buf in self.storage]


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


def lock_seed(work: Path, seed: int):
    """Holds an exclusive lock on a seed's folder while this process collects it: two processes on one seed (an
    assembly started before a seed's own process ended) would train it twice and write the same checkpoint. The
    kernel releases the lock when the process ends, killed or not, so a stale lock cannot block a resume."""
    handle = open(work / "lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(
            f"error: seed {seed} is being collected by another process (it holds {work / 'lock'}); "
            "wait for that process to end, then run this again"
        ) from None
    return handle  # the lock lasts as long as the handle


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


def train_agent(args: Args, seed: int, work: Path, device: torch.device, explore: bool = False):
    """Trains one SAC agent online, resuming from its checkpoint in `work` when there is one.
    The task agent learns the task for `train_episodes` episodes and keeps a policy snapshot at every evaluation.
    With `explore` it is the plan2explore explorer: the same seed gives it the same warm-up (the same random
    episodes), after which it learns for `trajectories_per_seed` episodes from the disagreement of a dynamics
    ensemble alone; the task reward is only recorded. Returns the episodes it collected (a list of (obs, actions,
    rewards, terminal), task rewards), its snapshots (a list of dicts with `episode`, `eval_return` and the actor's
    `state_dict`; none for the explorer), obs_dim and act_dim."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    env, eval_env = make_env(args.env, seed), make_env(args.env, seed + 10_000)
    obs_dim = flat_obs(env.reset().observation).shape[0]
    act_dim = env.action_spec().shape[0]
    agent = SAC(obs_dim, act_dim, args, device)
    explorer = Explorer(obs_dim, act_dim, args, device) if explore else None
    total_episodes = args.warmup_episodes + args.trajectories_per_seed if explore else args.train_episodes
    who = "explorer" if explore else "agent"
    episodes, snapshots, start = [], [], 0
    checkpoint = work / ("explorer_checkpoint.pt" if explore else "checkpoint.pt")
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)  # our own file: RNG states are numpy
        if state["config"] != sac_config(args, explore):
            raise SystemExit(
                f"error: {checkpoint} was made with other settings; continue it with "
                f"{flags_of(state['config'], args)}, or delete {work} to start over"
            )
        if state["episode"] > total_episodes:
            flag = "--trajectories-per-seed" if explore else "--train-episodes or this seed's --medium-snapshots"
            raise SystemExit(f"error: {checkpoint} is at episode {state['episode']}, past {flag} ({total_episodes} episodes)")
        agent.load_state_dict(state["agent"])
        if explore:
            explorer.load_state_dict(state["explorer"])
        episodes, snapshots, start = state["episodes"], state["snapshots"], state["episode"]
        set_rng_state(state["rng"], env)
        eval_env.task.random.set_state(state["eval_env_rng"])
        print(f"seed {seed}: {who} resumed from {checkpoint} at episode {start}")

    run_name = f"collect_data__{args.env}__plan2explore__{seed}" if explore else f"collect_data__{args.env}__{seed}"
    writer = SummaryWriter(str(Path(args.runs_dir) / run_name), purge_step=start)
    actor_policy = policy_fn(agent.actor, device, deterministic=False)
    rng = np.random.default_rng(seed)  # the warm-up's random actions
    if checkpoint.exists():
        rng.bit_generator.state = state["warmup_rng"]
    explorer_updates = args.episode_length // args.explorer_update_every
    # the replay as flat tensors filled episode by episode: sampling is one randint and five gathers
    replay = ReplayBuffer(total_episodes * args.episode_length, obs_dim, act_dim, device)
    for episode in episodes:
        replay.add(episode)
    t0, episode0, update_seconds, updates_done = time.time(), start, 0.0, 0  # for the ETA, since the last report
    for episode in range(start, total_episodes):
        warmup = episode < args.warmup_episodes
        policy = random_policy(rng, act_dim) if warmup else actor_policy
        obs, actions, rewards, terminal = rollout(env, policy, args.episode_length, args.action_repeat)
        episodes.append((obs, actions, rewards, terminal))
        replay.add(episodes[-1])
        writer.add_scalar("charts/episodic_return", rewards.sum(), episode)
        if explore and not warmup:  # how new this episode was to the ensemble that chose its actions
            o, a = torch.as_tensor(obs[:-1], device=device), torch.as_tensor(actions, device=device)
            writer.add_scalar("explore/episode_disagreement", disagreement(explorer.ensemble, o, a).mean().item(), episode)

        if not warmup:
            data = replay.data()  # [obs, actions, rewards, next_obs, terminals], views of the filled rows
            if explore:
                explorer.ensemble.set_statistics(data[0], data[3])
            t_update, n_updates = time.time(), explorer_updates if explore else task_updates(args, episode)
            for _ in range(n_updates):
                idx = torch.randint(0, replay.size, (args.batch_size,), device=device)
                batch = [x[idx] for x in data]
                if explore:
                    # every member learns from its own batch; the agent's reward is the disagreement, not the task's
                    own = torch.randint(0, replay.size, (args.ensemble_size, args.batch_size), device=device)
                    model_loss = explorer.update(data[0][own], data[1][own], data[3][own])  # (n, B, D) each
                    batch[2] = args.disagreement_scale * disagreement(explorer.ensemble, batch[0], batch[1])
                metrics = agent.update(batch, args)
            update_seconds, updates_done = update_seconds + time.time() - t_update, updates_done + n_updates
            if explore:
                metrics.update(ensemble_loss=model_loss, disagreement=batch[2].mean())
            for k, v in metrics.items():
                writer.add_scalar(f"losses/{k}", v.item(), episode)

        done = episode + 1
        if done % args.eval_every == 0 or done == total_episodes:
            if explore:  # the explorer is not meant to solve the task: its training returns are logged, no snapshots
                note = f"| explorer's reward {metrics['disagreement'].item() if not warmup else float('nan'):7.4f} "
            else:
                eval_policy = policy_fn(agent.actor, device, deterministic=True)
                episodes_eval = [
                    rollout(eval_env, eval_policy, args.episode_length, args.action_repeat) for _ in range(args.eval_episodes)
                ]
                eval_return = float(np.mean([e[2].sum() for e in episodes_eval]))
                actor_state = {k: v.detach().cpu().clone() for k, v in agent.actor.state_dict().items()}
                snapshots.append({"episode": done, "eval_return": eval_return, "actor": actor_state})
                writer.add_scalar("eval/episodic_return", eval_return, done)
                note = f"| eval return {eval_return:7.1f} "
            # the ETA prices environment steps and updates apart: the pace changes at --late-episode
            elapsed, steps = time.time() - t0, (done - episode0) * args.episode_length
            sps = steps / elapsed
            later = range(max(done, args.warmup_episodes), total_episodes)
            updates_left = len(later) * explorer_updates if explore else sum(task_updates(args, e) for e in later)
            eta = (total_episodes - done) * args.episode_length * (elapsed - update_seconds) / steps
            eta += updates_left * update_seconds / max(updates_done, 1)
            eta_text = f"ETA {eta / 60:5.1f} min" if updates_done or not updates_left else "ETA after the first updates"
            t0, episode0, update_seconds, updates_done = time.time(), done, 0.0, 0
            writer.add_scalar("charts/SPS", sps, done)
            print(
                f"seed {seed} | {who} episode {done}/{total_episodes} | train return {rewards.sum():7.1f} {note}"
                f"| {sps:5.0f} env steps/s | {eta_text}",
                flush=True,
            )
        if done % args.checkpoint_every == 0 or done == total_episodes:
            state = {"config": sac_config(args, explore), "agent": agent.state_dict(), "episodes": episodes}
            state.update(snapshots=snapshots, episode=done, rng=rng_state(env), eval_env_rng=eval_env.task.random.get_state())
            state["warmup_rng"] = rng.bit_generator.state
            if explore:
                state["explorer"] = explorer.state_dict()
            save_atomic(state, checkpoint)
    writer.close()
    return episodes, snapshots, obs_dim, act_dim


def task_updates(args: Args, episode: int) -> int:
    """Gradient updates of the task agent after its training episode `episode` (from 0): one every `--update-every`
    environment steps, and every `--late-update-every` from episode `--late-episode` on when that is set."""
    late = args.late_update_every > 0 and episode >= args.late_episode
    return args.episode_length // (args.late_update_every if late else args.update_every)


def flags_of(config: dict, args: Args) -> str:
    """The flags that give this run the settings of a checkpoint's `config` (one made before the late pace existed
    ran without it)."""
    config = {**config, "late_update_every": config.get("late_update_every", 0)}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items() if v != getattr(args, k))


def task_pace(update_every: int, late_update_every: int, late_episode: int) -> tuple:
    """The task agent's pace, comparable: the late episode matters only when the late pace is on."""
    return update_every, late_update_every, late_episode if late_update_every else None


def sac_config(args: Args, explore: bool = False) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keep = ("env", "action_repeat", "episode_length", "warmup_episodes")
    keep += ("batch_size", "hidden_dim", "learning_rate", "gamma", "tau", "init_alpha")
    if explore:
        keep += ("explorer_update_every", "ensemble_size", "ensemble_hidden_dim", "disagreement_scale")
    else:
        keep += ("update_every", "eval_every", "eval_episodes")
        keep += ("late_update_every", "late_episode") if args.late_update_every else ()  # as checkpoints made before them
    return {k: getattr(args, k) for k in keep}


def transitions(episodes):
    """Episodes (obs (T+1, D), actions, rewards, terminal) -> flat per-transition arrays in D4RL convention."""
    for obs, actions, rewards, terminal in episodes:
        T = len(actions)
        terminals = np.zeros(T, dtype=np.float32)
        terminals[-1] = float(terminal)
        yield obs[:-1], actions, rewards, obs[1:], terminals


def collect_seed(args: Args, seed: int, work: Path, device: torch.device, medium_episode: int | None = None):
    """Trains the agents of one seed and writes its share of every requested dataset to `work/{kind}.npz`."""
    todo = [kind for kind in args.kinds if not part_is_current(work / f"{kind}.npz", args, medium_episode is not None)]
    task_kinds = [kind for kind in todo if kind != "plan2explore"]
    if task_kinds:  # the task agent is loaded or trained only when one of its kinds is still to be written
        collect_task_kinds(args, seed, work, device, task_kinds, medium_episode)
    if "plan2explore" in todo:
        episodes, _, _, _ = train_agent(args, seed, work, device, explore=True)
        write_part(work, "plan2explore", episodes[args.warmup_episodes :], {"episode": -1, "eval_return": float("nan")}, args)


def collect_task_kinds(args: Args, seed: int, work: Path, device: torch.device, kinds: list, medium_episode=None):
    """The task agent and the `kinds` still to be written that come from it: windows of its training episodes,
    and random actions. `medium_episode`: the medium snapshot given by `--medium-snapshots`."""
    episodes, snapshots, obs_dim, act_dim = train_agent(args, seed, work, device)
    n = args.trajectories_per_seed
    picks = pick_training_episodes(snapshots, len(episodes), args.warmup_episodes, n, medium_episode)
    expert, medium = picks["expert_snapshot"], picks["medium_snapshot"]
    if medium_episode is None:
        print(
            f"seed {seed}: expert level {picks['expert_level']:.1f} (mean of the last {SMOOTH_EVALS} evaluations), first "
            f"at half of it (medium snapshot) at episode {medium['episode']}, first at 90% of it at episode "
            f"{picks['episodes_to_expert']} (evaluations smoothed over {SMOOTH_EVALS})"
        )
    else:
        print(f"seed {seed}: the given medium snapshot at episode {medium_episode}, evaluation {medium['eval_return']:.1f}")
    if picks["episodes_to_half_expert"] < args.trajectories_per_seed and "medium-replay" in kinds:
        print(
            f"warning: seed {seed} reached half the expert's return after {picks['episodes_to_half_expert']} episodes; "
            f"medium-replay gets {picks['episodes_to_half_expert']} of its {args.trajectories_per_seed} trajectories "
            "(a larger --update-every slows the agent down)"
        )
    curve = {"eval_episodes": [s["episode"] for s in snapshots], "eval_returns": [s["eval_return"] for s in snapshots]}
    curve.update({k: picks[k] for k in ("expert_level", "episodes_to_half_expert", "episodes_to_expert")})
    if medium_episode is not None:  # a training cut short at the medium snapshot has no expert level to show
        curve.update(expert_level=float("nan"), episodes_to_expert=-1)
    rng = np.random.default_rng(seed + 20_000)
    env = make_env(args.env, seed + 20_000)
    for kind in kinds:
        if kind == "random":
            policy = random_policy(rng, act_dim)
            chosen = [rollout(env, policy, args.episode_length, args.action_repeat) for _ in range(args.trajectories_per_seed)]
            info = {"episode": -1, "eval_return": float("nan")}
        else:
            snapshot = expert if kind == "expert" else medium
            chosen = [episodes[i] for i in picks[kind]]
            info = {"episode": snapshot["episode"], "eval_return": snapshot["eval_return"]}
        write_part(work, kind, chosen, info, args, curve, medium_episode is not None)


def smoothed_returns(snapshots: list, half_width: int = SMOOTH_EVALS // 2) -> np.ndarray:
    """The evaluation return of each snapshot averaged with its `half_width` neighbours on each side (fewer at the
    ends): the level of the policy at that time, not the luck of one evaluation of a few episodes."""
    r = np.array([s["eval_return"] for s in snapshots], dtype=np.float64)
    return np.array([r[max(0, i - half_width) : i + half_width + 1].mean() for i in range(len(r))])


def pick_training_episodes(snapshots: list, num_episodes: int, warmup: int, n: int, medium_episode: int | None = None) -> dict:
    """Which training episodes (0-based indices) make each kind of one seed. The paper gathers trajectories "while
    training an agent to expert-level performance" and extracts 400 per seed "with the specified characteristic";
    we read the characteristic as the level of the policy that acted, not as the luck of one episode:
    - the expert level is the mean evaluation of the last SMOOTH_EVALS snapshots; the expert snapshot is the final
      one; the medium snapshot the first whose smoothed evaluation (smoothed_returns) reaches half the expert level;
    - expert: the last `n` training episodes (the agent at the end of training);
    - medium: `n` consecutive training episodes centred on the medium snapshot (after the warm-up);
    - medium-replay: the training episodes before the medium snapshot (warm-up included), evenly thinned to `n`.
    Also returns the snapshots, the expert level and the episodes needed to reach half of it and 90% of it.
    `medium_episode` (`--medium-snapshots`) names the medium snapshot instead; the expert is then that of a training
    cut short, and only medium-replay is meant to be used."""
    level = smoothed_returns(snapshots)
    expert_level = float(np.mean([s["eval_return"] for s in snapshots[-SMOOTH_EVALS:]]))
    medium = snapshots[int(np.argmax(level >= expert_level / 2))]  # argmax: the first True (the first snapshot if none)
    if medium_episode is not None:
        given = [s for s in snapshots if s["episode"] == medium_episode]
        if not given:
            raise SystemExit(f"error: no snapshot at episode {medium_episode} (--medium-snapshots)")
        medium = given[0]
    near_expert = snapshots[int(np.argmax(level >= 0.9 * expert_level))]
    m = medium["episode"]  # episodes 0 .. m-1 were collected before the medium snapshot was taken
    start = min(max(warmup, m - n // 2), max(warmup, num_episodes - n))
    before = np.unique(np.linspace(0, m - 1, min(n, m)).round().astype(int))
    return {
        "expert": list(range(max(warmup, num_episodes - n), num_episodes)),
        "medium": list(range(start, min(num_episodes, start + n))),
        "medium-replay": [int(i) for i in before],
        "expert_snapshot": snapshots[-1],
        "medium_snapshot": medium,
        "expert_level": expert_level,
        "episodes_to_half_expert": m,
        "episodes_to_expert": near_expert["episode"],
    }


def write_part(work: Path, kind: str, chosen: list, info: dict, args: Args, curve: dict | None = None, given=False):
    """One seed's share of a dataset, `work/{kind}.npz`: the chosen episodes as flat transitions (`given`: from a
    medium snapshot given by `--medium-snapshots`)."""
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
        trajectories_per_seed=args.trajectories_per_seed,
        update_every=args.update_every,
        late_update_every=args.late_update_every,
        late_episode=args.late_episode,
        part_version=PART_VERSION,
        medium_snapshot_given=given,
        **{k: np.asarray(v) for k, v in (curve or {}).items()},  # the task agent's learning curve, for the docs
    )
    os.replace(tmp, work / f"{kind}.npz")
    print(f"wrote {len(chosen)} {kind} trajectories to {work / f'{kind}.npz'}")


def part_is_current(path: Path, args: Args, given: bool = False) -> bool:
    """A seed's share of a dataset is reused only if it was made from the same training length, size, (for the
    task agent's kinds) pace, and the same way to the medium snapshot (found, or `given` by `--medium-snapshots`)."""
    if not path.exists():
        return False
    with np.load(path) as part:
        # parts written before the pace was recorded were all made at --update-every 10 without the late pace
        pace = [
            int(part.get(k, default)) for k, default in (("update_every", 10), ("late_update_every", 0), ("late_episode", 0))
        ]
        return (
            int(part["train_episodes"]) == args.train_episodes
            and int(part["trajectories_per_seed"]) == args.trajectories_per_seed
            and int(part.get("part_version", 1)) == PART_VERSION
            and bool(part.get("medium_snapshot_given", False)) == given
            and (
                path.stem == "plan2explore"
                or task_pace(*pace) == task_pace(args.update_every, args.late_update_every, args.late_episode)
            )
        )


def episode_returns(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The return of every episode from flat rewards and episode-end flags."""
    return np.add.reduceat(rewards.astype(np.float64), np.r_[0, np.flatnonzero(ends)[:-1] + 1])


def return_stats(rewards: np.ndarray, ends: np.ndarray) -> dict:
    """Per-episode return statistics (the paper's Table 4) from flat rewards and episode-end flags."""
    returns = episode_returns(rewards, ends)
    q = np.percentile(returns, [25, 50, 75])
    return {
        "num_episodes": len(returns), "return_mean": returns.mean(), "return_std": returns.std(),
        "return_min": returns.min(), "return_p25": q[0], "return_median": q[1], "return_p75": q[2],
        "return_max": returns.max(),
    }  # fmt: skip


COVERAGE_DIMS, COVERAGE_CELL, COVERAGE_TRANSITIONS = 4, 0.1, 100_000


def coverage(observations: np.ndarray) -> dict:
    """How broad a dataset is: the std of every observation dimension, and the number of distinct cells of side
    COVERAGE_CELL that its observations occupy in the space of the first COVERAGE_DIMS dimensions (cheetah: torso
    height, torso angle, back thigh and back shin angles). The cells are counted on COVERAGE_TRANSITIONS evenly
    spaced transitions, so that datasets of different sizes compare."""
    n = len(observations)
    idx = np.linspace(0, n - 1, min(n, COVERAGE_TRANSITIONS)).round().astype(int)
    cells = np.floor(observations[idx, :COVERAGE_DIMS] / COVERAGE_CELL).astype(np.int64)
    return {"obs_std": observations.std(0, dtype=np.float64), "grid_cells": len(np.unique(cells, axis=0))}


def coverage_figure(observations: dict):
    """Per-dimension std of every dataset, and where each dataset's observations lie in dimensions 0 and 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, 1 + len(observations))
    rows = math.ceil((1 + len(observations)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()  # (rows, cols) -> (rows * cols,): the spread first, then one panel per dataset
    for ax in axes[1 + len(observations) :]:
        ax.axis("off")
    for kind, obs in observations.items():
        axes[0].plot(obs.std(0), marker="o", label=kind)
    axes[0].set(yscale="log", xlabel="observation dimension", ylabel="std", title="spread per dimension")
    axes[0].legend(fontsize=7)
    lo = np.min([np.percentile(o[:, :2], 0.1, 0) for o in observations.values()], 0)
    hi = np.max([np.percentile(o[:, :2], 99.9, 0) for o in observations.values()], 0)
    for ax, (kind, obs) in zip(axes[1:], observations.items(), strict=False):
        sub = obs[np.linspace(0, len(obs) - 1, min(len(obs), 20_000)).round().astype(int)]
        ax.scatter(sub[:, 0], sub[:, 1], s=1, alpha=0.2)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="dimension 0", ylabel="dimension 1", title=kind)
    fig.tight_layout()
    return fig


def log_coverage(args: Args, out: Path):
    """Prints the coverage of every dataset of the env and logs it (table, figure) to `runs/collect_data__{env}__coverage`."""
    observations = {}
    for kind in KINDS:
        if (out / f"{kind}.hdf5").exists():
            with h5py.File(out / f"{kind}.hdf5", "r") as f:
                observations[kind] = f["observations"][:]
    run_dir = Path(args.runs_dir) / f"collect_data__{args.env}__coverage"
    writer = SummaryWriter(str(run_dir))
    print(f"\ncoverage: distinct cells of side {COVERAGE_CELL} over dimensions 0-{COVERAGE_DIMS - 1} "
          f"({COVERAGE_TRANSITIONS} transitions), mean std per dimension")  # fmt: skip
    rows = ["| dataset | grid cells | mean std |", "|---|---|---|"]
    for kind, obs in observations.items():
        c = coverage(obs)
        print(f"  {kind:<14} {c['grid_cells']:>8} {c['obs_std'].mean():7.3f}")
        rows.append(f"| {kind} | {c['grid_cells']} | {c['obs_std'].mean():.3f} |")
        writer.add_scalar(f"coverage/grid_cells/{kind}", c["grid_cells"], 0)
    writer.add_text("coverage", "\n".join(rows), 0)
    fig = coverage_figure(observations)
    fig.savefig(run_dir / "coverage.png", dpi=100)
    writer.add_figure("coverage", fig, 0)
    writer.close()
    print(f"coverage figure: {run_dir / 'coverage.png'} (and in tensorboard)")


def returns_figure(returns: dict, curves: dict):
    """The paper's Figure 3 for one env: the histogram of the trajectory returns of every dataset (`returns`: kind ->
    returns); beside it, the task agent's evaluation return by training episode for every seed (`curves`: seed ->
    the learning curve kept in its part), with the medium snapshot (the first evaluation at half the final one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    top = max(max(r.max() for r in returns.values()), 1.0)
    bins = np.linspace(0, top, 41)
    for kind, r in returns.items():
        left.hist(r, bins=bins, histtype="step", linewidth=1.5, label=f"{kind} ({len(r)})")
    left.set(xlabel="trajectory return", ylabel="trajectories", title="returns per dataset")
    left.legend(fontsize=7)
    for seed, curve in curves.items():
        x, y = np.asarray(curve["eval_episodes"]), np.asarray(curve["eval_returns"])
        (line,) = right.plot(x, y, linewidth=1, label=f"seed {seed}")
        m = int(curve["episodes_to_half_expert"])
        right.axvline(m, color=line.get_color(), linestyle=":", linewidth=1)
        right.axhline(float(curve["expert_level"]) / 2, color=line.get_color(), linestyle="--", linewidth=0.8)
    right.set(xlabel="training episode", ylabel="evaluation return", title="task agent (dotted: medium snapshot)")
    if curves:  # (none when only plan2explore was collected)
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_returns(args: Args, out: Path, work_root: Path, seeds: list[int]):
    """Prints each seed's pace (episodes to half the expert's and to 90% of it, the expert's evaluation) and logs the
    return histograms and learning curves (returns_figure) to `runs/collect_data__{env}__coverage`."""
    returns = {}
    for kind in KINDS:
        if (out / f"{kind}.hdf5").exists():
            with h5py.File(out / f"{kind}.hdf5", "r") as f:
                returns[kind] = episode_returns(f["rewards"][:], f["terminals"][:] | f["timeouts"][:])
    curves = {}
    for seed in seeds:
        for kind in ("expert", "medium", "medium-replay"):  # the parts that keep the task agent's learning curve
            path = work_root / f"seed_{seed}" / f"{kind}.npz"
            if path.exists():
                with np.load(path) as part:
                    if "eval_returns" in part:
                        curves[seed] = {k: part[k] for k in ("eval_episodes", "eval_returns", "expert_level",
                                                              "episodes_to_half_expert", "episodes_to_expert")}  # fmt: skip
                        break
    for seed, c in curves.items() if not args.medium_snapshots else ():
        print(f"seed {seed}: expert level {float(c['expert_level']):.1f} after {c['eval_episodes'][-1]} episodes; half of "
              f"it first at episode {int(c['episodes_to_half_expert'])}, 90% at {int(c['episodes_to_expert'])}")  # fmt: skip
    if not returns:
        return
    run_dir = Path(args.runs_dir) / f"collect_data__{args.env}__coverage"
    writer = SummaryWriter(str(run_dir))
    fig = returns_figure(returns, curves)
    fig.savefig(run_dir / "returns.png", dpi=100)
    writer.add_figure("returns", fig, 0)
    writer.close()
    print(f"returns figure: {run_dir / 'returns.png'} (and in tensorboard)")


def write_dataset(args: Args, kind: str, parts: list[Path], seeds: list[int], path: Path, commit: str) -> dict:
    """Concatenates the per-seed parts into one HDF5 file, written to a temporary name and renamed."""
    data = [dict(np.load(p)) for p in parts]
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    arrays = {k: np.concatenate([d[k] for d in data]) for k in keys}
    tmp = path.with_name(path.name + ".tmp")
    stats = return_stats(arrays["rewards"], arrays["terminals"] | arrays["timeouts"])
    c = coverage(arrays["observations"])
    with h5py.File(tmp, "w") as f:
        for k in keys:
            f.create_dataset(k, data=arrays[k])
        f.attrs.update(
            env=args.env,
            dataset=kind,
            action_repeat=args.action_repeat,
            episode_length=args.episode_length,
            obs_type="proprio",
            format_version=FORMAT_VERSION,
            collector="collect_data.py (SAC on states"
            + (", rewarded by ensemble disagreement)" if kind == "plan2explore" else ")"),
            collector_seeds=np.array(seeds),
            git_commit=commit,
            snapshot_episodes=np.array([int(d["snapshot_episode"]) for d in data]),
            snapshot_eval_returns=np.array([float(d["snapshot_eval_return"]) for d in data]),
            obs_std=c["obs_std"],
            grid_cells=c["grid_cells"],
            **stats,
        )
        if kind != "plan2explore":  # the task agent's pace (the explorer's is --explorer-update-every)
            f.attrs.update(update_every=args.update_every, late_update_every=args.late_update_every)
            f.attrs.update(late_episode=args.late_episode, train_episodes=args.train_episodes)
        if args.medium_snapshots:  # the shortcut: each seed trained to its given medium snapshot only
            f.attrs.update(
                train_episodes=np.array(args.medium_snapshots), medium_snapshots_given=np.array(args.medium_snapshots)
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


def for_seed(args: Args, seed: int) -> tuple[Args, int | None]:
    """The settings of one seed's collection and its given medium snapshot (None without `--medium-snapshots`): with
    the shortcut the seed trains to its medium snapshot and no further."""
    if not args.medium_snapshots:
        return args, None
    m = args.medium_snapshots[seed - args.seed]
    return replace(args, train_episodes=m), m


def resolve_defaults(args: Args) -> Args:
    """Fills the per-env default of `--train-episodes` when it is not given."""
    if args.train_episodes is None:
        args.train_episodes = PAPER_TRAIN_EPISODES.get(args.env, 3000)
    return args


def check_args(args: Args):
    """One-line errors for a user's mistakes, before any work starts."""
    positive = ("num_seeds", "train_episodes", "trajectories_per_seed", "action_repeat", "episode_length")
    positive += ("update_every", "explorer_update_every", "batch_size", "hidden_dim", "eval_every", "eval_episodes")
    positive += ("checkpoint_every",)
    positive += ("ensemble_size", "ensemble_hidden_dim")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_episodes < 0 or args.warmup_episodes >= args.train_episodes:
        raise SystemExit(f"error: --warmup-episodes must be in [0, --train-episodes), got {args.warmup_episodes}")
    if args.disagreement_scale <= 0:
        raise SystemExit(f"error: --disagreement-scale must be positive, got {args.disagreement_scale}")
    if args.late_update_every < 0 or args.late_episode < 0:
        raise SystemExit("error: --late-update-every and --late-episode cannot be negative")
    for name in ("update_every", "explorer_update_every", "late_update_every"):
        if getattr(args, name) and args.episode_length % getattr(args, name):
            flag = name.replace("_", "-")
            raise SystemExit(f"error: --episode-length ({args.episode_length}) must be a multiple of --{flag}")
    if not args.kinds:
        raise SystemExit(f"error: --kinds needs at least one of {', '.join(KINDS)}")
    if args.medium_snapshots:
        if tuple(args.kinds) != ("medium-replay",):
            raise SystemExit("error: --medium-snapshots makes medium-replay alone; pass --kinds medium-replay")
        if len(args.medium_snapshots) != args.num_seeds:
            raise SystemExit(
                f"error: --medium-snapshots needs one episode per seed ({args.num_seeds}), got {len(args.medium_snapshots)}"
            )
        wrong = [m for m in args.medium_snapshots if m <= args.warmup_episodes or m % args.eval_every]
        if wrong:
            raise SystemExit(
                f"error: --medium-snapshots {wrong[0]} is not a snapshot's episode: a multiple of --eval-every "
                f"({args.eval_every}) after the warm-up ({args.warmup_episodes} episodes)"
            )
    make_env(args.env, 0)  # exits with the list of valid names
    out = Path(args.datasets_dir) / args.env
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"  # per process: parallel seeds probe the same folder
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to {out}: {e.strerror}") from None
    existing = [str(out / f"{k}.hdf5") for k in args.kinds if (out / f"{k}.hdf5").exists()]
    if existing and args.assemble and not args.overwrite:
        raise SystemExit(f"error: {', '.join(existing)} exists; pass --overwrite to replace it")


if __name__ == "__main__":
    args = resolve_defaults(tyro.cli(Args))
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
        seed_args, medium_episode = for_seed(args, seed)
        if not all(part_is_current(work / f"{kind}.npz", seed_args, medium_episode is not None) for kind in args.kinds):
            lock = lock_seed(work, seed)
            collect_seed(seed_args, seed, work, device, medium_episode)
            lock.close()
        print(f"seed {seed} done after {(time.time() - start) / 60:.1f} min", flush=True)
    if not args.assemble:
        print(f"seeds {seeds} done; assemble the datasets with a run over every seed without --no-assemble")
        sys.exit(0)

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
    log_coverage(args, out)
    log_returns(args, out, work_root, seeds)
    print(f"wrote {', '.join(str(out / f'{k}.hdf5') for k in args.kinds)} in {(time.time() - start) / 60:.1f} min")
    sys.exit(0)
