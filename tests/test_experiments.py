"""rga.experiments: the table runner (rows in the paper's order, resumable, markdown + JSON) and the
showcase's checks of the row files it reads."""
import json

import pytest

from rga import experiments as E
from rga.models import build_model, count_parameters
from testkit import one_error_line

TINY = ["--dataset-opt", "num_train_ids=8", "--dataset-opt", "num_test_ids=6", "--dataset-opt", "num_distractors=2",
        "--milestones", "--batch-ids", "4", "--batch-instances", "2", "--threads", "1", "--test-batch-size", "32",
        "--workers", "0"]


def test_tables_follow_the_paper():
    t1 = [r.label for r in E.TABLES["table1"][1]]
    assert t1 == ["Baseline", "RGA-S w/o Rel.", "RGA-S w/o Ori.", "RGA-S", "RGA-C w/o Rel.", "RGA-C w/o Ori.", "RGA-C",
                  "RGA-S//C", "RGA-CS", "RGA-SC"]
    t2 = [r.label for r in E.TABLES["table2"][1]]
    assert t2 == ["Baseline", "CBAM-S", "FC-S", "NL", "SNL", "RGA-S", "SE", "CBAM-C", "FC-C", "RGA-C", "CBAM-CS",
                  "FC-S//C", "RGA-SC"]
    assert [r.label for r in E.TABLES["table4"][1]] == ["Baseline", "w/o Embedding", "Symmetric", "Asymmetric (ours)"]
    # the published numbers (Tables 1, 2, 4: CUHK03-L R1, mAP, Market R1, mAP)
    rows = {r.slug: r for t in E.TABLES.values() for r in t[1]}
    assert rows["rga_sc"].paper == (81.1, 77.4, 96.1, 88.4)
    assert rows["rga_s_noori"].paper == (78.2, 74.0, 95.4, 86.7)
    assert rows["fc_s_par_c"].paper == (78.4, 73.2, 94.8, 85.0)
    assert rows["rga_sc_sym"].paper == (79.4, 75.2, 95.6, 87.4)
    for t in E.TABLES.values():  # every row builds (small backbone and input)
        for r in t[1]:
            build_model(r.variant, 3, height=64, width=32, backbone="resnet18", pretrained=False, **r.options)


def test_rows_are_rga_train_models(tmp_path):
    rows = {r.slug: r for t in E.TABLES.values() for r in t[1]}
    names = {slug: rows[slug].model for slug in ("rga_c_noori", "rga_s_norel", "rga_sc_sym", "rga_sc_noemb", "cbam_s",
                                                 "rga_sc", "baseline")}
    assert names == {"rga_c_noori": "rga_c_wo_ori", "rga_s_norel": "rga_s_wo_rel", "rga_sc_sym": "symmetric",
                     "rga_sc_noemb": "wo_embedding", "cbam_s": "cbam_s", "rga_sc": "rga_sc", "baseline": "baseline"}
    from rga import train as T
    argv = E.train_argv(rows["rga_c_noori"], tmp_path / "x", "quick", None, None, ["--epochs", "3"])
    cfg = T.parse_config(argv)
    assert cfg.model.variant == "rga_c" and cfg.model.use_original is False and cfg.optim.epochs == 3
    assert cfg.run.resume == "auto" and cfg.run.output_dir == str(tmp_path / "x")
    assert T.parse_config(E.train_argv(rows["nl"], tmp_path / "y", "quick", None, None, [])).model.variant == "nl"


def test_train_seconds_come_from_metrics_jsonl_and_train_log_for_older_runs(tmp_path):
    """A row's training time: each epoch's seconds from metrics.jsonl (an epoch trained again after a
    resume counts once, its last line); a run whose metrics.jsonl lacks epochs (older runs: evaluation
    lines only) is read from train.log."""
    new = tmp_path / "new"
    new.mkdir()
    lines = [{"epoch": 1, "train": {"seconds": 10.0}}, {"epoch": 2, "train": {"seconds": 99.0}},
             {"epoch": 2, "train": {"seconds": 12.0}}, {"epoch": 2, "R1": 0.5, "train": {"seconds": 12.0}}]
    (new / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (new / "train.log").write_text("epoch 1/2  lr 1e-3  loss 1.0 (...)  acc 1.0%  5 batches in 77.0s\n")
    assert E.epoch_seconds(new) == {1: 10.0, 2: 12.0}
    assert E.train_seconds(new) == (22.0, 2)
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text(json.dumps({"epoch": 2, "R1": 0.5, "train": {"seconds": 12.0}}) + "\n")
    (old / "train.log").write_text("x | epoch 1/2  lr 1.00e-03  loss 5.1 (id 4.0, triplet 1.1)  acc 3.0%  16 batches in 7.5s\n"
                                   "x | epoch 2/2  lr 1.00e-03  loss 4.9 (id 3.9, triplet 1.0)  acc 5.0%  16 batches in 8.0s\n")
    assert E.train_seconds(old) == (15.5, 2)
    assert E.train_seconds(tmp_path / "missing") == (0.0, 0)


def test_runner_trains_rows_resumes_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "exp"
    common = ["table4", "--out", str(out), "--data-root", str(tmp_path / "data")]
    assert E.main(common + ["--rows", "baseline", "--"] + TINY + ["--epochs", "1"]) == 0
    first = json.loads((out / "rows" / "baseline.json").read_text())
    assert first["epochs_logged"] == 1 and first["train_seconds"] > 0 and 0 <= first["R1"] <= 1
    # metrics.jsonl: the epoch's own line (its training time), then the evaluation's
    records = [json.loads(x) for x in (out / "runs" / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in records][0] == ["epoch", "train"] and "R1" in records[1]
    assert first["train_seconds"] == records[0]["train"]["seconds"]
    md = (out / "table4.md").read_text()
    assert "| Baseline | " in md and "pending" in md and "73.8 / 69.0" in md

    # rga.evaluate on the row's run: metrics JSON with the CMC curve, and cmc.png beside it
    pytest.importorskip("matplotlib")
    from PIL import Image

    from rga import evaluate as EV
    assert EV.main(["--checkpoint", str(out / "runs" / "baseline"), "--output", str(tmp_path / "ev" / "m.json"),
                    "--threads", "1", "--no-progress"]) == 0
    m = json.loads((tmp_path / "ev" / "m.json").read_text())
    assert len(m["cmc"]) >= 20 and m["cmc"][0] == pytest.approx(m["R1"]) and m["cmc"][4] == pytest.approx(m["R5"])
    assert Image.open(tmp_path / "ev" / "cmc.png").size[0] > 300

    # a runner killed after a row's training but before recording it: the rerun resumes that run
    assert E.main(common + ["--rows", "rga_sc_sym", "--"] + TINY + ["--epochs", "1"]) == 0
    (out / "rows" / "rga_sc_sym.json").unlink()
    capsys.readouterr()
    assert E.main(common + ["--rows", "baseline", "rga_sc_sym", "--"] + TINY + ["--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Baseline (baseline): done, skipped" in printed
    sym = json.loads((out / "rows" / "rga_sc_sym.json").read_text())
    assert sym["epoch"] == 2 and sym["epochs_logged"] == 2  # one epoch before, one after the resume
    assert "resumed from" in (out / "runs" / "rga_sc_sym" / "train.log").read_text()
    table = json.loads((out / "table4.json").read_text())
    assert [r["slug"] for r in table["rows"]] == ["baseline", "rga_sc_noemb", "rga_sc_sym", "rga_sc"]
    assert table["rows"][1]["ours"] is None and table["rows"][2]["ours"]["options"] == {"embedding": "symmetric"}
    # symmetric embedding: fewer parameters than the asymmetric model (no phi)
    assert table["rows"][2]["ours"]["params"] == count_parameters("rga_sc", 8, height=64, width=32, backbone="resnet18",
                                                                   embedding="symmetric")
    assert table["rows"][2]["ours"]["params"] < count_parameters("rga_sc", 8, height=64, width=32, backbone="resnet18")
    assert E.main(["table4", "--out", str(out), "--rows", "nope"]) == 2


def test_showcase_runs_rows_times_seeds_and_reports_mean_and_std(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from rga import train as T
    tiny = ["--dataset-opt", "num_train_ids=6", "--dataset-opt", "num_test_ids=4", "--dataset-opt", "num_distractors=2",
            "--dataset-opt", "max_cams_per_id=2", "--dataset-opt", "max_imgs_per_cam=2", "--batch-ids", "4",
            "--batch-instances", "2", "--threads", "1", "--test-batch-size", "32", "--epochs", "1", "--milestones"]
    data = str(tmp_path / "data")
    # the stand-in for ImageNet: a baseline of this package (the runner would train the quick one)
    pre = tmp_path / "pre"
    assert T.main(["--preset", "showcase", "--model", "baseline", "--pretrained", "none", "--data-root", data,
                   "--output-dir", str(pre), "--no-progress"] + tiny) == 0
    out, runs = tmp_path / "figs", tmp_path / "runs"
    common = ["showcase", "--out", str(out), "--runs", str(runs), "--data-root", data, "--seeds", "2"]
    assert E.main(common + ["--rows", "baseline", "rga_s", "--", "--pretrained", str(pre)] + tiny) == 0
    for slug in ("baseline-seed0", "baseline-seed1", "rga_s-seed0", "rga_s-seed1"):
        res = json.loads((out / "rows" / f"{slug}.json").read_text())
        assert res["seed"] == int(slug[-1]) and res["input"] == "128x64" and res["dataset"] == "synthetic_scenes"
        cfg = T.parse_config(res["train_argv"])
        assert cfg.model.gate_init == "zero" and cfg.model.pretrained == str(pre)
    # the two seeds differ (the seed reaches the run) and the table gives their mean and std
    r0, r1 = (json.loads((out / "rows" / f"baseline-seed{s}.json").read_text()) for s in (0, 1))
    table = json.loads((out / "showcase.json").read_text())
    base = table["rows"][0]["ours"]
    assert base["seeds"] == [0, 1] and base["mAP"] == pytest.approx((r0["mAP"] + r1["mAP"]) / 2)
    assert base["mAP_std"] == pytest.approx(abs(r0["mAP"] - r1["mAP"]) / 2 ** 0.5)
    md = (out / "showcase.md").read_text()
    assert "| Baseline | 2 of 2 | " in md and " ± " in md and "| RGA-C | 0 of 2 | pending" in md
    # foreground ratios of the spatial row, per seed, with the untrained control, and the figure
    fg = json.loads((out / "foreground_ratio.json").read_text())
    assert [r["seed"] for r in fg["rows"]["rga_s"]["per_seed"]] == [0, 1]
    assert set(fg["rows"]["rga_s"]["stages"]) == {"1", "2", "3", "4"} and "untrained_rga_sc" in fg
    assert (out / "attention.png").is_file() and "RGA-S" in (out / "foreground_ratio.md").read_text()
    # the ratios were measured on the set the runs trained on (its options reach rga.visualize), not a new default one
    from rga.data.synthetic import make_config
    from rga.data.synthetic_scenes import DIRNAME, MARKER, SceneConfig, marker_text
    opts = {k: int(v) for k, v in (a.split("=") for a in tiny[1:10:2])}
    assert (tmp_path / "data" / DIRNAME / MARKER).read_text() == marker_text(make_config(SceneConfig, "s", opts))
    # the standalone command names the same run folder as the runner
    assert T.parse_config(["--preset", "showcase", "--model", "rga_c", "--seed", "2"]).run.output_dir == \
        "runs/showcase/{model}-seed{seed}"
    assert E.main(common + ["--list"]) == 0
    assert "rga_sc-seed1" in capsys.readouterr().out
    # --no-train: the table from the finished runs only, nothing trained (RGA-C and RGA-SC stay pending)
    assert E.main(common + ["--no-train"]) == 0
    assert not (runs / "rga_c-seed0").exists() and "| RGA-SC | 0 of 2 | pending" in (out / "showcase.md").read_text()


def _finished_row(folder, row, seed, argv_extra=(), r1=0.5):
    """A row result as run_row writes it, for a run of the showcase preset (nothing trained)."""
    slug = E.run_slug(row, seed)
    argv = E.train_argv(row, folder / "runs" / slug, "showcase", None, None, list(argv_extra), seed)
    res = {"slug": slug, "row": row.slug, "seed": seed, "label": row.label, "R1": r1, "R5": 0.9, "mAP": 0.4,
           "mINP": 0.2, "params": 1000, "train_seconds": 60.0, "run_dir": str(folder / "runs" / slug),
           "dataset": "synthetic_scenes", "backbone": "resnet18", "input": "128x64", "train_argv": argv}
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    (folder / "rows" / f"{slug}.json").write_text(json.dumps(res))


def test_reuse_counts_another_folders_rows_trained_with_the_same_configuration(tmp_path, capsys):
    rows = {r.slug: r for r in E.TABLES["table1"][1]}
    shown, out = tmp_path / "showcase", tmp_path / "t1"
    for seed in (0, 1):
        _finished_row(shown, rows["baseline"], seed, r1=0.6 + 0.1 * seed)
        # trained with another recipe: never counted as this table's row
        _finished_row(shown, rows["rga_s"], seed, ["--epochs", "3"])
    _finished_row(shown, rows["rga_c"], 0, r1=0.1)
    _finished_row(out, rows["rga_c"], 0, r1=0.7)  # the table's own result wins over the other folder's
    common = ["table1", "--preset", "showcase", "--seeds", "2", "--out", str(out), "--reuse", str(shown)]
    assert E.main(common + ["--no-train"]) == 0
    printed = capsys.readouterr().out
    assert "rga_s-seed0: " in printed and "not reused, trained with other epochs" in printed
    table = {r["slug"]: r for r in json.loads((out / "table1.json").read_text())["rows"]}
    assert table["baseline"]["ours"]["R1"] == pytest.approx(0.65) and table["baseline"]["ours"]["seeds"] == [0, 1]
    assert table["rga_s"]["ours"] is None and table["rga_c"]["ours"]["R1"] == pytest.approx(0.7)
    md = (out / "table1.md").read_text()
    assert "| Baseline † | 2 of 2 | 65.0 ± 7.1 |" in md and "| RGA-S | 0 of 2 | pending" in md
    assert "| RGA-C | 1 of 2 | 70.0 | 40.0 |" in md and f"† read from {shown}" in md  # one seed: no ±
    # --list names where a reused row's result is; without --reuse nothing is borrowed
    assert E.main(common + ["--list"]) == 0
    listed = capsys.readouterr().out
    assert f"done in {shown / 'rows' / 'baseline-seed1.json'}" in listed
    assert E.main(common[:-2] + ["--no-train"]) == 0
    assert "| Baseline | 0 of 2 | pending" in (out / "table1.md").read_text()
    capsys.readouterr()
    assert E.main(common[:-1] + [str(tmp_path / "nope"), "--no-train"]) == 2
    assert "has no rows/ folder: --reuse expects another runner's --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------
# the showcase checks the row JSON files it reads
# ------------------------------------------------------------------------------

def _row(slug="baseline-seed0", **change):
    res = {"slug": slug, "row": slug.split("-")[0], "seed": 0, "label": "Baseline", "arch": "baseline", "options": {},
           "R1": 0.5, "R5": 0.7, "mAP": 0.4, "mINP": 0.2, "num_query": 8, "num_test_ids": 4, "epoch": 1,
           "params": 1e6, "train_seconds": 3.0, "run_dir": "nowhere", "dataset": "synthetic", "data_root": "data",
           "backbone": "resnet18", "input": "64x32"}
    return {**res, **change}


@pytest.mark.parametrize("content, why", [
    ('{"slug": "baseline-seed0", "R1": 0.', "not JSON"),
    ("", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    (json.dumps(_row(mAP="0.4")), "mAP is '0.4'"),
    (json.dumps(_row(mAP=-3)), "mAP is -3"),
    (json.dumps(_row(R1=float("nan"))), "R1 is nan"),
    (json.dumps(_row(slug="../../../x")), "slug '../../../x' is not the file's name"),
], ids=["truncated", "empty", "list", "text_metric", "negative_map", "nan", "slug_outside"])
def test_a_bad_showcase_row_json_is_one_line_naming_the_file(tmp_path, content, why, capsys):
    out = tmp_path / "show"
    (out / "rows").mkdir(parents=True)
    bad = out / "rows" / "baseline-seed0.json"
    bad.write_text(content)
    common = ["showcase", "--out", str(out), "--runs", str(tmp_path / "runs"), "--seeds", "1"]
    assert E.main(common + ["--no-train"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{bad} is not a row result of rga.experiments: {why}" in line, line
    assert E.main(common + ["--list"]) == 0
    listing = capsys.readouterr().out
    assert "baseline-seed0" in listing and "invalid" in listing.split("baseline-seed0", 1)[1].splitlines()[0]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["baseline-seed0.json"]


def test_a_showcase_row_whose_run_dir_is_gone_is_one_line(tmp_path, capsys):
    out = tmp_path / "show"
    (out / "rows").mkdir(parents=True)
    row = out / "rows" / "rga_s-seed0.json"
    row.write_text(json.dumps(_row("rga_s-seed0", run_dir=str(tmp_path / "gone"))))
    assert E.main(["showcase", "--out", str(out), "--runs", str(tmp_path / "runs"), "--seeds", "1", "--no-train"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{row}: its run_dir {tmp_path / 'gone'} is not a folder" in line, line


if __name__ == "__main__":
    pytest.main([__file__])
