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
        "--eval-episodes", "1"]  # fmt: skip


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


def test_recovery_split_and_batch_composition():
    labeled = np.array([2, 5, 7, 11, 13, 17, 19, 23, 29, 31])
    trained, recovery = lawm.recovery_split(labeled, 0.2, split_seed=0)
    assert len(recovery) == 2 and len(trained) == 8 and set(trained) | set(recovery) == set(labeled)
    assert not set(trained) & set(recovery)
    again, recovery_again = lawm.recovery_split(labeled, 0.2, split_seed=0)
    assert (recovery_again == recovery).all() and (again == trained).all()  # deterministic for a split seed
    assert len(lawm.recovery_split(labeled, 0.01, 0)[1]) == 1  # at least one ...
    assert len(lawm.recovery_split(labeled[:2], 0.9, 0)[0]) == 1  # ... and never every labeled trajectory
    assert len(lawm.recovery_split(labeled[:1], 0.5, 0)[1]) == 0
    assert len(lawm.recovery_split(labeled, 0.0, 0)[1]) == 0
    # both kinds in every batch, in the ratio asked, while both kinds exist
    assert lawm.windows_with_actions(16, 0.25, has_action_free=True) == 4
    assert lawm.windows_with_actions(16, 0.01, has_action_free=True) == 1
    assert lawm.windows_with_actions(16, 0.99, has_action_free=True) == 15
    assert lawm.windows_with_actions(16, 1.0, has_action_free=True) == 16
    assert lawm.windows_with_actions(16, 0.25, has_action_free=False) == 16
    windows = lawm.consecutive_windows(np.array([0, 23]), np.array([23, 30]), [0, 1], seq_len=10)
    assert windows[:, 0].tolist() == [0, 10] and (windows == windows[:, :1] + np.arange(10)).all()


def test_action_recovery_scores_a_perfect_and_a_useless_decoder():
    torch.manual_seed(0)
    wm = lawm.WorldModel(5, 2, small_args())
    obs, true = torch.randn(3, 7, 5), torch.rand(3, 6, 2) * 1.6 - 0.8
    r2, mse = lawm.action_recovery(wm, obs, true)
    assert r2 < 0.5 and mse > 0
    del wm.action_decoder
    wm.action_decoder = lambda x: true  # a decoder that happens to return the true actions
    r2, mse = lawm.action_recovery(wm, obs, true)
    assert r2 == pytest.approx(1.0) and mse == pytest.approx(0.0)


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
    """Bit for bit at a fixed seed: new actions for every trajectory LAWM trains on without actions (D_af and the
    recovery set) leave every network unchanged; new actions for a trajectory it trains with change them."""
    path = tmp_path / "datasets" / "cheetah-run" / "medium-replay.hdf5"
    write_dataset(path)
    flags = ["--datasets-dir", tmp_path / "datasets", "--runs-dir", tmp_path / "runs", "--labeled-fraction", "0.3",
             "--recovery-fraction", "0.2", *TINY, "--eval-every", "6", "--model-steps", "6", "--agent-steps", "3"]  # fmt: skip
    run_script("lawm.py", *flags, "--run-name", "original")
    summary = json.loads((tmp_path / "runs" / "original" / "summary.json").read_text())
    labeled, recovery = summary["labeled_episodes"], summary["recovery_episodes"]
    assert len(labeled) == 6 and len(recovery) == 1
    action_free = sorted(set(range(20)) - set(labeled))
    change_actions(path, action_free + recovery, seed=1)
    run_script("lawm.py", *flags, "--run-name", "changed_action_free")
    changed = json.loads((tmp_path / "runs" / "changed_action_free" / "summary.json").read_text())
    original = final_state(tmp_path / "runs" / "original")
    assert same_networks(original, final_state(tmp_path / "runs" / "changed_action_free"))
    assert changed["evaluations"] == summary["evaluations"]
    assert changed["idm_action_mse"] != summary["idm_action_mse"]  # the recovery set's actions only reach the diagnostic
    # the control: the test can fail, since the actions of a trajectory trained with actions do matter
    change_actions(path, [e for e in labeled if e not in recovery][:1], seed=2)
    run_script("lawm.py", *flags, "--run-name", "changed_labeled")
    assert not same_networks(original, final_state(tmp_path / "runs" / "changed_labeled"))


def test_smoke_run_resume_and_model_reuse(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--labeled-fraction", "0.5", *TINY]
    out = run_script("lawm.py", *flags, "--run-name", "r", "--eval-every", "5", "--model-steps", "5", "--agent-steps", "5")
    assert re.search(r"9 trajectories with actions .* 11 without .* 1 of them labeled .* 1 of 4 windows", out.stdout)
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
    assert -10 < summary["idm_action_r2"] <= 1 and summary["idm_action_mse"] > 0 and len(summary["recovery_episodes"]) == 1
    out = run_script("lawm.py", *flags, "--run-name", "r2", "--eval-every", "5", "--model-steps", "10",
                     "--agent-steps", "5", "--model-checkpoint", run_dir / "model.pt")  # fmt: skip
    assert "loaded the world model" in out.stdout and "model step" not in out.stdout


def test_bad_flags_get_one_line_errors(fake_datasets, tmp_path):
    for flag, value in (("--labeled-ratio", "0"), ("--recovery-fraction", "1.0")):
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
