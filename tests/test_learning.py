"""Learning checks that take minutes: run by hand with `python -m pytest -m slow`."""

import h5py
import pytest
from conftest import run_script


@pytest.mark.slow
def test_sac_learns_cheetah_run(tmp_path):
    """100 episodes of SAC on cheetah-run at an update-to-data ratio of 0.5 (about 10 minutes on 2 cores): a random
    policy returns about 7 (docs/datasets.md, the random kind) and at this ratio SAC reached half of its final return
    after 230 episodes; a working SAC passes 60 by episode 100. (The collection's default pace is slower up to
    episode 500, on purpose.)"""
    run_script(
        "collect_data.py", "--env", "cheetah-run", "--num-seeds", "1", "--train-episodes", "100", "--update-every", "2",
        "--trajectories-per-seed", "5", "--kinds", "expert", "--datasets-dir", tmp_path / "d", "--runs-dir", tmp_path / "r",
    )  # fmt: skip
    with h5py.File(tmp_path / "d" / "cheetah-run" / "expert.hdf5") as f:
        eval_return = f.attrs["snapshot_eval_returns"][0]
        data_return = f.attrs["return_mean"]
    assert eval_return > 60, eval_return
    assert data_return > 40, data_return
