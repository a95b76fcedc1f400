"""`icrt_convert` as a user runs it (icrt.data.convert): the folder and robomimic formats, mapping errors, NaN episodes,
existing outputs, SIGKILL then --resume, Ctrl-C, and a training run from a converted dataset. The LeRobot and DROID
readers have their own files (test_convert_lerobot.py, test_convert_droid.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from icrt.data.convert import convert, write_robomimic_example
from icrt.data.format import (DEFAULT_ACTION_KEYS, DEFAULT_IMAGE_KEYS, DEFAULT_PROPRIO_KEYS, check_dataset,
                              load_dataset_config, read_frames, read_lowdim)

REPO = Path(__file__).resolve().parents[1]


def cli(*args, slow=False):
    "`icrt_convert ARGS` in its own process group; `slow`: every shard takes 0.5 s more (tests/slow_tool.py)."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = ["-m", "slow_tool", "convert"] if slow else ["-c", "from icrt.data.convert import convert_cli; convert_cli()"]
    # SIGINT back to its default (a background job of a non-interactive shell inherits it ignored)
    return subprocess.Popen([sys.executable, *run, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run(*args):
    p = cli(*args); out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def episode(T, seed, H=12, W=16):
    rng = np.random.default_rng(seed)
    d = {k: rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8) for k in DEFAULT_IMAGE_KEYS}
    d.update({k: rng.normal(size=(T, 6)) for k in DEFAULT_PROPRIO_KEYS[:1] + DEFAULT_ACTION_KEYS[:1]})
    d.update({k: rng.uniform(size=(T, 1)) for k in DEFAULT_PROPRIO_KEYS[1:] + DEFAULT_ACTION_KEYS[1:]})
    return d


def make_source(root, kinds=(".npz", ".hdf5"), n=2):
    "root/<task>/rec_i.<ext>, one task per kind; returns {(task, i): episode dict}."
    eps = {}
    for t, ext in enumerate(kinds):
        task = f"task{t}"
        (root / task).mkdir(parents=True)
        for i in range(n):
            e = eps[(task, i)] = episode(30 + i + t, 100 + 10 * t + i)
            if ext == ".npz": np.savez(root / task / f"rec_{i}.npz", **e)
            else:
                with h5py.File(root / task / f"rec_{i}{ext}", "w") as f:
                    for k, v in e.items(): f[k] = v
    return eps


@pytest.mark.parametrize("layout, ndim", [("flat", 2), ("plain", 4)])
def test_folder_round_trip(tmp_path, layout, ndim):
    eps = make_source(tmp_path / "src", kinds=(".npz", ".hdf5", ".h5"))
    out = tmp_path / "out"
    rc, o, err = run(tmp_path / "src", out, "--image-layout", layout)
    assert rc == 0, err
    assert "as folder (detected)" in o and "episodes: 6 in, 6 written, 0 skipped" in o and "tasks: 3" in o
    assert o.strip().splitlines()[-1] == f"train: icrt_train --dataset-cfg.dataset-json {out / 'dataset_config.json'} " \
        "--model-cfg.policy-cfg.scratch-llama-config custom_transformer --logging-cfg.output-dir runs --logging-cfg.log-name out"
    spec = load_dataset_config(out / "dataset_config.json")
    with h5py.File(spec.dataset_path[0], "r") as f:
        for (task, i), e in eps.items():
            g = f[f"{task}_episode_{i}"]; T = len(e["action/gripper_position"])
            assert g["observation/exterior_image_1_left"].ndim == ndim
            np.testing.assert_array_equal(read_frames(g, "observation/exterior_image_1_left", 0, T), e["observation/exterior_image_1_left"])
            np.testing.assert_allclose(read_lowdim(g, "action/cartesian_position", 0, T), e["action/cartesian_position"], rtol=1e-6)
    out.rename(tmp_path / "moved")   # the result moves as a whole (relative paths) and passes the checker
    summary, problems = check_dataset(tmp_path / "moved" / "dataset_config.json")
    assert problems == [] and summary["episodes"] == 6


def test_existing_output_is_refused_then_replaced(tmp_path):
    make_source(tmp_path / "src")
    out = tmp_path / "out"; out.mkdir(); (out / "keep.txt").write_text("mine")
    rc, _, err = run(tmp_path / "src", out)
    assert rc == 1 and "already exists; pass --overwrite" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, err = run(tmp_path / "src", out, "--overwrite")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "dataset_config.json").exists()


def _missing_key(src):
    with h5py.File(src / "task1" / "rec_1.hdf5", "a") as f: del f["observation/gripper_position"]
    return "rec_1.hdf5: key 'observation/gripper_position': missing"

def _inconsistent_T(src):
    e = episode(5, 0); e["action/gripper_position"] = np.zeros((4, 1))
    np.savez(src / "task0" / "rec_0.npz", **e)
    return "rec_0.npz: key 'action/gripper_position': has 4 steps but"

def _empty_task(src):
    (src / "task2").mkdir()
    return "task2: task folder without episode files"

def _bad_images(src):
    e = episode(5, 0); e["observation/wrist_image_left"] = e["observation/wrist_image_left"].astype(np.float32)
    np.savez(src / "task0" / "rec_1.npz", **e)
    return "rec_1.npz: key 'observation/wrist_image_left': images must be uint8"

def _unknown(src):
    for d in src.iterdir():
        for p in d.iterdir(): p.rename(p.with_suffix(".bin"))
    return "unknown layout: not a LeRobot dataset"


@pytest.mark.parametrize("breakage", [_missing_key, _inconsistent_T, _empty_task, _bad_images, _unknown])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_input_is_one_line_and_loses_nothing(tmp_path, breakage, existing):
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src)
    if existing:  # a valid earlier conversion must survive a failed --overwrite
        assert run(src, out)[0] == 0
        before = (out / "dataset_config.json").read_text()
    expected = breakage(src)
    rc, _, err = run(src, out, *(["--overwrite"] if existing else []))
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("icrt_convert: error: ") and expected in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "src"] if existing else ["src"])
    if existing:
        assert (out / "dataset_config.json").read_text() == before and check_dataset(out / "dataset_config.json")[1] == []


def test_missing_source_and_empty_source(tmp_path):
    (tmp_path / "src").mkdir()
    rc, _, err = run(tmp_path / "src", tmp_path / "out", "--from", "folder")
    assert rc == 1 and "does not look like a folder dataset" in err and not (tmp_path / "out").exists()
    rc, _, err = run(tmp_path / "missing", tmp_path / "out")
    assert rc == 1 and "missing: source not found" in err


@pytest.fixture
def lift(tmp_path):
    "A robomimic-layout file of 3 demos (the documented layout; robomimic itself pins its own torch)."
    p = tmp_path / "lift.hdf5"
    return p, write_robomimic_example(p, demos=3, steps=40)


def _edit(path, demo, key, f):
    with h5py.File(path, "a") as h:
        a = h[f"data/{demo}/{key}"][()]; del h[f"data/{demo}/{key}"]; h[f"data/{demo}/{key}"] = f(a)


def test_nan_actions_are_skipped_and_counted_or_refused_with_strict(lift, tmp_path):
    path, demos = lift
    _edit(path, "demo_1", "actions", lambda a: np.where(np.arange(len(a))[:, None] == 7, np.nan, a))
    rc, o, err = run(path, tmp_path / "out", "--workers", "2", "--shard-episodes", "1")
    assert rc == 0, err
    assert "episodes: 3 in, 2 written, 1 skipped (NaN/inf in 'actions': 1)" in o
    spec = load_dataset_config(tmp_path / "out" / "dataset_config.json")
    assert sorted(spec.epi_len) == ["demo_0_episode", "demo_2_episode"] and check_dataset(spec.config_path)[1] == []
    rc, _, err = run(path, tmp_path / "strict", "--strict", "--shard-episodes", "1", "--workers", "1")
    assert rc == 1 and "episode data/demo_1: NaN/inf in 'actions' (first at step 7); drop the episode" in err and err.count("\n") == 1


@pytest.mark.parametrize("edit, args, expected", [
    (("demo_0", "obs/robot0_eef_quat", lambda q: 2 * q), [], "episode data/demo_0, key 'obs/robot0_eef_pos': quaternion norm 2.0000 at step 0 is not 1"),
    (("demo_0", "obs/robot0_gripper_qpos", lambda g: 85 * g), [], "gripper values span [0, 3.4], outside gripper_range [0.04, 0]"),
    (("demo_2", "obs/robot0_gripper_qpos", lambda g: 85 * g), ["--map", "gripper_range=auto"], "episode data/demo_2, key 'obs/robot0_gripper_qpos[0]': gripper values span [0, 3.4], outside [0, 1] and [-1, 1]; pass --map gripper_range=OPEN,CLOSED"),
    (None, ["--map", "cameras=obs/frontview_image"], "camera key 'obs/frontview_image' not found; cameras: obs/agentview_image, obs/robot0_eye_in_hand_image"),
    (None, ["--map", "rotation=quat_wxyz", "--map", "pose=obs/robot0_eef_pos"], "pose has 3 columns, but xyz + quat_wxyz is 7"),
    (None, ["--map", "flavour=x"], "--map flavour: unknown role"),
])
def test_mapping_errors_are_one_line_before_any_output(lift, tmp_path, edit, args, expected):
    path, _ = lift
    if edit: _edit(path, *edit)
    rc, _, err = run(path, tmp_path / "out", *args)
    assert rc == 1 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    # the first episode is read and mapped before anything is written; a later bad one keeps the finished shards
    assert (tmp_path / "out.partial").exists() == (edit is not None and edit[0] != "demo_0")


def test_robomimic_cli_lists_keys_and_converts(lift, tmp_path):
    path, demos = lift
    rc, o, _ = run(path, "--list-keys")
    assert rc == 0 and "robomimic, 3 episode(s) (0 to skip), 1 task(s)" in o and "obs/robot0_eef_quat  (4,) float64" in o
    rc, o, err = run(path, tmp_path / "out", "--image-size", "16", "20", "--task-from", "text:lift the cube")
    assert rc == 0, err
    assert "pose rotation quat_xyzw -> Euler XYZ" in o and "integrated from the state pose into absolute targets" in o
    spec = load_dataset_config(tmp_path / "out" / "dataset_config.json")
    assert list(spec.verb_to_episode) == ["lift the cube"] and spec.epi_len == {f"demo_{i}_episode": 40 + i for i in range(3)}
    with h5py.File(spec.dataset_path[0], "r") as f:
        assert tuple(f["demo_0_episode/observation/agentview_image"].attrs["frame_shape"]) == (16, 20, 3)


def _arrays(cfg):
    "{(episode, key): array} of a converted dataset."
    spec, out = load_dataset_config(cfg), {}
    for path, names in zip(spec.dataset_path, spec.hdf5_keys):
        with h5py.File(path) as f:
            for e in names:
                for k in spec.image_keys + spec.proprio_keys + spec.action_keys: out[e, k] = f[e][k][()]
    return out


@pytest.fixture
def many(tmp_path):
    "A robomimic file of 8 demos."
    p = tmp_path / "many.hdf5"; write_robomimic_example(p, demos=8, steps=30); return p


def test_sigkill_then_resume_finishes(many, tmp_path):
    out = tmp_path / "out"; part = tmp_path / "out.partial"
    p = cli(many, out, "--workers", "2", "--shard-episodes", "1", slow=True)
    t0 = time.time()
    while not list(part.glob("part-*.hdf5")) and time.time() - t0 < 120: time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()                       # the CLI and its workers, mid-run
    assert list(part.glob("part-*.hdf5")) and not out.exists()
    rc, _, err = run(many, out)
    assert rc == 1 and "an interrupted icrt_convert left this; pass --resume" in err and err.count("\n") == 1, err
    rc, o, err = run(many, out, "--resume", "--workers", "2", "--shard-episodes", "1")
    assert rc == 0 and "kept from the interrupted run" in o and not part.exists(), err
    summary, problems = check_dataset(out / "dataset_config.json")
    assert problems == [] and summary["episodes"] == 8
    ref = convert(many, tmp_path / "ref", shard_episodes=1, progress=False)
    a, b = _arrays(out / "dataset_config.json"), _arrays(ref["config"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_ctrl_c_says_how_to_resume(many, tmp_path):
    out = tmp_path / "out"
    p = cli(many, out, "--workers", "1", "--shard-episodes", "1", slow=True)
    t0 = time.time()
    while not list((tmp_path / "out.partial").glob("part-*.hdf5")) and time.time() - t0 < 120: time.sleep(0.05)
    p.send_signal(signal.SIGINT); _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "run again with --resume" in err, err
    rc, _, err = run(many, out, "--resume", "--shard-episodes", "1", "--workers", "1")
    assert rc == 0 and check_dataset(out / "dataset_config.json")[1] == [], err


def test_training_starts_from_a_converted_robomimic_dataset(assets, many, tmp_path, one_thread):
    from icrt.config import parse_args
    from icrt.tiny import recipe_flags, scale_down
    from icrt.train import train
    s = convert(many, tmp_path / "icrt", progress=False)
    assert "--shared-cfg.num-cameras" not in s["train_command"]          # two cameras, the default
    flags = scale_down(recipe_flags("train"), replace(assets, dataset_json=Path(s["config"])), tmp_path / "runs",
                       ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "16", "--dataset-cfg.non-overlapping", "48"])
    run_dir = train(parse_args(flags))
    assert (Path(run_dir) / "checkpoint-0.pth").is_file()
