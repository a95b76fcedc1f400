"icrt_eval end to end: the report files of a run, the in-context gap, held-out selection and clear failures."
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icrt.data.format import load_dataset_config
from icrt.eval import evaluate_run, heldout_episodes

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-c", "import sys; from icrt.eval import eval_cli; eval_cli(sys.argv[1:])"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


def icrt_eval(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=600)


def finite(x): return x is not None and np.isfinite(x)


def test_cli_writes_json_markdown_and_figures(run_dir, tmp_path):
    out = tmp_path / "eval"
    p = icrt_eval(run_dir, "--episodes", 3, "--out", out, "--num-prompts", 2)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert "ICRT offline evaluation" in (out / "report.md").read_text() and "In-context gap" in p.stdout
    assert rep["num_episodes"] == 3 and rep["num_prompts"] == 2
    val = set(json.loads((run_dir / "val_split.json").read_text()))
    assert {e["episode"] for e in rep["episodes"]} <= val, "evaluated episodes must be held out"
    for e in rep["episodes"]:
        assert len(e["prompts"]) >= 1 and e["episode"] not in e["prompts"] and e["wrong_task"] != e["task"]
        assert Path(e["figure"]).is_file()
    for mode in ("teacher_forced", "open_loop"):
        s = rep[mode]
        assert s["steps"] == sum(e["length"] for e in rep["episodes"])
        assert all(finite(s[k]) for k in ("trans_mm", "rot_deg", "gripper_acc")) and 0 <= s["gripper_acc"] <= 1
        assert 0 <= s["rot_deg"] <= 180 and len(s["chunk_offset"]["trans_mm"]) == rep["num_pred_steps"]
    gap = rep["in_context_gap"]
    assert gap["episodes"] == 3 and finite(gap["ratio"]["trans_mm"]) and finite(gap["ratio"]["rot_deg"])
    assert np.isclose(gap["ratio"]["trans_mm"], gap["wrong"]["trans_mm"] / gap["same"]["trans_mm"])
    c = gap["closed_loop"]  # the tiny assets are synthetic: every episode also ran closed loop in its own world
    assert c["episodes"] == 3 and finite(c["ratio"]["trans_mm"]) and 0 <= c["success"]["same"] <= 1
    assert rep["closed_loop"]["steps"] == rep["teacher_forced"]["steps"] and "Closed-loop in-context gap" in p.stdout
    assert finite(rep["control_rate_hz"]) and rep["control_rate_hz"] > 0
    assert all(Path(f).is_file() and Path(f).stat().st_size > 1000 for f in rep["figures"].values())


def test_teacher_forced_differs_from_open_loop(run_dir, tmp_path):
    "The two modes feed different action tokens, so (for a model that uses them) their predictions differ."
    rep = evaluate_run(run_dir, episodes=1, out=tmp_path / "e")
    assert rep["teacher_forced"]["trans_mm"] != rep["open_loop"]["trans_mm"]


def test_empty_validation_split_falls_back_to_training_episodes(run_dir, assets, tmp_path):
    run = tmp_path / "run"; shutil.copytree(run_dir, run)
    spec = load_dataset_config(assets.dataset_json)
    (run / "val_split.json").write_text("[]")
    (run / "train_split.json").write_text(json.dumps(sorted(spec.epi_len)))
    warnings = []
    names = heldout_episodes(run, spec, "val", 2, warnings)
    assert len(names) == 2 and warnings and "TRAINING" in warnings[0]
    assert len({spec.episode_task[n] for n in names}) == 2, "round-robin over tasks"
    rep = evaluate_run(run, episodes=1, out=tmp_path / "e")
    assert rep["num_episodes"] == 1 and any("TRAINING" in w for w in rep["warnings"])


def test_bad_inputs_fail_with_one_line(run_dir, assets, tmp_path):
    def fails(*args, match):
        p = icrt_eval(*args)
        assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("icrt_eval: error:") and match in lines[0], p.stderr
    fails(tmp_path / "missing", match="does not exist")
    fails(assets.root, match="no run.yaml")
    empty = tmp_path / "empty"; empty.mkdir(); shutil.copy(run_dir / "run.yaml", empty / "run.yaml")
    fails(empty, match="no checkpoint")
    fails(run_dir, "--checkpoint", tmp_path / "nope.pth", match="no such file")
    fails(run_dir, "--dataset-json", tmp_path / "nope.json", match="does not exist")
    cfg = json.loads(assets.dataset_json.read_text())
    cfg["image_keys"] = cfg.get("image_keys", ["observation/exterior_image_1_left", "observation/wrist_image_left"])[:1]
    other = assets.dataset_json.parent / "one_camera.json"; other.write_text(json.dumps(cfg))
    fails(run_dir, "--dataset-json", other, match="image_keys")
    bad = tmp_path / "bad_world"; bad.mkdir()
    (bad / "dataset_config.json").write_text(json.dumps(absolute_config(assets)))
    (bad / "synthetic_world.json").write_text("{not json")
    fails(run_dir, "--dataset-json", bad / "dataset_config.json", match="synthetic_world.json: not valid JSON")
    assert icrt_eval(run_dir, "--dataset-json", bad / "dataset_config.json", "--episodes", 1, "--out", tmp_path / "e",
                     "--no-closed-loop").returncode == 0


def absolute_config(assets)->dict:
    "The assets' dataset config with absolute paths, to be written anywhere."
    cfg, root = json.loads(assets.dataset_json.read_text()), assets.dataset_json.parent
    for k in ("dataset_path", "hdf5_keys", "epi_len_mapping_json", "verb_to_episode", "task_grouping"):
        if k in cfg: v = cfg[k]; cfg[k] = [str(root / x) for x in v] if isinstance(v, list) else str(root / v)
    return cfg


def test_single_task_dataset_has_no_gap_but_still_evaluates(run_dir, assets, tmp_path):
    spec = load_dataset_config(assets.dataset_json)
    task = sorted(spec.verb_to_episode)[0]
    cfg = json.loads(assets.dataset_json.read_text())
    v2e = tmp_path / "verb.json"; v2e.write_text(json.dumps({task: spec.verb_to_episode[task]}))
    root = assets.dataset_json.parent
    cfg["verb_to_episode"] = str(v2e); cfg.pop("task_grouping", None)
    for k in ("dataset_path", "hdf5_keys", "epi_len_mapping_json"):
        v = cfg[k]; cfg[k] = [str(root / x) for x in v] if isinstance(v, list) else str(root / v)
    one = tmp_path / "one_task.json"; one.write_text(json.dumps(cfg))
    rep = evaluate_run(run_dir, dataset_json=one, split="all", episodes=2, out=tmp_path / "e")
    assert rep["in_context_gap"]["ratio"] is None and any("single task" in w for w in rep["warnings"])
    assert {e["task"] for e in rep["episodes"]} == {task}


def test_unwritable_output_folder_is_one_line(run_dir, tmp_path):
    "An output folder that cannot be created or written: one line, exit 1, before any evaluation."
    f = tmp_path / "file"; f.write_text("x")
    p = icrt_eval(run_dir, "--episodes", 1, "--out", f / "eval")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out: cannot create" in lines[0], p.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(run_dir, tmp_path):
    ro = tmp_path / "ro"; ro.mkdir(); ro.chmod(0o500)
    try: p = icrt_eval(run_dir, "--episodes", 1, "--out", ro / "eval")
    finally: ro.chmod(0o700)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "--out" in p.stderr, p.stderr
