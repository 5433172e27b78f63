"""collect_data.py: SAC's losses, the explorer's disagreement reward, the file format, coverage, resume after a
hard kill, and one-line errors."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import collect_data as cd

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"observations": np.float32, "actions": np.float32, "rewards": np.float32,
        "next_observations": np.float32, "terminals": np.bool_, "timeouts": np.bool_}  # fmt: skip


def run(*flags, check=True, **kwargs):
    cmd = [sys.executable, str(ROOT / "collect_data.py"), *map(str, flags)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)  # a mistake must not run for hours
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{out.stdout}\n{out.stderr}")
    return out


# ---------------------------------------------------------------- SAC on toy cases
class ConstActor(torch.nn.Module):
    """sample() returns a fixed action and log-probability."""

    def __init__(self, action, log_prob):
        super().__init__()
        self.action, self.log_prob = action, log_prob

    def sample(self, obs):
        return self.action.expand(obs.shape[0], -1), self.log_prob.expand(obs.shape[0])


class LinearTwin(torch.nn.Module):
    """Q_i(s, a) = w_i * (sum(s) + sum(a)): easy to compute by hand."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w = torch.tensor([[w1], [w2]])

    def forward(self, obs, act):
        return self.w * (obs.sum(-1) + act.sum(-1))


def test_critic_loss_by_hand():
    obs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    act = torch.tensor([[0.5], [-0.5]])
    rew = torch.tensor([1.0, 0.0])
    next_obs = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    terminal = torch.tensor([0.0, 1.0])
    actor = ConstActor(torch.tensor([[0.25]]), torch.tensor([-1.0]))
    critic, target = LinearTwin(1.0, 2.0), LinearTwin(3.0, 0.5)
    log_alpha = torch.tensor(math.log(0.2))
    loss = cd.sac_critic_loss(actor, critic, target, log_alpha, (obs, act, rew, next_obs, terminal), gamma=0.9)
    # next sums: 1.25 and 2.25; min of (3x, 0.5x) = 0.5x -> 0.625, 1.125; minus alpha*logp = +0.2
    y = torch.tensor([1.0 + 0.9 * (0.625 + 0.2), 0.0])  # the second transition is terminal
    q1 = torch.tensor([1.5, 1.5])  # sums 1.5 and 1.5
    q2 = 2 * q1
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    assert torch.allclose(loss, expected)


def test_actor_and_alpha_loss_by_hand():
    obs = torch.tensor([[1.0, 1.0]])
    actor = ConstActor(torch.tensor([[0.5]]), torch.tensor([-2.0]))
    log_alpha = torch.tensor(math.log(0.5), requires_grad=True)
    loss, log_prob = cd.sac_actor_loss(actor, LinearTwin(1.0, -1.0), log_alpha, obs)
    assert torch.allclose(loss, torch.tensor(0.5 * -2.0 - (-2.5)))  # min Q = -2.5
    # entropy 2 > target -1: the temperature must go down
    cd.sac_alpha_loss(log_alpha, log_prob, target_entropy=-1.0).backward()
    assert log_alpha.grad > 0
    log_alpha.grad = None
    # entropy -3 < target -1: the temperature must go up
    cd.sac_alpha_loss(log_alpha, torch.tensor([3.0]), target_entropy=-1.0).backward()
    assert log_alpha.grad < 0


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = cd.TanhGaussianActor(3, 2, 16)
    obs = torch.randn(64, 3)
    torch.manual_seed(1)
    action, log_prob = actor.sample(obs)
    mean, log_std = actor(obs)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    torch.manual_seed(1)
    x = mean + log_std.exp() * torch.randn_like(mean)  # the same pre-tanh sample
    assert torch.allclose(action, torch.tanh(x))
    assert torch.allclose(log_prob, dist.log_prob(torch.tanh(x)).sum(-1), atol=1e-3)
    assert action.abs().max() < 1


def test_vectorized_linear_is_two_linears():
    torch.manual_seed(0)
    layer = cd.VectorizedLinear(2, 5, 3)
    x = torch.randn(2, 7, 5)
    for i in range(2):
        assert torch.allclose(layer(x)[i], x[i] @ layer.weight[i] + layer.bias[i, 0], atol=1e-6)


def test_sac_update_learns_a_bandit():
    """One-step task (terminal after every action), reward -(a - 0.5)^2: the actor's mean moves to 0.5."""
    torch.manual_seed(0)
    args = cd.Args(hidden_dim=32, learning_rate=3e-3, init_alpha=0.01)
    agent = cd.SAC(1, 1, args, torch.device("cpu"))
    agent.target_entropy = -4.0  # a low target keeps the temperature from blurring the optimum
    for _ in range(800):
        obs = torch.zeros(128, 1)
        act = torch.rand(128, 1) * 2 - 1
        batch = [obs, act, -((act[:, 0] - 0.5) ** 2), obs, torch.ones(128)]
        agent.update(batch, args)
    mean = torch.tanh(agent.actor(torch.zeros(1, 1))[0]).item()
    assert abs(mean - 0.5) < 0.1, mean


def test_return_stats():
    rewards = np.array([1, 2, 3, 10, 10, 0, 0, 4], dtype=np.float32)
    ends = np.array([0, 0, 1, 0, 1, 0, 0, 1], dtype=bool)
    s = cd.return_stats(rewards, ends)  # returns 6, 20, 4
    assert s["num_episodes"] == 3 and s["return_mean"] == pytest.approx(10) and s["return_min"] == 4
    assert s["return_median"] == 6 and s["return_max"] == 20 and s["return_std"] == pytest.approx(np.std([6, 20, 4]))


# ---------------------------------------------------------------- the explorer's reward
def test_disagreement_is_zero_for_identical_members():
    torch.manual_seed(0)
    ensemble = cd.DynamicsEnsemble(4, 3, 2, 16)
    with torch.no_grad():
        for p in ensemble.net.parameters():
            p.copy_(p[:1].expand_as(p))  # every member a copy of member 0
    obs, act = torch.randn(64, 3) * 5, torch.rand(64, 2) * 2 - 1
    assert torch.equal(cd.disagreement(ensemble, obs, act), torch.zeros(64))
    # and members that differ disagree
    assert (cd.disagreement(cd.DynamicsEnsemble(4, 3, 2, 16), obs, act) > 0).all()


def test_disagreement_is_larger_off_the_data():
    """Trained on states near the origin, the members agree there and disagree far from it."""
    torch.manual_seed(0)
    args = cd.Args(ensemble_size=5, ensemble_hidden_dim=64, learning_rate=3e-3)
    explorer = cd.Explorer(3, 2, args, torch.device("cpu"))
    w = torch.randn(5, 3)

    def data(n, shift=0.0):
        obs, act = torch.randn(n, 3) + shift, torch.rand(n, 2) * 2 - 1
        return obs, act, obs + 0.1 * torch.tanh(torch.cat([obs, act], -1) @ w)

    explorer.ensemble.set_statistics(*data(10_000)[::2])
    first = None
    for _ in range(500):
        obs, act, nxt = data(5 * 128)
        loss = explorer.update(obs.view(5, 128, 3), act.view(5, 128, 2), nxt.view(5, 128, 3))
        first = loss.item() if first is None else first
    assert loss.item() < 0.3 * first  # the members learned the dynamics
    on = cd.disagreement(explorer.ensemble, *data(1000)[:2]).mean()
    off = cd.disagreement(explorer.ensemble, *data(1000, shift=6.0)[:2]).mean()
    assert off > 10 * on, (on, off)


def test_coverage_counts_occupied_cells():
    rng = np.random.default_rng(0)
    same = np.zeros((500, 6), dtype=np.float32) + 0.05  # all in one cell
    assert cd.coverage(same)["grid_cells"] == 1 and np.allclose(cd.coverage(same)["obs_std"], 0)
    corners = np.zeros((400, 6), dtype=np.float32)
    corners[:, : cd.COVERAGE_DIMS] = rng.integers(0, 2, (400, cd.COVERAGE_DIMS)) * 10 * cd.COVERAGE_CELL + 0.01
    assert cd.coverage(corners)["grid_cells"] == 2**cd.COVERAGE_DIMS  # the dimensions past COVERAGE_DIMS do not count
    # a bigger dataset is counted on the same number of transitions
    long = np.repeat(np.arange(3 * cd.COVERAGE_TRANSITIONS, dtype=np.float32)[:, None], 6, 1) * cd.COVERAGE_CELL
    assert cd.coverage(long)["grid_cells"] == cd.COVERAGE_TRANSITIONS


# ---------------------------------------------------------------- end to end
TINY = ["--env", "cheetah-run", "--num-seeds", "1", "--train-episodes", "4", "--trajectories-per-seed", "2",
        "--warmup-episodes", "2", "--eval-every", "2", "--eval-episodes", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collect")
    run(*TINY, "--datasets-dir", tmp / "datasets", "--runs-dir", tmp / "runs")
    return tmp


@pytest.mark.parametrize("kind", cd.KINDS)
def test_file_format(tiny_datasets, kind):
    path = tiny_datasets / "datasets" / "cheetah-run" / f"{kind}.hdf5"
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == set(KEYS)
        data = {k: f[k][:] for k in KEYS}
        attrs = dict(f.attrs)
    n = 2 * 500
    for k, dtype in KEYS.items():
        assert data[k].dtype == dtype, k
        assert data[k].shape[0] == n, k
    assert data["observations"].shape == data["next_observations"].shape == (n, 17)
    assert data["actions"].shape == (n, 6) and np.abs(data["actions"]).max() <= 1
    assert not data["terminals"].any()
    assert np.array_equal(np.flatnonzero(data["timeouts"]), [499, 999])
    inside = ~data["timeouts"][:-1]
    assert np.array_equal(data["next_observations"][:-1][inside], data["observations"][1:][inside])
    assert attrs["env"] == "cheetah-run" and attrs["dataset"] == kind
    assert attrs["action_repeat"] == 2 and attrs["episode_length"] == 500 and attrs["obs_type"] == "proprio"
    assert attrs["format_version"] == cd.FORMAT_VERSION and list(attrs["collector_seeds"]) == [1]
    if kind != "plan2explore":  # the task agent's pace, at the defaults
        pace = [attrs[k] for k in ("update_every", "late_update_every", "late_episode", "train_episodes")]
        assert pace == [cd.Args.update_every, cd.Args.late_update_every, cd.Args.late_episode, 4]
    returns = data["rewards"].reshape(2, 500).sum(1)
    assert attrs["num_episodes"] == 2
    assert attrs["return_mean"] == pytest.approx(returns.mean(), rel=1e-5)
    assert attrs["return_max"] == pytest.approx(returns.max(), rel=1e-5)
    for key in ("return_std", "return_min", "return_p25", "return_median", "return_p75"):
        assert key in attrs
    # the datasets and the checkpoints (kept so that a collection can be extended), no temporary files
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([".work"] + [f"{k}.hdf5" for k in cd.KINDS])
    assert not [p for p in path.parent.rglob("*") if ".tmp" in p.name]
    assert (path.parent / ".work" / "seed_1" / "checkpoint.pt").exists()


def test_tensorboard_log(tiny_datasets):
    assert list((tiny_datasets / "runs" / "collect_data__cheetah-run__1").glob("events.out.tfevents.*"))


def test_existing_dataset_needs_overwrite(tiny_datasets):
    out = run(*TINY, "--datasets-dir", tiny_datasets / "datasets", check=False)
    assert out.returncode != 0 and "--overwrite" in out.stderr


# ---------------------------------------------------------------- resume
FAST = ["--env", "cheetah-run", "--num-seeds", "1", "--train-episodes", "12", "--warmup-episodes", "1",
        "--trajectories-per-seed", "1", "--kinds", "expert", "medium-replay", "--eval-every", "3", "--eval-episodes", "1",
        "--hidden-dim", "32", "--batch-size", "32", "--update-every", "5", "--checkpoint-every", "1"]  # fmt: skip


EXPLORE = ["--env", "cheetah-run", "--num-seeds", "1", "--warmup-episodes", "1", "--trajectories-per-seed", "8",
           "--kinds", "plan2explore", "--eval-every", "3", "--hidden-dim", "32", "--batch-size", "32", "--ensemble-size",
           "3", "--ensemble-hidden-dim", "32", "--explorer-update-every", "5", "--checkpoint-every", "1"]  # fmt: skip


@pytest.mark.parametrize(
    "flags, checkpoint_name, kinds",
    [(FAST, "checkpoint.pt", ("expert", "medium-replay")), (EXPLORE, "explorer_checkpoint.pt", ("plan2explore",))],
    ids=["agent", "explorer"],
)
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, flags, checkpoint_name, kinds):
    run(*flags, "--datasets-dir", tmp_path / "a", "--runs-dir", tmp_path / "runs_a")
    cmd = [sys.executable, str(ROOT / "collect_data.py"), *flags, "--datasets-dir", str(tmp_path / "b")]
    proc = subprocess.Popen(
        cmd + ["--runs-dir", str(tmp_path / "runs_b")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoint = tmp_path / "b" / "cheetah-run" / ".work" / "seed_1" / checkpoint_name
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # a hard stop: no handler runs
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (tmp_path / "b" / "cheetah-run" / f"{kinds[0]}.hdf5").exists()

    again = run(*flags, "--datasets-dir", tmp_path / "b", "--runs-dir", tmp_path / "runs_b", check=False)
    assert again.returncode != 0 and "--resume" in again.stderr  # never silently starts over
    resumed = run(*flags, "--datasets-dir", tmp_path / "b", "--runs-dir", tmp_path / "runs_b", "--resume")
    assert "resumed from" in resumed.stdout
    for kind in kinds:
        with h5py.File(tmp_path / "a" / "cheetah-run" / f"{kind}.hdf5") as fa, h5py.File(
            tmp_path / "b" / "cheetah-run" / f"{kind}.hdf5"
        ) as fb:
            for k in KEYS:
                assert np.array_equal(fa[k][:], fb[k][:]), (kind, k)


def test_plan2explore_alone_is_the_explorers_replay_after_the_shared_warmup(tmp_path):
    run(*EXPLORE, "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs")
    work = tmp_path / "d" / "cheetah-run" / ".work" / "seed_1"
    assert not (work / "checkpoint.pt").exists()  # plan2explore alone does not train the task agent
    explorer = torch.load(work / "explorer_checkpoint.pt", weights_only=False)["episodes"]
    assert len(explorer) == 1 + 8  # the warm-up, then trajectories-per-seed episodes
    with h5py.File(tmp_path / "d" / "cheetah-run" / "plan2explore.hdf5") as f:
        assert f.attrs["num_episodes"] == 8 and f.attrs["snapshot_episodes"][0] == -1
        assert np.array_equal(f["observations"][:], np.concatenate([e[0][:-1] for e in explorer[1:]]))
        assert np.array_equal(f["rewards"][:], np.concatenate([e[2] for e in explorer[1:]]))  # the task's rewards
        assert f.attrs["grid_cells"] == cd.coverage(f["observations"][:])["grid_cells"]
    assert (tmp_path / "runs" / "collect_data__cheetah-run__coverage" / "coverage.png").exists()
    # the task agent of the same seed starts from the same warm-up episode
    run(*FAST, "--kinds", "medium-replay", "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs", "--resume")
    agent = torch.load(work / "checkpoint.pt", weights_only=False)["episodes"]
    for a, b in zip(agent[0], explorer[0], strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(agent[1][1], explorer[1][1])  # after it, each agent acts on its own


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env", "cheetah-fly"], "unknown env 'cheetah-fly'; valid names: acrobot-swingup"),
        (["--num-seeds", "0"], "--num-seeds must be at least 1"),
        (["--train-episodes", "100", "--warmup-episodes", "700"], "--warmup-episodes must be in"),
        (["--kinds", "expert", "--datasets-dir", "/dev/null/datasets"], "cannot write to /dev/null/datasets"),
        (["--late-update-every", "3"], "--episode-length (500) must be a multiple of --late-update-every"),
        (["--medium-snapshots", "500"], "--medium-snapshots makes medium-replay alone; pass --kinds medium-replay"),
        (
            ["--kinds", "medium-replay", "--medium-snapshots", "500"],
            "--medium-snapshots needs one episode per seed (5), got 1",
        ),
        (
            ["--kinds", "medium-replay", "--num-seeds", "1", "--medium-snapshots", "505"],
            "--medium-snapshots 505 is not a snapshot",
        ),
    ],
)
def test_one_line_errors(flags, message, tmp_path):
    out = run(*flags, check=False, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("error:")]) == 1


def test_a_seed_collected_by_another_process_is_not_trained_twice(tmp_path):
    work = tmp_path / "d" / "cheetah-run" / ".work" / "seed_1"
    work.mkdir(parents=True)
    held = cd.lock_seed(work, 1)  # as the seed's own process holds it while it trains
    out = run(*FAST, "--resume", "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs", check=False)
    assert out.returncode != 0
    assert "seed 1 is being collected by another process" in out.stderr and "Traceback" not in out.stderr
    assert not (work / "checkpoint.pt").exists()  # it trained nothing
    held.close()  # the other process ended (a killed one releases it too)
    run(*FAST, "--resume", "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs")
    assert (tmp_path / "d" / "cheetah-run" / "expert.hdf5").exists()


def test_a_finished_collection_can_be_extended(tmp_path):
    flags = [*FAST, "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs"]
    run(*flags)
    checkpoint = tmp_path / "d" / "cheetah-run" / ".work" / "seed_1" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["episode"] == 12
    flags[flags.index("--train-episodes") + 1] = "15"
    out = run(*flags, "--resume", "--overwrite")
    assert "resumed from" in out.stdout and "at episode 12" in out.stdout
    assert torch.load(checkpoint, weights_only=False)["episode"] == 15
    with h5py.File(tmp_path / "d" / "cheetah-run" / "expert.hdf5") as f:
        assert f.attrs["snapshot_episodes"][0] == 15  # the expert is the extended agent's final policy


# ---------------------------------------------------------------- paper scale (issue 11)
def test_per_env_defaults_follow_appendix_e():
    for env, episodes in [("cheetah-run", 3000), ("hopper-stand", 3000), ("walker-walk", 1500), ("cartpole-swingup", 3000)]:
        args = cd.resolve_defaults(cd.Args(env=env))
        assert args.train_episodes == episodes and args.trajectories_per_seed == 400
        assert args.episode_length % args.update_every == 0 and args.update_every >= 10
        # slow (ratio 0.05) for the medium snapshot after episode 400, then fast (0.5) for the expert
        assert [cd.task_updates(args, e) for e in (0, 499, 500, episodes - 1)] == [25, 25, 250, 250]
    assert cd.resolve_defaults(cd.Args(env="walker-walk", train_episodes=50)).train_episodes == 50  # a flag the user sets wins


def test_a_late_pace_speeds_up_the_task_agent_from_its_episode(tmp_path, monkeypatch):
    args = cd.Args(update_every=10, late_update_every=2, late_episode=5, episode_length=500)
    assert [cd.task_updates(args, e) for e in (0, 4, 5, 9)] == [50, 50, 250, 250]
    assert cd.task_updates(cd.Args(late_update_every=0), 10_000) == 25  # 0: one pace all along
    assert "late_update_every" not in cd.sac_config(cd.Args(late_update_every=0))  # as checkpoints made before the knob
    assert cd.sac_config(args)["late_update_every"] == 2 and cd.sac_config(args, explore=True) == cd.sac_config(
        cd.Args(), True
    )
    # the training loop makes those updates: 1 warm-up episode, then 20 // 10 = 2, then 20 // 2 = 10 from episode 2
    calls, update = [], cd.SAC.update
    monkeypatch.setattr(cd.SAC, "update", lambda self, *a: calls.append(1) or update(self, *a))
    tiny = cd.Args(env="cheetah-run", train_episodes=4, warmup_episodes=1, episode_length=20, update_every=10,
                   late_update_every=2, late_episode=2, batch_size=8, hidden_dim=16, eval_every=2, eval_episodes=1,
                   runs_dir=str(tmp_path / "runs"), cuda=False)  # fmt: skip
    (tmp_path / "work").mkdir()
    cd.train_agent(tiny, 1, tmp_path / "work", torch.device("cpu"))
    assert len(calls) == 2 + 10 + 10


def test_a_checkpoint_at_another_pace_names_the_flags_that_continue_it(tmp_path):
    flags = [*FAST, "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs"]
    run(*flags, "--kinds", "expert", "--late-update-every", "0", "--train-episodes", "3")
    out = run(*flags, "--kinds", "expert", "--train-episodes", "6", "--resume", "--overwrite", check=False)
    assert out.returncode != 0 and "continue it with --late-update-every 0, or delete" in out.stderr
    assert "Traceback" not in out.stderr
    run(*flags, "--kinds", "expert", "--train-episodes", "6", "--resume", "--overwrite", "--late-update-every", "0")
    # a checkpoint made before the late pace existed has no late keys: it ran at one pace
    old = {"env": "cheetah-run", "update_every": 10, "eval_every": 10}
    assert cd.flags_of(old, cd.Args(env="cheetah-run")) == "--update-every 10 --late-update-every 0"


def test_a_part_is_reused_only_at_its_pace(tmp_path):
    args = cd.Args(train_episodes=1500, trajectories_per_seed=400)
    made = dict(train_episodes=1500, trajectories_per_seed=400, part_version=cd.PART_VERSION)
    np.savez(tmp_path / "medium-replay.npz", **made, update_every=20, late_update_every=2, late_episode=500)
    np.savez(tmp_path / "expert.npz", **made)  # written before the pace was recorded: --update-every 10 all along
    np.savez(tmp_path / "plan2explore.npz", **made)  # the explorer's pace is its own
    assert cd.part_is_current(tmp_path / "medium-replay.npz", args)
    assert not cd.part_is_current(tmp_path / "medium-replay.npz", cd.Args(train_episodes=1500, late_episode=600))
    assert not cd.part_is_current(tmp_path / "expert.npz", args)
    assert cd.part_is_current(tmp_path / "expert.npz", cd.Args(train_episodes=1500, update_every=10, late_update_every=0))
    assert cd.part_is_current(tmp_path / "plan2explore.npz", args)


def snapshots(evals, every=10):
    return [{"episode": every * (i + 1), "eval_return": r} for i, r in enumerate(evals)]


def test_kinds_are_windows_of_the_training_episodes():
    # 3000 episodes, evaluations every 10; the agent first reaches half of the final 800 at episode 1200
    evals = np.minimum(np.arange(1, 301) * 400 / 120, 800.0)
    picks = cd.pick_training_episodes(snapshots(evals), 3000, warmup=10, n=400)
    assert picks["medium_snapshot"]["episode"] == 1200 and picks["episodes_to_half_expert"] == 1200
    assert picks["episodes_to_expert"] == 2160  # first evaluation at 90% of 800
    assert picks["expert"] == list(range(2600, 3000))  # the agent at the end of training
    assert picks["medium"] == list(range(1000, 1400))  # centred on the medium snapshot
    replay = picks["medium-replay"]
    assert len(replay) == 400 and replay[0] == 0 and replay[-1] == 1199  # everything before it, evenly thinned
    assert np.all(np.diff(replay) > 0)


def test_medium_replay_is_everything_before_an_early_medium_snapshot():
    evals = [0, 0, 0, 600, 600, 600, 600, 600, 600]  # episodes 10, 20, ..., 90
    picks = cd.pick_training_episodes(snapshots(evals), 100, warmup=5, n=400)
    # smoothed over 5 evaluations: 0, 150, 240, 360 (at episode 40: the first at half of 600), ...
    assert picks["expert_level"] == 600 and picks["medium_snapshot"]["episode"] == 40
    assert picks["medium-replay"] == list(range(40))
    assert picks["medium"] == list(range(5, 100)) and picks["expert"] == list(range(5, 100))  # never the warm-up


def test_one_lucky_evaluation_is_not_the_medium_snapshot():
    evals = [100] * 10 + [700] + [100] * 10 + [400] * 10 + [800] * 10  # a spike at episode 110
    picks = cd.pick_training_episodes(snapshots(evals), 410, warmup=10, n=400)
    assert picks["expert_level"] == 800
    # smoothed: 220 at the spike; 280, 340, then 400 at episode 240, the first at half of 800
    assert picks["medium_snapshot"]["episode"] == 240 and picks["episodes_to_half_expert"] == 240
    assert picks["episodes_to_expert"] == 330  # 400, 400, 800, 800, 800 -> 640; then 720 at episode 330
    assert np.allclose(cd.smoothed_returns(snapshots([1, 2, 3, 4, 5, 6]))[:3], [2, 2.5, 3])


def test_a_given_medium_snapshot_picks_the_episodes_before_it():
    evals = np.minimum(np.arange(1, 301) * 400 / 120, 800.0)  # as above: the found medium snapshot is at episode 1200
    full = cd.pick_training_episodes(snapshots(evals), 3000, warmup=10, n=400)
    cut = cd.pick_training_episodes(snapshots(evals[:120]), 1200, warmup=10, n=400, medium_episode=1200)
    assert cut["medium_snapshot"]["episode"] == 1200 and cut["medium-replay"] == full["medium-replay"]
    other = cd.pick_training_episodes(snapshots(evals), 3000, warmup=10, n=400, medium_episode=300)
    assert other["medium-replay"] == [int(i) for i in np.linspace(0, 299, 300).round()]  # fewer than n: all of them
    with pytest.raises(SystemExit, match="no snapshot at episode 305"):
        cd.pick_training_episodes(snapshots(evals), 3000, warmup=10, n=400, medium_episode=305)


def test_medium_replay_from_seeds_trained_to_their_given_medium_snapshots(tmp_path):
    """--medium-snapshots: each seed trains to its snapshot and no further, and its share is the full collection's."""
    flags = [*FAST, "--kinds", "medium-replay", "--num-seeds", "2", "--trajectories-per-seed", "3", "--episode-length", "100"]
    run(*flags, "--datasets-dir", tmp_path / "full", "--runs-dir", tmp_path / "runs")
    full_file = tmp_path / "full" / "cheetah-run" / "medium-replay.hdf5"
    with h5py.File(full_file) as f:
        found = [int(m) for m in f.attrs["snapshot_episodes"]]
        full = {k: f[k][:] for k in KEYS}
    # seed 1 at the snapshot the full collection found, seed 2 at another one (episode 6, three snapshots in)
    out = run(*flags, "--medium-snapshots", found[0], 6, "--datasets-dir", tmp_path / "cut", "--runs-dir", tmp_path / "runs")
    assert "seed 2: the given medium snapshot at episode 6" in out.stdout and "expert level" not in out.stdout
    work = tmp_path / "cut" / "cheetah-run" / ".work"
    assert [torch.load(work / f"seed_{s}" / "checkpoint.pt", weights_only=False)["episode"] for s in (1, 2)] == [found[0], 6]
    episodes_2 = torch.load(tmp_path / "full" / "cheetah-run" / ".work" / "seed_2" / "checkpoint.pt", weights_only=False)
    expected_2 = [cd.transitions([episodes_2["episodes"][i]]) for i in (0, 2, 5)]  # episodes 0..5 thinned to 3
    expected_2 = np.concatenate([next(t)[0] for t in expected_2])
    with h5py.File(tmp_path / "cut" / "cheetah-run" / "medium-replay.hdf5") as f:
        seed_1 = 3 * 100  # seed 1's share: its 3 episodes of 100 steps
        for k in KEYS:
            assert np.array_equal(f[k][:seed_1], full[k][:seed_1]), k  # bit for bit the full collection's
        assert np.array_equal(f["observations"][seed_1:], expected_2)
        assert list(f.attrs["snapshot_episodes"]) == [found[0], 6] and list(f.attrs["medium_snapshots_given"]) == [found[0], 6]
        assert list(f.attrs["train_episodes"]) == [found[0], 6]
    # assembled again, nothing is retrained; and a checkpoint past a given snapshot is an error that names the flag
    again = run(*flags, "--medium-snapshots", found[0], 6, "--resume", "--overwrite", "--datasets-dir", tmp_path / "cut",
                "--runs-dir", tmp_path / "runs")  # fmt: skip
    assert "resumed from" not in again.stdout and "trajectories to" not in again.stdout
    past = run(*flags, "--medium-snapshots", 3, 3, "--resume", "--overwrite", "--datasets-dir", tmp_path / "cut",
               "--runs-dir", tmp_path / "runs", check=False)  # fmt: skip
    assert past.returncode != 0 and "past --train-episodes or this seed's --medium-snapshots (3 episodes)" in past.stderr


def test_seeds_collected_in_parallel_assemble_into_one_dataset(tmp_path):
    flags = [*FAST, "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "runs"]
    flags[flags.index("--num-seeds") + 1] = "1"
    cmd = [sys.executable, str(ROOT / "collect_data.py"), *map(str, flags), "--no-assemble", "--resume", "--seed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each, as the docs run them (two threads each oversubscribe)
    workers = [subprocess.Popen([*cmd, seed], stdout=subprocess.PIPE, text=True, env=env) for seed in ("1", "2")]  # at once
    for worker in workers:
        assert worker.wait(timeout=600) == 0 and "assemble the datasets" in worker.stdout.read()
        worker.stdout.close()
    assert not (tmp_path / "d" / "cheetah-run" / "expert.hdf5").exists()
    work = tmp_path / "d" / "cheetah-run" / ".work"
    trained = [(work / f"seed_{s}" / "checkpoint.pt").stat().st_mtime_ns for s in (1, 2)]
    flags[flags.index("--num-seeds") + 1] = "2"
    out = run(*flags, "--seed", "1", "--resume")
    assert [(work / f"seed_{s}" / "checkpoint.pt").stat().st_mtime_ns for s in (1, 2)] == trained  # nothing retrained
    assert re.search(r"seed 2: expert level [-\d.]+ after 12 episodes; half of it first at episode \d+", out.stdout)
    assert (tmp_path / "runs" / "collect_data__cheetah-run__coverage" / "returns.png").stat().st_size > 1000
    with h5py.File(tmp_path / "d" / "cheetah-run" / "medium-replay.hdf5") as f:
        assert list(f.attrs["collector_seeds"]) == [1, 2]
        parts = [np.load(tmp_path / "d" / "cheetah-run" / ".work" / f"seed_{s}" / "medium-replay.npz") for s in (1, 2)]
        assert np.array_equal(f["observations"][:], np.concatenate([p["observations"] for p in parts]))
        assert len(parts[0]["eval_returns"]) == 12 // 3  # the learning curve is kept for the docs
