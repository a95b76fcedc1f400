"The built-in demo end to end: a quick run writes the run, the report and the figures; the full run shows the in-context gap."
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
QUICK = ["--minutes", "0.2", "--episodes-per-task", "6", "--eval-episodes", "4"]


def demo(*args, **kw):
    return subprocess.run([sys.executable, "-m", "icrt.demo", *map(str, args)], capture_output=True, text=True, env=ENV, **kw)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    p = demo("--out", out, *QUICK)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_quick_demo_writes_run_report_and_figures(quick):
    out, p = quick
    for f in ["data/dataset_config.json", "encoder.pth", "train_command.txt", "run/run.yaml", "run/log.txt",
              "eval/report.json", "eval/report.md", "eval/figures/in_context_gap.png", "eval/figures/chunk_errors.png",
              "demo_summary.json"]:
        assert (out / f).is_file(), f
    assert list((out / "run").glob("checkpoint-*.pth"))
    s = json.loads((out / "demo_summary.json").read_text())
    rep = json.loads((out / "eval" / "report.json").read_text())
    assert s["same_mm"] == pytest.approx(rep["in_context_gap"]["same"]["trans_mm"])
    assert s["wrong_mm"] == pytest.approx(rep["in_context_gap"]["wrong"]["trans_mm"])
    assert s["ratio"] == pytest.approx(s["wrong_mm"] / s["same_mm"])
    assert s["episodes_evaluated"] == 4 and s["epochs"] == 1  # --minutes 0.2
    c, rc = s["closed_loop"], rep["in_context_gap"]["closed_loop"]  # the demo's data is synthetic: closed loop is run
    assert c["same_mm"] == pytest.approx(rc["same"]["trans_mm"]) and c["success_same"] == pytest.approx(rc["success"]["same"])
    assert s["ok"] == (s["ratio"] >= 2 and c["ratio"] >= 2)
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("in-context gap: teacher-forced ") and "closed loop" in last and "(target >= 2 in each)" in last
    assert ("TARGET MET" in last) == s["ok"]
    assert json.loads((out / "data" / "synthetic_world.json").read_text())["jitter"] == 0.02


def test_train_command_reproduces_the_run(quick):
    "The written command parses to the config the run saved."
    import shlex
    from icrt.config import load_config, parse_args
    out, _ = quick
    words = shlex.split((out / "train_command.txt").read_text())
    assert words[0] == "icrt_train"
    cfg, saved = parse_args(words[1:]), load_config(out / "run" / "run.yaml")
    assert cfg.trainer_cfg == saved.trainer_cfg and cfg.shared_cfg.seq_length == saved.shared_cfg.seq_length
    assert saved.model_cfg.policy_cfg.no_prompt_loss


def test_demo_refuses_a_used_folder(quick):
    out, _ = quick
    p = demo("--out", out, *QUICK)
    assert p.returncode == 1 and "already holds a demo run" in p.stderr and "Traceback" not in p.stderr


def test_demo_bad_minutes(tmp_path):
    p = demo("--out", tmp_path / "x", "--minutes", "0")
    assert p.returncode == 1 and "--minutes must be > 0" in p.stderr and "Traceback" not in p.stderr


def test_demo_bad_space(tmp_path):
    p = demo("--out", tmp_path / "x", "--space", "joint")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "icrt_demo: error: --space 'joint': use pose (the gripper's pose) or joints (a 5-joint arm's joints)"], p.stderr
    assert not (tmp_path / "x").exists()


def test_quick_joint_space_demo_measures_the_gap_in_radians_and_counts_successes(tmp_path):
    "`--space joints`: the arm's world, a policy of joints, errors in rad, success counts with Wilson intervals and the expert's."
    out = tmp_path / "joints"
    p = demo("--out", out, "--space", "joints", *QUICK[:-1], "2")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "demo_summary.json").read_text())
    rep = json.loads((out / "eval" / "report.json").read_text())
    assert json.loads((out / "run" / "robot_space.json").read_text())["name"] == "synthetic_arm"
    assert "trans_mm" not in rep["teacher_forced"] and s["space"] == "joints"
    assert s["same_rad"] == pytest.approx(rep["in_context_gap"]["same"]["joint_rad"])
    assert s["closed_loop"]["wrong_rad"] == pytest.approx(rep["in_context_gap"]["closed_loop"]["wrong"]["joint_rad"])
    succ, n = s["success"], s["episodes_evaluated"]
    assert list(succ) == ["same-task prompt", "wrong-task prompt", "scripted expert"] and all(v["n"] == n == 2 for v in succ.values())
    assert succ["same-task prompt"]["rate"] == pytest.approx(rep["in_context_gap"]["closed_loop"]["success"]["same"])
    assert all(v["ci95"][0] <= v["rate"] <= v["ci95"][1] for v in succ.values())
    assert succ["scripted expert"]["successes"] == n   # the arm's expert can do every task it is scored on
    for f in ["in_context_gap.png", "success.png", "chunk_errors.png"]: assert (out / "eval" / "figures" / f).is_file(), f
    assert "| scripted expert | 2/2 |" in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("in-context gap: teacher-forced ") and " rad (same-task prompt)" in last, last


@pytest.mark.parametrize("err", ["InferenceError", "EvalError", "CheckpointError"])
def test_demo_reports_every_library_error_in_one_line(monkeypatch, capsys, tmp_path, err):
    "icrt_demo catches ICRTError: errors of inference and evaluation are one line too."
    import icrt.demo
    from icrt.checkpoint import CheckpointError
    from icrt.eval import EvalError
    from icrt.inference import InferenceError
    cls = {"InferenceError": InferenceError, "EvalError": EvalError, "CheckpointError": CheckpointError}[err]
    def boom(*a, **k): raise cls(f"{err}: something the user can fix")
    monkeypatch.setattr(icrt.demo, "run_demo", boom)
    with pytest.raises(SystemExit) as e: icrt.demo.demo_cli(["--out", str(tmp_path / "x")])
    out = capsys.readouterr().err
    assert e.value.code == 1 and out.strip().splitlines() == [f"icrt_demo: error: {err}: something the user can fix"]


@pytest.mark.slow
def test_full_demo_shows_in_context_learning(tmp_path):
    "The default demo: with a same-task prompt the held-out action error is at most half the wrong-task one (teacher-forced and closed loop)."
    p = demo("--out", tmp_path / "full", timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "full" / "demo_summary.json").read_text())
    assert s["ok"] and s["ratio"] >= 2.0 and s["closed_loop"]["ratio"] >= 2.0, s["summary"]
