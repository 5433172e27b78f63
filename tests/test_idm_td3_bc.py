"""idm_td3_bc.py: the IDM's input windows, that it learns inverse dynamics, and a smoke run."""

import json

import numpy as np
import pytest
from conftest import rendering_env, run_script

import idm_td3_bc


def test_idm_window_never_crosses_an_episode_start():
    obs = np.arange(10, dtype=np.float32)[:, None] * 10  # o_t = 10 t
    nxt = obs + 1  # a visible stand-in for o_{t+1}
    starts = np.repeat([0, 4], [4, 6])  # episodes [0, 4) and [4, 10)
    x = idm_td3_bc.idm_inputs(obs, nxt, starts, window=3)  # [o_{t-1}, o_t, o_{t+1}]
    assert x.shape == (10, 3)
    assert x[0].tolist() == [0, 0, 1]  # o_{-1} does not exist: repeats o_0
    assert x[3].tolist() == [20, 30, 31]
    assert x[4].tolist() == [40, 40, 41]  # the second episode does not see the first one
    assert x[9].tolist() == [80, 90, 91]
    assert idm_td3_bc.idm_inputs(obs, nxt, starts, window=2)[5].tolist() == [50, 51]


def test_smoke_run_idm_learns_and_labels(fake_datasets, tmp_path):
    out = run_script(
        "idm_td3_bc.py", "--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--run-name", "smoke",
        "--labeled-fraction", "0.5", "--idm-steps", "1500", "--idm-eval-every", "100", "--total-steps", "100",
        "--batch-size", "32", "--eval-every", "100", "--eval-episodes", "1", "--capture-video", "--video-size", "32",
        env=rendering_env(),
    )  # fmt: skip
    summary = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    assert (tmp_path / "runs" / "smoke" / "videos" / "eval_100.mp4").stat().st_size > 0
    # the synthetic actions are a smooth function of (o_t, o_{t+1}): a working IDM recovers most of them
    assert summary["idm_val_r2"] > 0.5, out.stdout
    assert summary["idm_val_mse"] < 0.1
    assert len(summary["labeled_episodes"]) == 10


def test_idm_needs_two_labeled_trajectories(fake_datasets, tmp_path):
    out = run_script("idm_td3_bc.py", "--datasets-dir", fake_datasets, "--runs-dir", tmp_path, "--labeled-fraction", "0.05",
                     check=False)  # fmt: skip
    assert out.returncode != 0 and "at least 2 labeled trajectories" in out.stderr


@pytest.mark.parametrize("window", [0, 1])
def test_bad_window(fake_datasets, tmp_path, window):
    out = run_script("idm_td3_bc.py", "--datasets-dir", fake_datasets, "--runs-dir", tmp_path, "--idm-window", window,
                     check=False)  # fmt: skip
    assert out.returncode != 0 and "--idm-window must be at least 2" in out.stderr
