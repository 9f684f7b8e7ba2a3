"""The run configuration's path through a training run stays short: at most 6 files of rga/ and
at most 8 returns to a file already left (tools/config_trace.py says how it is measured)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import config_trace  # noqa: E402


def test_the_config_visits_few_files(data_root, tmp_path):
    path, _ = config_trace.run_traced(data_root, tmp_path / "run")
    files, stays, returns = config_trace.summarize(path)
    assert path and path[0] == "rga/train.py"
    assert len(files) <= 6 and returns <= 8, (sorted(files), returns, " > ".join(stays))
