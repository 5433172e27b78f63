"""c_lap.py: the KL terms, free nats and KL balancing, lambda-returns, the window sampler, the policy
constraint, and a smoke run."""

import json

import numpy as np
import pytest
import torch
from conftest import rendering_env, run_script

import c_lap
import lawm


def test_kl_gaussian_matches_torch_distributions():
    torch.manual_seed(0)
    m1, m2 = torch.randn(7, 5), torch.randn(7, 5)
    s1, s2 = torch.rand(7, 5) + 0.1, torch.rand(7, 5) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2)).sum(
        -1
    )
    assert torch.allclose(c_lap.kl_gaussian(m1, s1, m2, s2), expected, atol=1e-5)
    assert torch.allclose(c_lap.kl_gaussian(m1, s1, m1, s1), torch.zeros(7), atol=1e-6)


def test_free_nats_clamp_the_mean_kl():
    post = (torch.zeros(4, 3), torch.ones(4, 3))
    prior = (torch.full((4, 3), 0.1), torch.ones(4, 3))  # KL = 3 * 0.005 = 0.015 per row
    loss, kl = c_lap.kl_loss(post, prior, balance=0.8, free_nats=1.0)
    assert kl.item() == pytest.approx(0.015, rel=1e-4)
    assert loss.item() == pytest.approx(1.0)  # below the free nats: a constant, no gradient
    loss, _ = c_lap.kl_loss(post, prior, balance=0.8, free_nats=0.0)
    assert loss.item() == pytest.approx(0.015, rel=1e-4)


@pytest.mark.parametrize("module", ["c_lap", "lawm"])
def test_free_nats_default_follows_the_paper(module):
    default_free_nats = __import__(module).default_free_nats
    for dataset in ("medium-replay", "plan2explore"):
        assert default_free_nats(dataset) == 1.0
    for dataset in ("expert", "medium", "random"):
        assert default_free_nats(dataset) == 0.0


def test_kl_balancing_splits_the_gradient():
    post_mean = torch.zeros(2, 3, requires_grad=True)
    prior_mean = torch.ones(2, 3, requires_grad=True)
    std = torch.ones(2, 3)
    loss, _ = c_lap.kl_loss((post_mean, std), (prior_mean, std), balance=0.8, free_nats=0.0)
    loss.backward()
    # KL = sum 0.5 (m_post - m_prior)^2 per row, mean over 2 rows: dKL/dm = +-(m_post - m_prior) / 2
    assert torch.allclose(prior_mean.grad, torch.full((2, 3), 0.8 * 0.5))
    assert torch.allclose(post_mean.grad, torch.full((2, 3), -0.2 * 0.5))


def test_lambda_return_by_hand():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])  # H = 3
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    g, lam = 0.5, 0.5
    r3 = 40.0
    r2 = 3 + g * ((1 - lam) * 40 + lam * r3)  # 23
    r1 = 2 + g * ((1 - lam) * 30 + lam * r2)  # 15.25
    r0 = 1 + g * ((1 - lam) * 20 + lam * r1)  # 9.8125
    out = c_lap.lambda_return(rewards, values, g, lam)
    assert torch.allclose(out[:, 0], torch.tensor([r0, r1, r2]))
    # lambda = 0: one-step TD targets; lambda = 1: discounted reward sum bootstrapped at the end
    assert torch.allclose(c_lap.lambda_return(rewards, values, g, 0.0)[:, 0], torch.tensor([11.0, 17.0, 23.0]))
    assert torch.allclose(
        c_lap.lambda_return(rewards, values, g, 1.0)[:, 0], torch.tensor([1 + 1 + 0.75 + 5, 2 + 1.5 + 10, 3 + 20.0])
    )


def test_window_sampler_never_crosses_an_episode_end():
    starts, ends = np.array([0, 10, 13, 40]), np.array([10, 13, 40, 45])
    valid = c_lap.window_starts(starts, ends, [0, 1, 2, 3], seq_len=5)
    assert set(valid) == set(range(0, 6)) | set(range(13, 36)) | {40}  # episode 1 (3 steps) is too short
    torch.manual_seed(0)
    idx = c_lap.sample_windows(valid, 2000, 5, torch.device("cpu")).numpy()
    episode = np.searchsorted(ends, idx, side="right")  # the episode of every index
    assert (episode == episode[:, :1]).all()
    assert set(idx[:, 0]) == set(valid)  # every valid start is reachable
    assert len(c_lap.window_starts(starts, ends, [1], seq_len=5)) == 0


def test_policy_latent_action_stays_inside_the_prior_support():
    torch.manual_seed(0)
    args = c_lap.Args(deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3, epsilon=0.5)
    wm = c_lap.WorldModel(5, 2, args)
    actor = c_lap.LatentActor(20, 3, 16, 2)
    with torch.no_grad():  # an extreme actor: its pre-tanh mean is huge
        actor.net[-1].bias.fill_(50.0)
    feat = torch.randn(256, 20) * 3
    b, _ = actor(feat)
    u = c_lap.constrained_latent_action(wm, feat, b, args.epsilon)
    mean, std = wm.u_prior(feat)
    assert ((u - mean).abs() <= args.epsilon * std + 1e-5).all()
    feats, log_probs = c_lap.imagine(wm, actor, torch.zeros(8, 16), torch.zeros(8, 4), horizon=4, epsilon=args.epsilon)
    assert feats.shape == (5, 8, 20) and log_probs.shape == (4, 8)


def test_elbo_terms_and_shapes():
    torch.manual_seed(0)
    args = c_lap.Args(deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3)
    wm = c_lap.WorldModel(5, 2, args)
    obs, actions, rewards = torch.randn(3, 7, 5), torch.rand(3, 6, 2) * 2 - 1, torch.randn(3, 6)
    loss, metrics, states = c_lap.elbo_loss(wm, obs, actions, rewards, args, free_nats=0.0)
    assert states["feat"].shape == (3, 7, 20) and states["u"].shape == (3, 6, 3)
    parts = metrics["obs_loss"] + metrics["reward_loss"] + metrics["action_loss"] + metrics["kl_z"] + metrics["kl_u"]
    assert torch.allclose(loss, parts)  # with no free nats the balanced KL equals the KL in value
    loss.backward()
    assert all(p.grad is not None for p in wm.u_posterior.parameters())


def test_smoke_run(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--run-name", "smoke",
             "--labeled-fraction", "0.5", "--batch-size", "4", "--seq-len", "10", "--deter-dim", "32",
             "--stoch-dim", "4", "--hidden-dim", "32", "--horizon", "3", "--log-every", "5", "--eval-every", "10",
             "--eval-episodes", "1", "--final-eval-episodes", "2"]  # fmt: skip
    run_script("c_lap.py", *flags, "--model-steps", "10", "--agent-steps", "10", "--save-model", "--capture-video",
               "--video-size", "32", env=rendering_env())  # fmt: skip
    run_dir = tmp_path / "runs" / "smoke"
    assert (run_dir / "videos" / "eval_10.mp4").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [10]
    assert summary["free_nats"] == 1.0  # the fake dataset is a medium-replay one
    # the saved world model trains a new agent without training the model again
    out = run_script("c_lap.py", *flags[:5], "smoke2", *flags[6:], "--model-steps", "10", "--agent-steps", "10",
                     "--model-checkpoint", run_dir / "model.pt")  # fmt: skip
    assert "loaded the world model" in out.stdout and "model step" not in out.stdout
    for key in ("u_inside_constraint", "imagined_reward", "real_reward", "model_reward", "imagined_minus_real_reward"):
        assert isinstance(summary[key], float), key
    # --agent-steps 0: the saved actor evaluated again, the same final evaluation as its run's, bit for bit
    out = run_script("c_lap.py", *flags[:5], "smoke3", *flags[6:], "--model-steps", "10", "--agent-steps", "0",
                     "--model-checkpoint", run_dir / "model.pt")  # fmt: skip
    again = json.loads((tmp_path / "runs" / "smoke3" / "summary.json").read_text())
    assert "evaluation only" in out.stdout and again["final_return"] == summary["final_return"]


def test_resume_continues_both_phases(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--run-name", "r", "--labeled-fraction", "0.5",
             "--batch-size", "4", "--seq-len", "10", "--deter-dim", "32", "--stoch-dim", "4", "--hidden-dim", "32",
             "--horizon", "3", "--log-every", "5", "--eval-every", "5", "--eval-episodes", "1",
             "--final-eval-episodes", "1"]  # fmt: skip
    run_script("c_lap.py", *flags, "--model-steps", "5", "--agent-steps", "5")
    out = run_script("c_lap.py", *flags, "--model-steps", "10", "--agent-steps", "10", "--resume")
    assert "resumed" in out.stdout and "at model step 5, agent step 5" in out.stdout
    assert "model step 10/10" in out.stdout  # the world model trains on, then the agent
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [5, 10]


# the pieces c_lap.py and lawm.py share (the same text in both, tests/test_shared_blocks.py), tested on both


@pytest.mark.parametrize("module", [c_lap, lawm])
def test_share_inside_constraint(module):
    u = torch.tensor([[0.0, 0.0], [0.5, 2.0], [-1.5, 0.2]])
    inside, per_dim = module.share_inside_constraint(u, torch.zeros(3, 2), torch.ones(3, 2), epsilon=1.0)
    assert inside == pytest.approx(1 / 3) and per_dim == pytest.approx(4 / 6)  # rows 1; elements 1, 1, 1, 0, 0, 1
    # a prior N(1, 2^2) with epsilon 0.5: the box is [0, 2] in every dimension
    inside, per_dim = module.share_inside_constraint(u, torch.ones(3, 2), torch.full((3, 2), 2.0), epsilon=0.5)
    assert inside == pytest.approx(2 / 3) and per_dim == pytest.approx(5 / 6)  # all in but the -1.5
    # the actor's own latent actions are always inside
    torch.manual_seed(0)
    args = module.Args(deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3, epsilon=0.5)
    wm, feat = module.WorldModel(5, 2, args), torch.randn(64, 20)
    u = module.constrained_latent_action(wm, feat, torch.rand(64, 3) * 2 - 1, args.epsilon)
    assert module.share_inside_constraint(u, *wm.u_prior(feat), args.epsilon) == (1.0, 1.0)


@pytest.mark.parametrize("module", [c_lap, lawm])
def test_reward_gap_by_hand(module):
    real = [np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0])]
    model = [[1.5, 2.5], [1.0]]  # the first T - 1 steps of each episode
    gap = module.reward_gap(2.0, real, model)
    assert gap["imagined_reward"] == 2.0 and gap["real_reward"] == pytest.approx(6 / 5)
    assert gap["model_reward"] == pytest.approx(5 / 3)
    assert gap["imagined_minus_real_reward"] == pytest.approx(2.0 - 6 / 5)
    assert gap["model_minus_real_reward"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # against rewards 1, 2 and 0


@pytest.mark.parametrize("module", [c_lap, lawm])
def test_eval_filter(module):
    """`actor` advances the filter with the actor's u_t, `executed` with the mean of q(u_t | s_t, a_t) of the action
    sent; where q(u | s, a) gives back the actor's u the two are the same."""
    torch.manual_seed(0)
    args = module.Args(deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3)
    wm, actor, obs = module.WorldModel(5, 2, args), module.LatentActor(20, 3, 16, 2), torch.randn(4, 1, 5)

    def run(eval_filter):
        memory, out = {"h": torch.zeros(1, 16), "z": None, "u": None}, []
        for o in obs:
            action, reward = module.policy_step(wm, actor, memory, o, args.epsilon, eval_filter)
            feat = torch.cat([memory["h"], memory["z"]], -1)
            out.append((action, reward, feat, memory["u"]))
        return out

    with torch.no_grad():
        for eval_filter in ("actor", "executed"):
            for t, (action, reward, feat, u) in enumerate(run(eval_filter)):
                u_actor = module.constrained_latent_action(wm, feat, actor(feat, deterministic=True)[0], args.epsilon)
                assert torch.equal(action, wm.action_decoder(torch.cat([feat, u_actor], -1)).clamp(-1, 1))
                expected = u_actor if eval_filter == "actor" else wm.u_posterior(torch.cat([feat, action], -1))[0]
                assert torch.equal(u, expected) and not torch.allclose(
                    u_actor, wm.u_posterior(torch.cat([feat, action], -1))[0]
                )
                assert (reward is None) == (t == 0) and (t == 0 or torch.equal(reward, wm.reward_decoder(feat)[:, 0]))
        differs = run("actor"), run("executed")
        assert not torch.allclose(differs[0][-1][0], differs[1][-1][0])  # the filters part: other actions later
        del wm.u_posterior  # a q(u | s, a) that returns the actor's u: then the filters agree
        wm.u_posterior = lambda x: (
            module.constrained_latent_action(wm, x[:, :20], actor(x[:, :20], deterministic=True)[0], args.epsilon),
            None,
        )
        for (a1, r1, _, u1), (a2, r2, _, u2) in zip(run("actor"), run("executed"), strict=True):
            assert torch.equal(a1, a2) and torch.equal(u1, u2) and (r1 is None or torch.equal(r1, r2))


def kl_balanced(post, prior, balance, free_nats=0.0):
    """KL balancing by hand with torch.distributions: `balance` of the gradient to the prior, each side's mean KL
    clamped below at `free_nats`."""
    kl = (
        lambda q, p: torch.distributions.kl_divergence(  # noqa: E731
            torch.distributions.Normal(*q), torch.distributions.Normal(*p)
        )
        .sum(-1)
        .mean()
    )
    sg = lambda d: tuple(x.detach() for x in d)  # noqa: E731
    return balance * kl(sg(post), prior).clamp(min=free_nats) + (1 - balance) * kl(post, sg(prior)).clamp(min=free_nats)


@pytest.mark.parametrize("module", [c_lap, lawm])
def test_loss_knobs_by_hand(module):
    """The world model's loss (value and gradient) by hand: the defaults (c_lap.py: u-KL balanced like the z-KL; lawm.py:
    u-KL at the ELBO's weight 1 on the posterior; action term at weight 1; free nats of the u-KL those of the z-KL); the
    knobs change only what they name."""
    nll = lambda x, mean: (0.5 * (x - mean) ** 2 + 0.5 * np.log(2 * np.pi)).sum(-1).mean()  # noqa: E731
    obs, actions, rewards = torch.randn(3, 7, 5), torch.rand(3, 6, 2) * 2 - 1, torch.randn(3, 6)
    n_ac = 3 if module is c_lap else 2  # lawm: the first two windows have actions, the third is action-free
    default_u = 0.8 if module is c_lap else 0.0  # lawm.py: the whole u-KL on the posterior (its prior has no parameters)
    cases = (
        ({}, (default_u, 1.0, 0.0)),
        ({"kl_balance_u": 0.3, "action_loss_coef": 2.5}, (0.3, 2.5, 0.0)),
        ({"free_nats_u": 2.0}, (default_u, 1.0, 2.0)),
    )
    for knobs, (balance_u, coef, free_nats_u) in cases:
        args = module.Args(deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3, kl_balance=0.8, **knobs)
        torch.manual_seed(0)
        wm = module.WorldModel(5, 2, args)
        loss_fn = c_lap.elbo_loss if module is c_lap else lawm.unified_elbo_loss
        loss, metrics, s = loss_fn(wm, obs, actions[:n_ac], rewards, args, free_nats=0.0)
        assert free_nats_u == 0 or metrics["kl_u"] < free_nats_u  # the clamp acts on this small model's u-KL
        feat = s["feat"]
        action_term = nll(actions[:n_ac], wm.action_decoder(torch.cat([feat[:n_ac, :-1], s["u"][:n_ac]], -1)))
        by_hand = (
            nll(obs, wm.obs_decoder(feat))
            + nll(rewards[..., None], wm.reward_decoder(feat[:, 1:]))
            + kl_balanced((s["zq_mean"], s["zq_std"]), (s["zp_mean"], s["zp_std"]), 0.8)
            + kl_balanced((s["uq_mean"], s["uq_std"]), (s["up_mean"], s["up_std"]), balance_u, free_nats_u)
        )
        if module is c_lap:
            by_hand = by_hand + coef * action_term
        else:  # the labeled terms count with the labeled share of the batch; the alignment term at align_coef 1
            align = kl_balanced((s["uq_mean"][:n_ac], s["uq_std"][:n_ac]), (s["idm_mean"], s["idm_std"]), 1.0)
            by_hand = by_hand + n_ac / len(obs) * (coef * action_term + align)
        assert torch.allclose(loss, by_hand, rtol=1e-5)
        params = [p for p in wm.parameters()]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads_by_hand = torch.autograd.grad(by_hand, params, allow_unused=True)
        for g, h in zip(grads, grads_by_hand, strict=True):
            assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, rtol=1e-4, atol=1e-6))
