"Two runs of the demo with the same seed on one machine give the same report (the seed fixes data, weights, window order and prompts)."
import json, os, subprocess, sys

QUICK = ["--minutes", "0.2", "--episodes-per-task", "6", "--eval-episodes", "3"]
VARYING = {"run_dir", "checkpoint", "dataset_json", "figures", "figure", "eval_seconds", "control_rate_hz"}  # paths, timings


def demo_report(out, hash_seed:str)->dict:
    "Run the quick demo in a fresh interpreter (its own PYTHONHASHSEED, so set order differs) and read its report."
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    p = subprocess.run([sys.executable, "-m", "icrt.demo", "--out", str(out), *QUICK], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "eval" / "report.json").read_text())


def strip(x):
    "The report without paths and timings."
    if isinstance(x, dict): return {k: strip(v) for k, v in x.items() if k not in VARYING}
    if isinstance(x, list): return [strip(v) for v in x]
    return x


def test_same_seed_same_report(tmp_path):
    a, b = demo_report(tmp_path / "a", "1"), demo_report(tmp_path / "b", "2")
    assert strip(a) == strip(b)
    assert a["in_context_gap"]["closed_loop"] is not None  # the closed-loop part is compared too
