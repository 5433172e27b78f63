"""lawm.py: the action-free path never reads an action, the unified ELBO reduces to C-LAP's, the batch
composition, the action-recovery diagnostic, a smoke run and the README's main command."""

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, rendering_env, run_script, write_dataset

import c_lap
import lawm

TINY = ["--batch-size", "4", "--seq-len", "10", "--deter-dim", "32", "--stoch-dim", "4", "--hidden-dim", "32",
        "--latent-action-dim", "3", "--horizon", "3", "--num-values", "2", "--log-every", "5",
        "--eval-episodes", "1", "--final-eval-episodes", "2"]  # fmt: skip


def small_args(**kw) -> lawm.Args:
    return lawm.Args(deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3, **kw)


def test_elbo_reduces_to_c_lap_with_a_standard_normal_prior():
    """All windows labeled and the alignment term off: LAWM's unified ELBO is C-LAP's ELBO with p(u) = N(0, I)."""
    args_lawm, args_clap = small_args(align_coef=0.0), c_lap.Args(
        deter_dim=16, stoch_dim=4, hidden_dim=16, latent_action_dim=3
    )
    torch.manual_seed(0)
    wm_lawm = lawm.WorldModel(5, 2, args_lawm)
    wm_clap = c_lap.WorldModel(5, 2, args_clap)
    shared = {k: v for k, v in wm_lawm.state_dict().items() if not k.startswith("idm.")}
    missing, unexpected = wm_clap.load_state_dict(shared, strict=False)
    assert all(k.startswith("u_prior.") for k in missing) and not unexpected
    del wm_clap.u_prior
    wm_clap.u_prior = wm_lawm.u_prior  # the only difference left: C-LAP's prior network becomes N(0, I)
    obs, actions, rewards = torch.randn(3, 7, 5), torch.rand(3, 6, 2) * 2 - 1, torch.randn(3, 6)
    for free_nats in (0.0, 1.0):
        torch.manual_seed(1)
        loss_clap, metrics_clap, _ = c_lap.elbo_loss(wm_clap, obs, actions, rewards, args_clap, free_nats)
        torch.manual_seed(1)  # the same noise for z_t and u_t
        loss_lawm, metrics_lawm, _ = lawm.unified_elbo_loss(wm_lawm, obs, actions, rewards, args_lawm, free_nats)
        assert torch.allclose(loss_lawm, loss_clap, rtol=1e-6), (loss_lawm, loss_clap)
        for k, v in metrics_clap.items():
            assert torch.allclose(metrics_lawm[k], v, rtol=1e-6), k
    # with the alignment term on, LAWM adds KL(sg q(u|s,a) || q_idm(u|s,e')) >= 0
    torch.manual_seed(1)
    loss_align, metrics_align, _ = lawm.unified_elbo_loss(wm_lawm, obs, actions, rewards, small_args(align_coef=1.0), 1.0)
    assert metrics_align["align"] > 0
    assert torch.allclose(loss_align, loss_lawm + metrics_align["align"], rtol=1e-6)


def test_observe_takes_the_latent_action_by_the_kind_of_window():
    """The first B_ac windows infer u_t from (s_t, a_t), the others from (s_t, e_{t+1}) through the IDM."""
    torch.manual_seed(0)
    wm = lawm.WorldModel(5, 2, small_args())
    obs, actions = torch.randn(5, 7, 5), torch.rand(2, 6, 2) * 2 - 1  # 2 windows with actions, 3 without
    embed = wm.encoder(obs)
    s = wm.observe(embed, actions)
    feat = s["feat"][:, :-1]  # s_t for t = 1..L
    assert s["feat"].shape == (5, 7, 20) and s["uq_mean"].shape == (5, 6, 3) and s["idm_mean"].shape == (2, 6, 3)
    expected_ac = wm.u_posterior(torch.cat([feat[:2], actions], -1))[0]
    expected_af = wm.idm(torch.cat([feat[2:], embed[2:, 1:]], -1))[0]
    assert torch.allclose(s["uq_mean"][:2], expected_ac, atol=1e-6)
    assert torch.allclose(s["uq_mean"][2:], expected_af, atol=1e-6)
    assert torch.allclose(s["up_mean"], torch.zeros(5, 6, 3)) and torch.allclose(s["up_std"], torch.ones(5, 6, 3))


def test_u_kl_on_the_action_free_windows_alone_and_a_noisier_latent_action():
    """--kl-u-windows action-free replaces the u-KL of all windows by that of the IDM's windows only (the logged
    kl_u stays over all); --min-std-u bounds the std of q(u|s,a) and q_idm from below, not that of z."""
    torch.manual_seed(0)
    wm = lawm.WorldModel(5, 2, small_args())
    obs, actions, rewards = torch.randn(5, 7, 5), torch.rand(2, 6, 2) * 2 - 1, torch.randn(5, 6)
    torch.manual_seed(1)
    s = lawm.unified_elbo_loss(wm, obs, actions, rewards, small_args(), 0.0)[2]
    uq, up = (s["uq_mean"], s["uq_std"]), (s["up_mean"], s["up_std"])
    kl_mean = lambda windows: lawm.kl_gaussian(*(x[windows] for x in uq + up)).mean().item()  # noqa: E731
    # free nats between the two means: the clamp must act on the mean of the action-free windows, not of all
    for free_nats in (0.0, (kl_mean(slice(None)) + kl_mean(slice(2, None))) / 2):
        torch.manual_seed(1)
        loss_all, metrics_all, s = lawm.unified_elbo_loss(wm, obs, actions, rewards, small_args(), free_nats)
        torch.manual_seed(1)  # the same noise, so the same states
        args_af = small_args(kl_u_windows="action-free")
        loss_af, metrics_af, _ = lawm.unified_elbo_loss(wm, obs, actions, rewards, args_af, free_nats)
        uq, up = (s["uq_mean"], s["uq_std"]), (s["up_mean"], s["up_std"])
        kl_all = lawm.kl_loss(uq, up, 0.0, free_nats)[0]
        kl_af = lawm.kl_loss(tuple(x[2:] for x in uq), tuple(x[2:] for x in up), 0.0, free_nats)[0]
        assert not torch.allclose(kl_all, kl_af), (kl_all, kl_af)
        assert torch.allclose(loss_af - loss_all, kl_af - kl_all, atol=1e-5), (loss_af - loss_all, kl_af - kl_all)
        assert torch.equal(metrics_af["kl_u"], metrics_all["kl_u"])
    # no u-KL gradient reaches q(u|s,a) through the labeled windows' KL: with the other terms of those windows off
    # (actions, alignment) and the sampled u cut from the recurrence, q(u|s,a) gets no gradient at all
    wm.zero_grad()
    torch.manual_seed(1)
    args_cut = small_args(kl_u_windows="action-free", action_loss_coef=0.0, align_coef=0.0)
    step = wm.step
    wm.step = lambda h, z, u: step(h, z, u.detach())
    lawm.unified_elbo_loss(wm, obs, actions, rewards, args_cut, 0.0)[0].backward()
    assert all(p.grad is None or not p.grad.any() for p in wm.u_posterior.parameters())
    assert any(p.grad is not None and p.grad.any() for p in wm.idm.parameters())
    wm.step = step
    noisy = lawm.WorldModel(5, 2, small_args(min_std_u=0.8))
    s = noisy.observe(noisy.encoder(obs), actions)
    assert (s["uq_std"] >= 0.8).all() and (s["idm_std"] >= 0.8).all()
    assert noisy.z_posterior.min_std == noisy.z_prior.min_std == 0.1 and s["zq_std"].min() < 0.8


def test_the_action_free_path_cannot_reach_an_action():
    """Gradients of the action-free windows never touch the action posterior or decoder, and a batch without
    labeled windows runs with no action at all."""
    torch.manual_seed(0)
    args = small_args()
    wm = lawm.WorldModel(5, 2, args)
    obs, rewards = torch.randn(4, 7, 5), torch.randn(4, 6)
    loss, metrics, _ = lawm.unified_elbo_loss(wm, obs, torch.zeros(0, 6, 2), rewards, args, free_nats=0.0)
    loss.backward()
    assert torch.isfinite(loss) and "action_loss" not in metrics
    for module in (wm.u_posterior, wm.action_decoder):
        assert all(p.grad is None or (p.grad == 0).all() for p in module.parameters())
    assert any(p.grad is not None and (p.grad != 0).any() for p in wm.idm.parameters())


def test_recovery_set_and_batch_composition(fake_datasets):
    action_free = np.array([2, 5, 7, 11, 13, 17, 19, 23, 29, 31])
    recovery = lawm.recovery_set(action_free, 3, split_seed=0)
    assert len(recovery) == 3 and set(recovery) <= set(action_free) and (np.diff(recovery) > 0).all()
    assert (lawm.recovery_set(action_free, 3, split_seed=0) == recovery).all()  # deterministic for a split seed
    assert any((lawm.recovery_set(action_free, 3, split_seed=s) != recovery).any() for s in range(1, 4))
    assert (lawm.recovery_set(action_free, 50, 0) == action_free).all()  # all of them when there are fewer
    assert len(lawm.recovery_set(action_free, 0, 0)) == 0  # the diagnostic off
    # both kinds in every batch, in the ratio asked, while both kinds exist
    assert lawm.windows_with_actions(16, 0.25, has_action_free=True) == 4
    assert lawm.windows_with_actions(16, 0.01, has_action_free=True) == 1
    assert lawm.windows_with_actions(16, 0.99, has_action_free=True) == 15
    assert lawm.windows_with_actions(16, 1.0, has_action_free=True) == 16
    assert lawm.windows_with_actions(16, 0.25, has_action_free=False) == 16
    windows = lawm.consecutive_windows(np.array([0, 23]), np.array([23, 30]), [0, 1], seq_len=10)
    assert windows[:, 0].tolist() == [0, 10] and (windows == windows[:, :1] + np.arange(10)).all()


def test_recovery_actions_are_read_for_the_recovery_set_only(fake_datasets):
    """load_dataset hides the actions of the action-free trajectories; read_recovery_actions reads those of the
    recovery set, and no others, from the file."""
    args = lawm.Args(datasets_dir=str(fake_datasets), labeled_fraction=0.3)
    dataset = lawm.load_dataset(args)
    with h5py.File(dataset["path"], "r") as f:
        stored = f["actions"][()]
    action_free = np.setdiff1d(np.arange(20), dataset["labeled_episodes"])
    recovery = lawm.recovery_set(action_free, 4, args.split_seed)
    actions = lawm.read_recovery_actions(dataset, recovery)
    in_recovery = np.zeros(len(stored), dtype=bool)
    for e in recovery:
        in_recovery[dataset["episode_starts"][e] : dataset["episode_ends"][e]] = True
    assert np.isnan(dataset["actions"][in_recovery]).all()  # what training gets
    assert np.array_equal(actions[in_recovery], stored[in_recovery])  # what the diagnostic gets
    assert np.isnan(actions[~in_recovery]).all()


class ToyDecoder(torch.nn.Module):
    """p(a | s, u) of a toy model: a = tanh(s W_s + u W_u), reading u with weight `u_weight` (0: ignores u)."""

    def __init__(self, feat_dim: int, u_dim: int, act_dim: int, u_weight: float):
        super().__init__()
        self.feat_dim, self.w_s = feat_dim, torch.randn(feat_dim, act_dim) / feat_dim**0.5
        self.w_u = u_weight * torch.randn(u_dim, act_dim)

    def forward(self, x):
        return torch.tanh(x[..., : self.feat_dim] @ self.w_s + x[..., self.feat_dim :] @ self.w_u)


def test_action_recovery_and_its_controls_on_toy_models():
    """A decoder that returns the true actions scores R2 = 1, MSE = 0. With true actions that a toy decoder makes
    from the filtered states and the IDM's latent actions: if it ignores u (behaviour cloned from s_t alone), u = 0
    and u shuffled in time score as well as the IDM's u; if it reads u, only the IDM's own u recovers them."""
    torch.manual_seed(0)
    wm = lawm.WorldModel(5, 2, small_args())
    obs, true = torch.randn(6, 9, 5), torch.rand(6, 8, 2) * 1.6 - 0.8
    del wm.action_decoder
    wm.action_decoder = lambda x: true  # a decoder that happens to return the true actions
    scores = lawm.action_recovery(wm, obs, true)
    assert scores["r2"] == pytest.approx(1.0) and scores["mse"] == pytest.approx(0.0)
    for u_weight in (0.0, 2.0):
        wm.action_decoder = ToyDecoder(20, 3, 2, u_weight)
        torch.manual_seed(1)  # the same noise in the filter here and in action_recovery: the same states
        with torch.no_grad():
            s = wm.observe(wm.encoder(obs), torch.zeros(0, 8, 2))
            true = wm.action_decoder(torch.cat([s["feat"][:, :-1], s["uq_mean"]], -1))
        torch.manual_seed(1)
        scores = lawm.action_recovery(wm, obs, true)
        assert scores["r2"] == pytest.approx(1.0) and scores["mse"] == pytest.approx(0.0, abs=1e-10)
        if u_weight == 0:
            assert scores["r2_u_zero"] == scores["r2_u_shuffled"] == scores["r2"]
        else:
            assert scores["r2_u_zero"] < scores["r2"] - 0.2 and scores["r2_u_shuffled"] < scores["r2"] - 0.2, scores


def change_actions(path: Path, episodes, seed: int):
    """Overwrites the stored actions of `episodes` (0-based, file order) with other values in [-1, 1]."""
    with h5py.File(path, "r+") as f:
        ends = np.flatnonzero(f["timeouts"][:] | f["terminals"][:]) + 1
        starts = np.r_[0, ends[:-1]]
        actions = f["actions"][:]
        rng = np.random.default_rng(seed)
        for e in episodes:
            actions[starts[e] : ends[e]] = rng.uniform(-1, 1, actions[starts[e] : ends[e]].shape)
        f["actions"][...] = actions


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def same_networks(a: dict, b: dict) -> bool:
    return all(torch.equal(a[net][k], b[net][k]) for net in ("world_model", "actor", "values") for k in a[net])


def test_actions_of_action_free_trajectories_change_nothing(tmp_path):
    """Bit for bit at a fixed seed: new actions for every trajectory LAWM trains on without actions (D_af, the
    recovery set among them) leave every network and every evaluation unchanged, while the recovery diagnostic,
    which reads the recovery set's true actions, changes; new actions for a labeled trajectory change the networks."""
    path = tmp_path / "datasets" / "cheetah-run" / "medium-replay.hdf5"
    write_dataset(path)
    flags = ["--datasets-dir", tmp_path / "datasets", "--runs-dir", tmp_path / "runs", "--labeled-fraction", "0.3",
             "--recovery-episodes", "2", *TINY, "--eval-every", "6", "--model-steps", "6", "--agent-steps", "3"]  # fmt: skip
    run_script("lawm.py", *flags, "--run-name", "original")
    summary = json.loads((tmp_path / "runs" / "original" / "summary.json").read_text())
    labeled, recovery = summary["labeled_episodes"], summary["recovery_episodes"]
    action_free = sorted(set(range(20)) - set(labeled))
    assert len(labeled) == 6 and len(recovery) == 2 and set(recovery) <= set(action_free)
    change_actions(path, action_free, seed=1)
    run_script("lawm.py", *flags, "--run-name", "changed_action_free")
    changed = json.loads((tmp_path / "runs" / "changed_action_free" / "summary.json").read_text())
    original = final_state(tmp_path / "runs" / "original")
    assert same_networks(original, final_state(tmp_path / "runs" / "changed_action_free"))
    assert changed["evaluations"] == summary["evaluations"] and changed["final_return"] == summary["final_return"]
    for k in ("u_inside_constraint", "imagined_reward", "real_reward", "model_reward"):
        assert changed[k] == summary[k], k
    for k in ("idm_action_r2", "idm_action_mse", "idm_action_r2_u_zero", "idm_action_r2_u_shuffled"):
        assert changed[k] != summary[k], k  # the recovery set's actions reach the diagnostic, and only it
    # the control: the test can fail, since the actions of a trajectory trained with actions do matter
    change_actions(path, labeled[:1], seed=2)
    run_script("lawm.py", *flags, "--run-name", "changed_labeled")
    assert not same_networks(original, final_state(tmp_path / "runs" / "changed_labeled"))


def test_smoke_run_resume_and_model_reuse(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--labeled-fraction", "0.5", *TINY]
    out = run_script("lawm.py", *flags, "--run-name", "r", "--eval-every", "5", "--model-steps", "5", "--agent-steps", "5")
    assert re.search(r"10 trajectories with actions .* 10 without .* 10 of them scored .* 1 of 4 windows", out.stdout)
    out = run_script(
        "lawm.py", *flags, "--run-name", "r", "--eval-every", "5", "--model-steps", "10", "--agent-steps", "10",
        "--resume", "--save-model", "--capture-video", "--video-size", "32", env=rendering_env(),
    )  # fmt: skip
    assert "at model step 5, agent step 5" in out.stdout and "model step 10/10" in out.stdout
    assert [p.name for p in (tmp_path / "runs" / "r" / "videos").iterdir()] == ["eval_10.mp4"]  # from the resumed part
    assert "actions recovered by the IDM" in out.stdout
    run_dir = tmp_path / "runs" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["step"] for e in summary["evaluations"]] == [5, 10]
    assert -10 < summary["idm_action_r2"] <= 1 and summary["idm_action_mse"] > 0 and len(summary["recovery_episodes"]) == 10
    assert summary["final_eval_episodes"] == 2 and 0 <= summary["u_inside_constraint"] <= 1
    for key in ("idm_action_r2_u_zero", "idm_action_r2_u_shuffled", "imagined_minus_real_reward", "model_minus_real_reward"):
        assert isinstance(summary[key], float), key
    out = run_script("lawm.py", *flags, "--run-name", "r2", "--eval-every", "5", "--model-steps", "10",
                     "--agent-steps", "5", "--model-checkpoint", run_dir / "model.pt")  # fmt: skip
    assert "loaded the world model" in out.stdout and "model step" not in out.stdout
    # a saved model evaluated again, without training: the same final evaluation, bit for bit, with the actor's filter
    reuse = ["--model-checkpoint", run_dir / "model.pt", "--agent-steps", "0", "--model-steps", "10"]
    out = run_script("lawm.py", *flags, *reuse, "--run-name", "eval_actor")
    assert "loaded the actor" in out.stdout and "evaluation only" in out.stdout
    again = json.loads((tmp_path / "runs" / "eval_actor" / "summary.json").read_text())
    assert again["final_return"] == summary["final_return"] and again["evaluations"] == []
    run_script("lawm.py", *flags, *reuse, "--run-name", "eval_executed", "--eval-filter", "executed")
    executed = json.loads((tmp_path / "runs" / "eval_executed" / "summary.json").read_text())
    assert executed["args"]["eval_filter"] == "executed" and executed["final_eval_episodes"] == 2
    state = torch.load(run_dir / "model.pt", weights_only=True)
    torch.save(state | {"agent_step": 0}, tmp_path / "untrained.pt")  # as a checkpoint written before the actor trained
    out = run_script("lawm.py", *flags, *reuse, "--model-checkpoint", tmp_path / "untrained.pt", check=False)
    assert "holds no trained actor" in out.stderr and out.returncode != 0


def test_bad_flags_get_one_line_errors(fake_datasets, tmp_path):
    for flag, value in (
        ("--labeled-ratio", "0"),
        ("--recovery-episodes", "-1"),
        ("--kl-balance-u", "1.5"),
        ("--action-loss-coef", "-1"),
        ("--final-eval-episodes", "0"),
        ("--agent-steps", "0"),
    ):
        out = run_script("lawm.py", "--datasets-dir", fake_datasets, "--runs-dir", tmp_path, flag, value, check=False)
        assert out.returncode != 0 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


def test_readme_commands_run(fake_datasets, tmp_path):
    """The README's main command and its CPU recipe, shortened (later flags win) to tiny sizes and a few steps."""
    readme = (ROOT / "README.md").read_text()
    main = re.search(r"^python lawm\.py --env cheetah-run --dataset medium-replay\s*$", readme, re.M)
    assert main, "the README leads with `python lawm.py --env cheetah-run --dataset medium-replay`"
    recipe = re.search(r"^python lawm\.py --env cheetah-run --dataset medium-replay( --[a-z-]+ \S+)+\s*$", readme, re.M)
    assert recipe and "--model-steps" in recipe.group(0), "the README gives the CPU recipe"
    short = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path, *TINY, "--eval-every", "4",
             "--model-steps", "4", "--agent-steps", "4"]  # fmt: skip
    for name, command in (("main", main), ("recipe", recipe)):
        out = run_script("lawm.py", *command.group(0).split()[2:], *short, "--run-name", name)
        assert "final normalized score" in out.stdout
