"""python -m rga.experiments figures: the figures of docs/figures.md from one seed's showcase runs, at a tiny size."""
import json
import shlex

import pytest

from rga import experiment_figures as F
from rga import experiments as E
from rga import visualize as V

# a tiny synthetic_scenes set and one-epoch runs at 64x32 (the figures' code path is the same at 128x64)
TINY_SCENES = ["num_train_ids=6", "num_test_ids=4", "num_distractors=2", "max_cams_per_id=2", "max_imgs_per_cam=2"]
TINY_TRAIN = [a for kv in TINY_SCENES for a in ("--dataset-opt", kv)] + [
    "--pretrained", "none", "--height", "64", "--width", "32", "--batch-ids", "4", "--batch-instances", "2",
    "--epochs", "1", "--milestones", "--test-batch-size", "32", "--threads", "1"]
FIGURES = {"attention": ["attention.png", "foreground_ratio.json"], "relation": ["relation.png", "relation.json"],
           "gradcam": ["gradcam.png", "gradcam.json"], "ranks": ["ranks.png", "ranks.json", "cmc.png"]}


def _check_figures(out, runs, *, epoch=1):
    from PIL import Image

    record = json.loads((out / "figures.json").read_text())
    assert set(record["figures"]) == set(FIGURES) and record["date"].endswith("Z")
    assert record["command"].startswith("python -m rga.experiments figures ")
    for name, files in FIGURES.items():
        fig = record["figures"][name]
        assert fig["files"] == files and fig["date"]
        for f in files:
            assert (out / f).stat().st_size > 0
            if f.endswith(".png"):
                assert min(Image.open(out / f).size) > 50
        # each figure names the exact command that drew it: a valid rga.visualize command line
        argv = shlex.split(fig["command"])
        assert argv[:4] == ["python", "-m", "rga.visualize", name]
        parsed = V.build_parser().parse_args(argv[3:])
        assert parsed.out == str(out)
        assert fig["runs"] and all(r["epoch"] == epoch and r["folder"].startswith(str(runs)) for r in fig["runs"])
    for slug, info in record["runs"].items():
        assert info["folder"] == str(runs / f"{slug}-seed0") and info["epoch"] == epoch
    return record


def test_figures_train_what_is_missing_draw_everything_and_name_each_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pytorch_grad_cam")
    from rga.data.synthetic import make_config
    from rga.data.synthetic_scenes import DIRNAME, MARKER, SceneConfig, marker_text

    data, runs, out = tmp_path / "data", tmp_path / "runs", tmp_path / "figs"
    common = ["figures", "--runs", str(runs), "--out", str(out), "--limit", "4", "--threads", "1"]

    # --no-train with nothing trained: one error line naming the missing run and how to make it
    assert E.main(common + ["--no-train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--no-train" in err and str(runs / "rga_sc-seed0") in err and "--preset showcase" in err

    # trains RGA-SC, baseline, RGA-S and NL (showcase preset, the showcase's folders), then draws
    assert E.main(common + ["--data-root", str(data), "--"] + TINY_TRAIN) == 0
    printed = capsys.readouterr().out
    assert "--preset showcase" in printed and "--model nl" in printed
    record = _check_figures(out, runs)
    assert record["trained_by_this_command"] == ["rga_sc", "baseline", "rga_s", "nl"]
    rel = record["figures"]["relation"]
    assert str(runs / "nl-seed0") in rel["command"] and rel["note"] is None
    assert "init:rga_sc" in record["figures"]["attention"]["command"]
    assert "init:rga_sc" in record["figures"]["gradcam"]["command"]
    assert all(" --preset showcase " in c for c in record["train_commands"].values())
    # the figures read the tiny set the runs were trained on (its options reach rga.visualize): not regenerated
    opts = {k: int(v) for k, v in (kv.split("=") for kv in TINY_SCENES)}
    assert (data / DIRNAME / MARKER).read_text() == marker_text(make_config(SceneConfig, "synthetic_scenes", opts))
    assert "--dataset-opt num_train_ids=6" in record["figures"]["ranks"]["command"]

    # again with --no-train and no NL run: the finished runs are used as they are, NL is an untrained one
    import shutil
    shutil.rmtree(runs / "nl-seed0")
    assert E.main(common + ["--no-train"]) == 0
    printed = capsys.readouterr().out
    assert "untrained NL (init:nl)" in printed
    record = _check_figures(out, runs)
    assert record["trained_by_this_command"] == [] and "nl" not in record["runs"]
    rel = record["figures"]["relation"]
    assert "--compare init:nl" in rel["command"] and "init:nl" in rel["note"]


def test_the_docs_write_out_the_commands_figures_runs():
    """docs/figures.md's visualize commands are those `figures` runs on seed 0's showcase runs (default paths)."""
    import re
    from pathlib import Path

    text = re.sub(r"\\\n\s*", "", (Path(__file__).resolve().parents[1] / "docs" / "figures.md").read_text())
    infos = {slug: {"folder": f"runs/showcase/{slug}-seed0", "epoch": 12, "epochs": 12, "backbone": "resnet18",
                    "input": "128x64", "dataset": "synthetic_scenes", "data_root": "data", "dataset_opt": {}}
             for slug in ("rga_sc", "rga_s", "baseline", "nl")}
    # the default set's 370 query images, the first by name (the relation figure's image)
    queries = ["data/synthetic_scenes/query/0101_c1s1_000213_00.jpg"] + [f"q{i:03d}.jpg" for i in range(1, 370)]
    figs = {f["figure"]: f for f in F.figure_commands(infos, Path("docs/figures"), queries)}
    assert "python -m rga.experiments figures " in text
    for name in ("attention", "relation", "ranks"):
        assert figs[name]["command"] in text, name
    argv = figs["gradcam"]["argv"]
    assert argv[2:52] == queries[::7][:50] and argv[52] == "--compare"  # every 7th image, 50 of them
    images = "$(ls data/synthetic_scenes/query/*.jpg | awk '(NR-1) % 7 == 0' | head -50)"
    assert f"python -m rga.visualize gradcam {argv[1]} {images} {F._shell(argv[52:])}" in text
    for slug in infos:  # the training command of each run, with its --output-dir
        assert f"python -m rga.train --preset showcase --model {slug} --seed 0 --output-dir {infos[slug]['folder']}" \
            in text
