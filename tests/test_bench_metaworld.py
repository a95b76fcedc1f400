"icrt_bench_metaworld: the smoke preset end to end through the console entry point, and bad inputs."
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("MUJOCO_GL", "osmesa")
pytest.importorskip("metaworld")

CONDITIONS = ["ICRT, same-task prompt", "ICRT, wrong-task prompt", "scripted expert"]


def _run(*args, timeout=240):
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "osmesa"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "icrt.bench.metaworld", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "bench"
    r = _run("--preset", "smoke", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    md, rep = (out / "report.md").read_text(), json.loads((out / "report.json").read_text())
    tasks = rep["preset"]["tasks"]
    assert len(tasks) == 2
    for t in tasks:  # three rows per task, in the file and in the printed table
        rows = [l for l in md.splitlines() if l.startswith(f"| {t} |")]
        assert len(rows) == 3 and all(any(c in row for row in rows) for c in CONDITIONS)
        assert sum(l.startswith(f"| {t} |") for l in r.stdout.splitlines()) == 3
        ev = rep["evaluation"]["tasks"][t]
        for c in ("policy", "wrong_prompt", "expert"):
            assert ev[c]["n"] == rep["preset"]["seeds"]
            lo, hi = ev[c]["ci95"]
            assert 0 <= lo <= ev[c]["rate"] <= hi <= 1
    # the training went through the real trainer and the report carries the machine, times and config
    assert (out / "train" / "run" / "run.yaml").is_file() and list((out / "train" / "run").glob("checkpoint-*.pth"))
    assert rep["config"]["model_cfg"]["policy_cfg"]["no_prompt_loss"] is True
    assert rep["machine"]["nproc"] >= 1 and rep["machine"]["cpu_model"]
    assert set(rep["wall_times_s"]) >= {"generate_s", "train_s", "evaluate_s"}
    assert (out / "loss_curve.png").is_file() and "loss_curve.png" in md
    assert rep["evaluation"]["gifs"] and all((out / g).is_file() for g in rep["evaluation"]["gifs"])
    assert rep["limits"] and rep["limits"] in md
    # the same evaluation through a policy server (icrt_serve on the trained run) gives the same results
    ev_local = rep["evaluation"]["tasks"]
    _served_evaluation_equals(out, ev_local)
    # --skip-generate reuses the dataset (no new HDF5 written) and trains a fresh run
    before = (out / "data" / "reach-goal-0.hdf5").stat().st_mtime_ns
    r2 = _run("--preset", "smoke", "--out", str(out), "--device", "cpu", "--skip-generate", "--seeds", "1")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert (out / "data" / "reach-goal-0.hdf5").stat().st_mtime_ns == before


def _served_evaluation_equals(out, ev_local):
    "icrt_bench_metaworld --skip-generate --skip-train --server URL on the run just trained: the same evaluation."
    import time, urllib.request
    from icrt.launch import free_port
    port = free_port()
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "osmesa"), "OMP_NUM_THREADS": "1"}
    srv = subprocess.Popen([sys.executable, "-m", "icrt.serve", str(out / "train" / "run"), "--port", str(port), "--device", "cpu",
                            "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(600):
            try: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1); break
            except OSError: time.sleep(0.2)
        r = _run("--preset", "smoke", "--out", str(out), "--device", "cpu", "--skip-generate", "--skip-train",
                 "--server", f"ws://127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr[-2000:]
    finally: srv.terminate(); srv.wait(20)
    rep = json.loads((out / "report.json").read_text())
    assert rep["evaluation"]["server"] == f"ws://127.0.0.1:{port}"
    for t, ev in ev_local.items():
        for c in ("policy", "wrong_prompt", "expert"):
            assert rep["evaluation"]["tasks"][t][c] == ev[c], (t, c)


def _one_line_error(r, *needles):
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if l.startswith("icrt_bench_metaworld: error:")]
    assert len(lines) == 1, r.stderr[-1500:]
    for n in needles: assert n in lines[0]


def test_unknown_task(tmp_path):
    _one_line_error(_run("--preset", "smoke", "--out", str(tmp_path / "o"), "--tasks", "reach-v9"), "reach-v9")
    assert not (tmp_path / "o").exists()  # failed before any work


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file.txt"; f.write_text("x")
    _one_line_error(_run("--preset", "smoke", "--out", str(f)), str(f), "not a folder")


def test_skip_generate_without_data(tmp_path):
    _one_line_error(_run("--preset", "smoke", "--out", str(tmp_path / "empty"), "--skip-generate"), "--skip-generate")


def test_bad_minutes(tmp_path):
    _one_line_error(_run("--preset", "smoke", "--out", str(tmp_path / "o"), "--minutes", "0"), "--minutes")
