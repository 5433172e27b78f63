"""Shared fixtures: small synthetic datasets in the format collect_data.py writes (SPEC §3)."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(path: Path, episodes: int = 20, episode_length: int = 50, obs_dim: int = 17, act_dim: int = 6,
                  seed: int = 0, env: str = "cheetah-run", kind: str = "medium-replay") -> dict:  # fmt: skip
    """A dataset with a known structure: a_t is a fixed linear function of (o_t, o_{t+1}), so an inverse
    dynamics model can learn it; rewards are a smooth function of the state. Returns the arrays."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2 * obs_dim, act_dim)) / np.sqrt(2 * obs_dim)
    obs, act, nxt = [], [], []
    for _ in range(episodes):
        o = rng.normal(size=(episode_length + 1, obs_dim)).astype(np.float32)
        obs.append(o[:-1])
        nxt.append(o[1:])
        act.append(np.tanh(np.concatenate([o[:-1], o[1:]], 1) @ w))
    n = episodes * episode_length
    data = {
        "observations": np.concatenate(obs).astype(np.float32),
        "actions": np.concatenate(act).astype(np.float32),
        "next_observations": np.concatenate(nxt).astype(np.float32),
        "terminals": np.zeros(n, dtype=bool),
        "timeouts": np.tile(np.arange(episode_length) == episode_length - 1, episodes),
    }
    data["rewards"] = np.tanh(data["next_observations"][:, 0]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.attrs.update(env=env, dataset=kind, action_repeat=2, episode_length=episode_length, obs_type="proprio",
                       format_version=1, collector="tests", collector_seeds=np.array([seed]))  # fmt: skip
    return data


@pytest.fixture
def fake_datasets(tmp_path):
    """`{tmp}/datasets/cheetah-run/medium-replay.hdf5` with 20 episodes of 50 steps."""
    write_dataset(tmp_path / "datasets" / "cheetah-run" / "medium-replay.hdf5")
    return tmp_path / "datasets"


def rendering_env() -> dict:
    """The environment for a run that renders (--capture-video): without the MUJOCO_GL=disable that importing a
    script in the test process set, so the script picks its own backend (EGL), as it does from a shell."""
    return {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}


def run_script(script: str, *flags, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), *map(str, flags)]
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out
