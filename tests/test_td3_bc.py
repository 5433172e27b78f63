"""td3_bc.py: the losses by hand, state normalisation, the labeled split, errors, and a smoke run."""

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import run_script, write_dataset

import td3_bc


class LinearTwin(torch.nn.Module):
    """Q_i(s, a) = w_i * (sum(s) + sum(a))."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w = torch.tensor([[w1], [w2]])

    def forward(self, obs, act):
        return self.w * (obs.sum(-1) + act.sum(-1))

    def q1(self, obs, act):
        return self.forward(obs, act)[0]


def test_critic_loss_by_hand():
    args = td3_bc.Args(policy_noise=0.0, gamma=0.5)
    obs = torch.tensor([[1.0], [2.0]])
    act = torch.tensor([[0.5], [-0.5]])
    rew = torch.tensor([1.0, 2.0])
    next_obs = torch.tensor([[0.0], [3.0]])
    terminal = torch.tensor([0.0, 1.0])
    actor_target = lambda o: torch.full((o.shape[0], 1), 0.9)  # noqa: E731
    loss = td3_bc.critic_loss(
        LinearTwin(1.0, 2.0), LinearTwin(2.0, -1.0), actor_target, (obs, act, rew, next_obs, terminal), args
    )
    # target: next sums 0.9 and 3.9, min(2x, -x) = -0.9 and -3.9; the second transition is terminal
    y = torch.tensor([1.0 + 0.5 * -0.9, 2.0])
    q1 = torch.tensor([1.5, 1.5])
    expected = ((q1 - y) ** 2).mean() + ((2 * q1 - y) ** 2).mean()
    assert torch.allclose(loss, expected)


def test_target_policy_noise_is_clipped():
    args = td3_bc.Args(policy_noise=100.0, noise_clip=0.5)
    seen = []

    class Recorder(LinearTwin):
        def forward(self, obs, act):
            seen.append(act.clone())
            return super().forward(obs, act)

    batch = (torch.zeros(512, 1), torch.zeros(512, 1), torch.zeros(512), torch.zeros(512, 1), torch.zeros(512))
    td3_bc.critic_loss(LinearTwin(1, 1), Recorder(1, 1), lambda o: torch.full((o.shape[0], 1), 0.8), batch, args)
    # the noise is clipped to +-0.5 and the noisy action to [-1, 1]
    assert seen[0].min() == pytest.approx(0.3) and seen[0].max() == pytest.approx(1.0)


def test_actor_loss_by_hand():
    obs = torch.tensor([[1.0], [3.0]])
    act = torch.tensor([[0.0], [1.0]])
    actor = lambda o: 0.5 * o  # noqa: E731  pi = 0.5, 1.5
    loss, lmbda = td3_bc.actor_loss(actor, LinearTwin(2.0, -7.0), (obs, act), alpha=2.5)
    q1 = torch.tensor([2 * 1.5, 2 * 4.5])  # Q1 only, never Q2
    expected_lambda = 2.5 / q1.abs().mean()
    expected = -expected_lambda * q1.mean() + ((torch.tensor([0.5, 1.5]) - act[:, 0]) ** 2).mean()
    assert torch.allclose(lmbda, expected_lambda) and torch.allclose(loss, expected)


def test_q1_is_the_first_twin():
    torch.manual_seed(0)
    critic = td3_bc.TwinCritic(5, 2, 16)
    obs, act = torch.randn(9, 5), torch.rand(9, 2)
    assert torch.allclose(critic.q1(obs, act), critic(obs, act)[0], atol=1e-6)
    assert not torch.allclose(critic.q1(obs, act), critic(obs, act)[1])


def test_actor_loss_does_not_differentiate_lambda():
    obs = torch.ones(4, 1)
    w = torch.tensor(0.3, requires_grad=True)
    loss, lmbda = td3_bc.actor_loss(lambda o: w * o, LinearTwin(1.0, 1.0), (obs, torch.zeros(4, 1)), alpha=1.0)
    loss.backward()
    # with lambda a constant: d/dw [-lambda (1 + w) + w^2] = -lambda + 2w
    assert w.grad.item() == pytest.approx(-lmbda.item() + 0.6)


def test_state_normalisation():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(10_000, 4)).astype(np.float32)
    mean, std = td3_bc.compute_mean_std(x)
    assert np.allclose(mean, x.mean(0)) and np.allclose(std, x.std(0) + 1e-3)
    z = (x - mean) / std
    assert np.allclose(z.mean(0), 0, atol=1e-4) and np.allclose(z.std(0), 1, atol=1e-3)


def test_split_is_by_trajectory_deterministic_and_hides_actions(fake_datasets):
    args = td3_bc.Args(datasets_dir=str(fake_datasets), labeled_fraction=0.2, split_seed=3)
    a, b = td3_bc.load_dataset(args), td3_bc.load_dataset(args)
    assert np.array_equal(a["labeled_episodes"], b["labeled_episodes"]) and len(a["labeled_episodes"]) == 4
    c = td3_bc.load_dataset(td3_bc.Args(datasets_dir=str(fake_datasets), labeled_fraction=0.2, split_seed=4))
    assert not np.array_equal(a["labeled_episodes"], c["labeled_episodes"])
    with h5py.File(fake_datasets / "cheetah-run" / "medium-replay.hdf5") as f:
        true_actions = f["actions"][:]
    for e, (s, t) in enumerate(zip(a["episode_starts"], a["episode_ends"], strict=True)):
        assert t - s == 50
        inside = a["labeled"][s:t]
        assert inside.all() or not inside.any()  # whole trajectories
        if e in a["labeled_episodes"]:
            assert np.array_equal(a["actions"][s:t], true_actions[s:t])
        else:
            assert np.isnan(a["actions"][s:t]).all()  # action-free: no action reaches the algorithm
    full = td3_bc.load_dataset(td3_bc.Args(datasets_dir=str(fake_datasets), labeled_fraction=1.0))
    assert full["labeled"].all() and np.array_equal(full["actions"], true_actions)


def test_bad_datasets_get_clear_errors(tmp_path):
    def error(path_setup, **kw):
        path = tmp_path / "d" / "cheetah-run" / "medium-replay.hdf5"
        if path.exists():
            path.unlink()
        path_setup(path)
        with pytest.raises(SystemExit) as e:
            td3_bc.load_dataset(td3_bc.Args(datasets_dir=str(tmp_path / "d"), **kw))
        return str(e.value)

    assert "python collect_data.py --env cheetah-run --kinds medium-replay" in error(lambda p: None)
    assert "--labeled-fraction must be in (0, 1]" in error(write_dataset, labeled_fraction=0.0)
    assert "--labeled-fraction must be in (0, 1]" in error(write_dataset, labeled_fraction=1.5)

    def drop_key(p):
        write_dataset(p)
        with h5py.File(p, "a") as f:
            del f["rewards"]

    assert "lacks the keys rewards" in error(drop_key)

    def bad_shape(p):
        write_dataset(p)
        with h5py.File(p, "a") as f:
            a = f["actions"][:]
            del f["actions"]
            f["actions"] = a[:-1]

    assert "actions has shape" in error(bad_shape)

    def nan(p):
        write_dataset(p)
        with h5py.File(p, "a") as f:
            f["observations"][3, 2] = np.nan

    assert "observations holds NaN" in error(nan)


def test_smoke_run_resume_and_summary(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--run-name", "smoke",
             "--labeled-fraction", "0.5", "--batch-size", "32", "--eval-every", "100", "--eval-episodes", "1",
             "--final-eval-episodes", "3"]  # fmt: skip
    run_script("td3_bc.py", *flags, "--total-steps", "100")
    run_dir = tmp_path / "runs" / "smoke"
    again = run_script("td3_bc.py", *flags, "--total-steps", "200", check=False)
    assert again.returncode != 0 and "--resume" in again.stderr
    # a resumed run refuses other settings than its own, naming them
    other = run_script("td3_bc.py", *flags, "--total-steps", "200", "--resume", "--alpha", "3", check=False)
    message = f"error: {run_dir / 'checkpoint.pt'} was made with --alpha 2.5 (this run: 3.0): pass the same values"
    assert other.stderr.strip().startswith(message) and "\n" not in other.stderr.strip()
    # a full disk while the next checkpoint is written: one line, and the previous checkpoint survives
    (run_dir / "checkpoint.pt.tmp").symlink_to("/dev/full")
    full = run_script("td3_bc.py", *flags, "--total-steps", "200", "--resume", check=False)
    assert full.stderr.strip().startswith(f"error: cannot write {run_dir / 'checkpoint.pt'} (No space left on device)")
    assert "\n" not in full.stderr.strip()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 100
    # as if the first 100 steps had run other code: the resumed run records both commits
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(state["settings"]["commits"]) == 1
    state["settings"]["commits"] = ["0" * 40]
    torch.save(state, run_dir / "checkpoint.pt")
    out = run_script("td3_bc.py", *flags, "--total-steps", "200", "--resume", "--save-model")
    assert (
        "resumed" in out.stdout
        and "resuming with changed flags: --save-model False -> True, --total-steps 100 -> 200" in out.stdout
    )
    assert f"resuming with other code: {'0' * 40} -> " in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["git_commits"] == ["0" * 40, summary["git_commit"]] and summary["git_commit"] != "0" * 40
    assert [e["step"] for e in summary["evaluations"]] == [100, 200]
    assert summary["flag_changes"] == ["--save-model False -> True", "--total-steps 100 -> 200"]  # recorded
    assert summary["final_normalized_score"] == pytest.approx(summary["final_return"] / 10)
    assert summary["final_eval_episodes"] == 3 and summary["final_return_stderr"] >= 0
    assert len(summary["labeled_episodes"]) == 10 and summary["args"]["labeled_fraction"] == 0.5
    for key in ("best_normalized_score", "git_commit"):
        assert key in summary
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert {"actor", "critic", "actor_optimizer", "obs_mean", "settings"} <= set(state)
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_final_evaluation_is_the_result_with_its_standard_error(tmp_path):
    """The shared final evaluation: --final-eval-episodes episodes at the run's seed, their mean and std / sqrt(n);
    summary.json reports it as the result and keeps the best periodic evaluation beside it."""
    from dataclasses import replace

    from torch.utils.tensorboard import SummaryWriter

    args, attrs = td3_bc.Args(final_eval_episodes=4, seed=3, eval_episodes=1), {"episode_length": 20, "action_repeat": 1}

    def random_policies():  # a fresh, seeded random policy stream, so that two evaluations see the same actions
        rng = np.random.default_rng(0)
        return lambda: (lambda obs: rng.uniform(-1, 1, 6).astype(np.float32))

    writer = SummaryWriter(str(tmp_path))
    final = td3_bc.final_evaluation(args, random_policies(), attrs, writer, step=7)
    returns, rewards, _ = td3_bc.evaluate(replace(args, eval_episodes=4), random_policies(), attrs, seed=args.seed)
    assert len(rewards) == 4 and all(len(r) == 20 for r in rewards) and returns.std() > 0
    assert final["final_eval_episodes"] == 4
    assert final["final_return"] == pytest.approx(returns.mean())
    assert final["final_return_stderr"] == pytest.approx(returns.std(ddof=1) / 2)
    one = td3_bc.final_evaluation(replace(args, final_eval_episodes=1), random_policies(), attrs, writer, step=7)
    assert one["final_return_stderr"] is None  # no spread from one episode
    settings = {"script": "td3_bc.py", "dataset_sha256": "a" * 64, "changes": [], "commits": ["c"]}
    td3_bc.write_summary(tmp_path, args, settings, [(1, 50.0), (2, 30.0)], final, [0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_return"] == final["final_return"] and summary["final_return_stderr"] == final["final_return_stderr"]
    assert summary["final_normalized_score"] == pytest.approx(final["final_return"] / 10)
    assert summary["best_normalized_score"] == 5.0 and summary["final_eval_episodes"] == 4
    td3_bc.write_summary(tmp_path, args, settings, [], final, [0])  # evaluation only: no periodic evaluation
    assert json.loads((tmp_path / "summary.json").read_text())["best_normalized_score"] is None
