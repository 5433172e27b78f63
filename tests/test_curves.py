"""utils/curves.py: the scalars of a run folder are read back as written (the last value wins at a repeated step,
as after a resume), and the figure is written; a folder without an events file is a one-line error."""

import subprocess
import sys

from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "utils"))
import curves  # noqa: E402


def test_scalars_read_back_and_figure_written(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        writer = SummaryWriter(str(tmp_path / name))
        for step in (250, 500, 750):
            writer.add_scalar("world_model/kl_u", scale * step, step)
        writer.add_scalar("world_model/kl_u", -1.0, 750)  # written again at the same step: the last one counts
        writer.close()
    steps, values = curves.read_scalars(tmp_path / "b")["world_model/kl_u"]
    assert steps == [250, 500, 750] and values == [500.0, 1000.0, -1.0]
    out = tmp_path / "fig.png"
    curves.plot([tmp_path / "a", tmp_path / "b"], ["a", "b"], ["world_model/kl_u", "eval/real_reward"], out, "t")
    assert out.stat().st_size > 1000
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, str(ROOT / "utils" / "curves.py"), "--runs", str(tmp_path / "empty"), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0 and "no tensorboard events file" in result.stderr
