"""Every input is checked before any work (issue 14): dataset files that are damaged or wrong in any way, splits that
leave an algorithm nothing to learn from, checkpoints of other settings, run folders that cannot be written, a full
disk, and --capture-video. The shared blocks are one text in every script (test_shared_blocks.py), so their unit
tests run on td3_bc's copy; each script's own use of them runs in a subprocess."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, rendering_env, run_script, write_dataset

import c_lap
import td3_bc

SCRIPTS = ["td3_bc.py", "idm_td3_bc.py", "c_lap.py", "lawm.py"]
TINY = {  # a few steps at tiny sizes, so a run that passes the checks ends within seconds
    "td3_bc.py": ["--total-steps", "4", "--batch-size", "8", "--hidden-dim", "8"],
    "idm_td3_bc.py": ["--total-steps", "4", "--batch-size", "8", "--hidden-dim", "8", "--idm-steps", "4",
                      "--idm-eval-every", "2", "--idm-hidden-dim", "8", "--idm-batch-size", "8"],
    "c_lap.py": ["--model-steps", "2", "--agent-steps", "2", "--batch-size", "2", "--seq-len", "10", "--deter-dim", "8",
                 "--stoch-dim", "2", "--hidden-dim", "8", "--horizon", "2", "--num-values", "1", "--log-every", "2"],
    "lawm.py": ["--model-steps", "2", "--agent-steps", "2", "--batch-size", "2", "--seq-len", "10", "--deter-dim", "8",
                "--stoch-dim", "2", "--hidden-dim", "8", "--horizon", "2", "--num-values", "1", "--log-every", "2",
                "--latent-action-dim", "2"],
}  # fmt: skip
for tiny in TINY.values():  # the final evaluation's default of 50 episodes would take most of a test's time
    tiny += ["--final-eval-episodes", "2"]


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The run stopped with one line that starts with `error:`, and no traceback."""
    err = out.stderr.strip()
    assert out.returncode != 0 and err.startswith("error:") and "\n" not in err, out.stdout + out.stderr
    return err


def load_error(datasets: Path, **kw) -> str:
    """The message td3_bc's load_dataset stops with (one line, `error:`)."""
    with pytest.raises(SystemExit) as e:
        td3_bc.load_dataset(td3_bc.Args(datasets_dir=str(datasets), **kw))
    message = str(e.value)
    assert message.startswith("error:") and "\n" not in message, message
    return message


# 1. dataset files


def truncate(p: Path):
    write_dataset(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # a download or copy cut short


def not_hdf5(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("<html><body>404 Not Found</body></html>")  # what a failed download saves


def empty(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


def folder(p: Path):
    p.mkdir(parents=True)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (truncate, "is truncated or damaged (Unable to synchronously open file (truncated file"),
        (not_hdf5, "is not an HDF5 file (it starts with b'<html><b')"),
        (empty, "is empty"),
        (folder, "is a folder, not a dataset file"),
    ],
)
def test_unreadable_files(tmp_path, damage, expected):
    damage(tmp_path / "cheetah-run" / "medium-replay.hdf5")
    message = load_error(tmp_path)
    assert expected in message and "python collect_data.py --env cheetah-run --kinds medium-replay" in message


def test_unreadable_file_permissions(fake_datasets, monkeypatch):
    monkeypatch.setattr(td3_bc.os, "access", lambda path, mode: False)  # what a file of another user answers (not root)
    assert (
        load_error(fake_datasets)
        == f"error: cannot read {fake_datasets / 'cheetah-run' / 'medium-replay.hdf5'}: permission denied"
    )


def edit(p: Path, change):
    """A valid dataset file, then `change(f)` on it, opened for writing."""
    write_dataset(p)
    with h5py.File(p, "r+") as f:
        change(f)


def replace(key: str, make):
    """A change that replaces the array `key` by `make(old array)`."""

    def change(f):
        old = f[key][()]
        del f[key]
        f[key] = make(old)

    return change


def set_row(key: str, row, value):
    def change(f):
        a = f[key][()]
        a[row] = value
        f[key][...] = a

    return change


def swap_rows(f):  # two transitions of one episode out of order
    for key in td3_bc.DATASET_KEYS:
        a = f[key][()]
        a[[10, 11]] = a[[11, 10]]
        f[key][...] = a


def group_for(key: str):
    def change(f):
        del f[key]
        f.create_group(key)

    return change


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda f: f.attrs.__delitem__("episode_length"), "lacks the attributes episode_length"),
        (lambda f: f.attrs.__setitem__("dataset", "expert"), "holds the expert dataset (its attribute dataset), not medium"),
        (lambda f: f.attrs.__setitem__("obs_type", "pixels"), "holds pixels observations"),
        (lambda f: f.attrs.__setitem__("format_version", 2), "format version 2, newer than 1"),
        (lambda f: f.attrs.__setitem__("action_repeat", 0), "attribute action_repeat is 0, not a positive integer"),
        (lambda f: f.attrs.__setitem__("episode_length", 40), "an episode of 50 steps, longer than its attribute"),
        (group_for("actions"), "lacks the keys actions"),
        (replace("rewards", lambda a: a.astype("S8")), "rewards holds |S8 values, not numbers"),
        (replace("next_observations", lambda a: a[:, :-1]), "next_observations (1000, 16) != observations"),
        (replace("timeouts", lambda a: a[:, None]), "timeouts has shape (1000, 1), expected 1 dims"),
        (set_row("rewards", 7, np.inf), "rewards holds NaN or inf values"),
        (set_row("actions", 7, 3.0), "actions reach 3, outside [-1, 1]"),
        (replace("terminals", lambda a: np.where(np.arange(len(a)) == 3, 2, 0)), "terminals holds values other than 0 and 1"),
        (set_row("timeouts", -1, False), "the last transition does not end an episode"),
        (set_row("timeouts", 49, False), "an episode of 100 steps, longer than its attribute episode_length 50"),
        (swap_rows, "next_observations[9] is not observations[10] inside an episode"),
    ],
)  # fmt: skip
def test_wrong_contents(tmp_path, change, expected):
    edit(tmp_path / "cheetah-run" / "medium-replay.hdf5", change)
    assert expected in load_error(tmp_path)


def test_no_transitions(tmp_path):
    def change(f):
        for key in td3_bc.DATASET_KEYS:
            old = f[key][()]
            del f[key]
            f[key] = old[:0]

    edit(tmp_path / "cheetah-run" / "medium-replay.hdf5", change)
    assert "holds no transitions" in load_error(tmp_path)


def test_a_dataset_of_another_env(tmp_path):
    """The issue's case: a cheetah-run file in the folder of walker-walk; and files whose sizes do not fit the env."""
    write_dataset(tmp_path / "walker-walk" / "medium-replay.hdf5", env="cheetah-run")
    message = load_error(tmp_path, env="walker-walk")
    assert "holds cheetah-run data (its attribute env), not walker-walk" in message
    assert f"its place is {tmp_path / 'cheetah-run' / 'medium-replay.hdf5'}" in message
    write_dataset(tmp_path / "walker-walk" / "medium-replay.hdf5", env="walker-walk")  # 17 observations, walker has 24
    assert "observations of size 17, but walker-walk has 24" in load_error(tmp_path, env="walker-walk")
    write_dataset(tmp_path / "cheetah-run" / "medium-replay.hdf5", act_dim=3)
    assert "actions of size 3, but cheetah-run has 6" in load_error(tmp_path)
    assert "unknown env 'cheetah-walk'; valid names: acrobot-swingup" in load_error(tmp_path, env="cheetah-walk")


def test_a_valid_file_loads_with_its_fingerprint(fake_datasets):
    a = td3_bc.load_dataset(td3_bc.Args(datasets_dir=str(fake_datasets)))
    assert len(a["sha256"]) == 64 and a["path"] == fake_datasets / "cheetah-run" / "medium-replay.hdf5"
    assert td3_bc.load_dataset(td3_bc.Args(datasets_dir=str(fake_datasets), split_seed=5))["sha256"] == a["sha256"]


# 2. the split


def test_split_checks(fake_datasets):
    args = td3_bc.Args(datasets_dir=str(fake_datasets), labeled_fraction=0.1)
    data = td3_bc.load_dataset(args)  # 20 episodes of 50 steps, 2 labeled
    labeled, free = data["labeled_episodes"], np.setdiff1d(np.arange(20), data["labeled_episodes"])

    def error(*a, **kw):
        with pytest.raises(SystemExit) as e:
            td3_bc.check_split(data, args, *a, **kw)
        return str(e.value)

    td3_bc.check_split(data, args, labeled, free, 50, min_with_actions=2)  # passes
    td3_bc.check_split(data, args, labeled, [], 50, min_with_actions=2)  # no action-free trajectory: valid (100%)
    assert "needs at least 3 labeled trajectories to train on; --labeled-fraction 0.1 of 20 trajectories leaves 2" in error(
        labeled, free, 1, min_with_actions=3
    )
    assert "no labeled trajectory is 51 steps long (the longest has 50): lower --seq-len to 50" in error(
        labeled, free, 51, min_with_actions=1
    )
    data["episode_ends"] = data["episode_ends"].copy()
    data["episode_ends"][free] = data["episode_starts"][free] + 5  # short action-free trajectories
    assert "no action-free trajectory is 10 steps long (the longest has 5)" in error(labeled, free, 10, min_with_actions=1)
    td3_bc.check_split(data, args, labeled, [], 10, min_with_actions=1)  # c_lap reads no action-free trajectory


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        ("idm_td3_bc.py", ["--labeled-fraction", "0.05"], "idm_td3_bc.py needs at least 2 labeled trajectories"),
        ("c_lap.py", ["--seq-len", "60"], "no labeled trajectory is 60 steps long (the longest has 50)"),
        ("lawm.py", ["--seq-len", "60", "--labeled-fraction", "0.5"], "no labeled trajectory is 60 steps long"),
        ("c_lap.py", ["--seq-len", "1"], "--seq-len must be at least 2"),
        ("lawm.py", ["--batch-size", "1"], "--batch-size must be at least 2"),
    ],
)
def test_split_errors_of_each_script(fake_datasets, tmp_path, script, flags, expected):
    out = run_script(
        script, *TINY[script], "--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", *flags, check=False
    )
    assert expected in one_line_error(out)
    assert not (tmp_path / "runs").exists()  # stopped before the run folder


@pytest.mark.parametrize(
    "script, message",
    [("idm_td3_bc.py", "the IDM labels nothing"), ("lawm.py", "the action-recovery diagnostic is off")],
)
def test_every_trajectory_labeled_is_a_valid_split(fake_datasets, tmp_path, script, message):
    """--labeled-fraction 1.0 leaves no action-free trajectory: the scripts that learn from them train on the labeled
    ones alone (the 100% point of the label-fraction curve), and say so; LAWM's recovery diagnostic has no data."""
    flags = ["--eval-every", "2", "--eval-episodes", "1", "--final-eval-episodes", "1", "--run-name", "all"]
    out = run_script(script, *TINY[script], "--datasets-dir", fake_datasets, "--runs-dir", tmp_path, "--labeled-fraction",
                     "1.0", *flags)  # fmt: skip
    assert message in out.stdout
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["labeled_episodes"] == list(range(20)) and math.isfinite(summary["final_return"])
    if script == "lawm.py":  # every window has actions; a NaN world model would reach the imagined reward
        assert "20 trajectories with actions" in out.stdout and "0 without (0 windows)" in out.stdout
        assert "2 of 2 windows per batch have actions" in out.stdout
        assert summary["idm_action_r2"] is None and summary["recovery_episodes"] == []
        assert math.isfinite(summary["imagined_reward"]) and math.isfinite(summary["model_reward"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_issues_files_stop_every_script_before_any_work(tmp_path, script):
    """A truncated file, and a cheetah-run file in the walker-walk folder: one line, and no run folder."""
    truncate(tmp_path / "d" / "cheetah-run" / "medium-replay.hdf5")
    write_dataset(tmp_path / "d" / "walker-walk" / "medium-replay.hdf5", env="cheetah-run")
    for env, expected in (("cheetah-run", "is truncated or damaged"), ("walker-walk", "holds cheetah-run data")):
        out = run_script(script, *TINY[script], "--env", env, "--datasets-dir", tmp_path / "d",
                         "--runs-dir", tmp_path / "runs", "--labeled-fraction", "0.5", check=False)  # fmt: skip
        assert expected in one_line_error(out)
    assert not (tmp_path / "runs").exists()


# 3. checkpoints: --resume and --model-checkpoint


def test_check_settings(tmp_path):
    """A world model carries the settings it was trained with; a run that would reuse it with another env, dataset,
    split or size, from another script, or on a file whose content changed, is refused with the difference named."""
    dataset = {"sha256": "a" * 64, "path": tmp_path / "medium-replay.hdf5"}
    args = c_lap.Args(labeled_fraction=0.05, deter_dim=64)
    state = {"settings": c_lap.run_settings(c_lap.Args(labeled_fraction=1.0, deter_dim=64), dataset, "x")}
    path = tmp_path / "model.pt"

    def error(state, args, data=dataset):
        with pytest.raises(SystemExit) as e:
            c_lap.check_settings(path, state, args, data, c_lap.WORLD_MODEL_FLAGS)
        assert str(e.value).startswith("error:") and "\n" not in str(e.value)
        return str(e.value)

    assert "made with --labeled-fraction 1.0 (this run: 0.05)" in error(state, args)  # an Oracle model in a 5% run
    for flag, value in (("env", "walker-walk"), ("dataset", "expert"), ("split_seed", 3), ("deter_dim", 32)):
        other = c_lap.Args(**{"labeled_fraction": 1.0, "deter_dim": 64, flag: value})
        saved = getattr(c_lap.Args(deter_dim=64), flag)
        assert f"made with --{flag.replace('_', '-')} {saved} (this run: {value})" in error(state, other)
    same = c_lap.Args(labeled_fraction=1.0, deter_dim=64, seed=7, agent_steps=10)
    assert c_lap.check_settings(path, state, same, dataset, c_lap.WORLD_MODEL_FLAGS) == [
        "--seed 1 -> 7",
        "--agent-steps 100000 -> 10",
    ]
    assert "made from other data than" in error(state, same, {**dataset, "sha256": "b" * 64})
    # a checkpoint written before a flag existed: the flag counts at its default (a new flag keeps the old behaviour)
    older = {"settings": {**state["settings"], "args": dict(state["settings"]["args"])}}
    del older["settings"]["args"]["stoch_dim"]
    assert c_lap.check_settings(path, older, same, dataset, c_lap.WORLD_MODEL_FLAGS) == [
        "--seed 1 -> 7",
        "--agent-steps 100000 -> 10",
    ]
    assert "made with --stoch-dim 30 (this run: 16)" in error(
        older, c_lap.Args(labeled_fraction=1.0, deter_dim=64, stoch_dim=16)
    )
    assert "written by td3_bc.py, not c_lap.py" in error({"settings": {**state["settings"], "script": "td3_bc.py"}}, same)
    assert "records no settings" in error({"world_model": {}}, same)


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        td3_bc.load_checkpoint(tmp_path / "model.pt")
    torch.save({"settings": {}}, tmp_path / "model.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"^error: .*cut.pt cannot be read as a checkpoint \(.*\); a copy cut short\?$"):
        td3_bc.load_checkpoint(tmp_path / "cut.pt")


def test_model_checkpoint_of_other_settings_is_refused(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--eval-every", "2", "--eval-episodes", "1"]
    run_script("c_lap.py", *TINY["c_lap.py"], *flags, "--labeled-fraction", "1.0", "--run-name", "oracle", "--save-model")
    model = tmp_path / "runs" / "oracle" / "model.pt"
    out = run_script("c_lap.py", *TINY["c_lap.py"], *flags, "--labeled-fraction", "0.05", "--model-checkpoint", model,
                     check=False)  # fmt: skip
    assert f"error: {model} was made with --labeled-fraction 1.0 (this run: 0.05)" in one_line_error(out)
    out = run_script(
        "lawm.py", *TINY["lawm.py"], *flags, "--labeled-fraction", "0.5", "--model-checkpoint", model, check=False
    )  # (lawm.py needs action-free trajectories: --labeled-fraction 1.0 would stop at the split)
    assert "was written by c_lap.py, not lawm.py" in one_line_error(out)
    out = run_script("c_lap.py", *TINY["c_lap.py"], *flags, "--labeled-fraction", "1.0", "--deter-dim", "16",
                     "--model-checkpoint", model, check=False)  # fmt: skip
    assert "--deter-dim 8 (this run: 16)" in one_line_error(out)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["oracle"]  # nothing made for the refused runs
    out = run_script("c_lap.py", *TINY["c_lap.py"], *flags, "--labeled-fraction", "1.0", "--model-checkpoint", model,
                     "--run-name", "reuse", "--save-model")  # fmt: skip
    assert "loaded the world model" in out.stdout
    settings = torch.load(tmp_path / "runs" / "reuse" / "model.pt", weights_only=True)["settings"]
    assert settings["world_model_from"]["args"]["labeled_fraction"] == 1.0  # the reused model's own settings travel on


def test_run_folder_not_writable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="^error: cannot create|^error: cannot write to"):
        td3_bc.make_run_dir(td3_bc.Args(runs_dir=str(tmp_path / "file"), run_name="r"))

    def refuse(*a, **kw):  # what a read-only folder answers (root may write anywhere, so it is simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(td3_bc.tempfile, "TemporaryFile", refuse)
    with pytest.raises(SystemExit) as e:
        td3_bc.make_run_dir(td3_bc.Args(runs_dir=str(tmp_path / "runs"), run_name="r"))
    assert str(e.value) == f"error: cannot write to {tmp_path / 'runs' / 'r'}: Permission denied; pick another --runs-dir"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes fail as on a full disk")
def test_full_disk_keeps_the_previous_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    td3_bc.save_safely({"step": 1}, path)
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")  # the next write fills the disk
    with pytest.raises(SystemExit) as e:
        td3_bc.save_safely({"step": 2}, path)
    assert str(e.value).startswith(f"error: cannot write {path} (No space left on device); the previous one is kept")
    assert torch.load(path, weights_only=True) == {"step": 1} and not (tmp_path / "checkpoint.pt.tmp").exists()
    args, settings = td3_bc.Args(), {"script": "td3_bc.py", "dataset_sha256": "a" * 64, "changes": [], "commits": ["c"]}
    final = {"final_return": 10.0, "final_return_stderr": 1.0, "final_eval_episodes": 2}
    td3_bc.write_summary(tmp_path, args, settings, [(1, 10.0)], final, [0])
    (tmp_path / "summary.json.tmp").symlink_to("/dev/full")
    with pytest.raises(SystemExit, match="No space left on device"):
        td3_bc.write_summary(tmp_path, args, settings, [(1, 10.0), (2, 20.0)], final | {"final_return": 20.0}, [0])
    assert json.loads((tmp_path / "summary.json").read_text())["final_return"] == 10.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "summary.json"]


# 4. --capture-video


def test_capture_video(fake_datasets, tmp_path):
    """The first evaluation episode rendered offscreen: an mp4 in the run folder and a GIF in tensorboard."""
    import imageio_ffmpeg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_script("td3_bc.py", *TINY["td3_bc.py"], "--datasets-dir", fake_datasets, "--runs-dir", tmp_path, "--run-name", "v",
               "--eval-every", "2", "--eval-episodes", "2", "--capture-video", "--video-size", "32",
               env=rendering_env())  # fmt: skip
    videos = sorted((tmp_path / "v" / "videos").iterdir())
    assert [p.name for p in videos] == ["eval_2.mp4", "eval_4.mp4"]
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(videos[0]))
    assert frames == 50 and seconds == pytest.approx(1.0)  # 50 steps, 0.01 s x action repeat 2 each
    events = EventAccumulator(str(tmp_path / "v"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("eval/video")
    assert [i.step for i in images] == [2, 4] and images[0].width == 32
    assert images[0].encoded_image_string.startswith(b"GIF89a")


def test_capture_video_errors_and_off_means_no_rendering(fake_datasets, tmp_path):
    flags = ["--datasets-dir", fake_datasets, "--runs-dir", tmp_path / "runs", "--eval-every", "2", "--eval-episodes", "1"]
    env = {**os.environ, "MUJOCO_GL": "disable"}  # a user's setting that cannot render
    out = run_script("td3_bc.py", *TINY["td3_bc.py"], *flags, "--capture-video", check=False, env=env)
    assert "--capture-video cannot render offscreen with MUJOCO_GL=disable" in one_line_error(out)
    out = run_script("td3_bc.py", *TINY["td3_bc.py"], *flags, "--capture-video", "--video-size", "100", check=False,
                     env=rendering_env())  # fmt: skip
    assert "--video-size must be a positive multiple of 16" in one_line_error(out)
    assert not (tmp_path / "runs").exists()
    # without --capture-video no OpenGL backend and no video encoder is ever loaded
    code = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); import os; "
        "print('MODULES', os.environ['MUJOCO_GL'], sorted(m for m in ('OpenGL', 'imageio_ffmpeg') if m in sys.modules))"
    )
    cmd = [sys.executable, "-c", code, str(ROOT / "td3_bc.py"), *map(str, TINY["td3_bc.py"]), *map(str, flags)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=rendering_env())
    assert "MODULES disable []" in out.stdout, out.stdout + out.stderr
