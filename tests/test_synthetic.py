"End-to-end tests of the synthetic data generator: the `icrt_synth` CLI, bad input, the closed-loop API, speed."
import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from icrt.data.format import check_dataset, load_dataset_config
from icrt.data.synthetic import (TASKS, SyntheticScene, expert_episode, make_synthetic_dataset, task_success)

CLI = [sys.executable, "-c", "from icrt.data.synthetic import synth_cli; synth_cli()"]


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)


def test_cli_writes_a_dataset_that_passes_check(tmp_path):
    out = tmp_path / "synth"
    res = run_cli(out, "--tasks", 2, "--episodes-per-task", 4, "--height", 48, "--width", 64)
    assert res.returncode == 0, res.stderr
    assert "dataset config:" in res.stdout
    cfg = out / "dataset_config.json"
    summary, problems = check_dataset(cfg)
    assert problems == []
    assert (summary["tasks"], summary["episodes"]) == (2, 8)
    spec = load_dataset_config(cfg)
    assert sorted(spec.verb_to_episode) == sorted(t.name for t in TASKS[:2])
    assert all("episode" in n for n in spec.hdf5_keys[0])
    assert all(30 <= n <= 150 for n in spec.epi_len.values())
    grouping = json.loads((out / "task_grouping.json").read_text())
    assert grouping["tasks"] == {"reach": ["reach_red"], "push": ["push_blue_left"]}
    with h5py.File(spec.dataset_path[0]) as f:
        ds = f["push_blue_left_episode_3/observation/exterior_image_1_left"]
        assert ds.ndim == 2 and ds.shape[1] == 48 * 64 * 3            # original flat-buffer layout
        assert tuple(ds.attrs["frame_shape"]) == (48, 64, 3)
        assert f["push_blue_left_episode_3/action/cartesian_position"].shape[1] == 6


def test_cli_plain_layout_and_seed(tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 3)]:
        res = run_cli(tmp_path / name, "--tasks", 1, "--episodes-per-task", 2, "--height", 24, "--width", 32,
                      "--seed", seed, "--image-layout", "plain")
        assert res.returncode == 0, res.stderr
    assert check_dataset(tmp_path / "a/dataset_config.json")[1] == []
    key = "reach_red_episode_1"
    with h5py.File(tmp_path / "a/synthetic.hdf5") as a, h5py.File(tmp_path / "b/synthetic.hdf5") as b, \
         h5py.File(tmp_path / "c/synthetic.hdf5") as c:
        assert a[f"{key}/observation/wrist_image_left"].shape[1:] == (24, 32, 3)
        np.testing.assert_array_equal(a[f"{key}/observation/wrist_image_left"][:], b[f"{key}/observation/wrist_image_left"][:])
        np.testing.assert_array_equal(a[f"{key}/action/cartesian_position"][:], b[f"{key}/action/cartesian_position"][:])
        assert a[f"{key}/action/cartesian_position"].shape != c[f"{key}/action/cartesian_position"].shape or \
            not np.allclose(a[f"{key}/action/cartesian_position"][:], c[f"{key}/action/cartesian_position"][:])


@pytest.mark.parametrize("args, msg", [(["--tasks", 13], "num_tasks=13"), (["--tasks", 0], "num_tasks=0"),
                                       (["--episodes-per-task", 0], "episodes_per_task=0"),
                                       (["--min-len", 60, "--max-len", 40], "min_len"),
                                       (["--height", 4], "image size")])
def test_cli_bad_input(tmp_path, args, msg):
    res = run_cli(tmp_path / "bad", *args)
    assert res.returncode != 0
    assert msg in res.stderr
    assert not (tmp_path / "bad" / "dataset_config.json").exists()


def test_expert_replays_closed_loop_and_tasks_differ():
    "Replaying an expert's actions through `step` succeeds; doing nothing, or another task's actions, does not."
    for seed in range(3):
        scene = SyntheticScene.sample(seed)
        acts = {}
        for t in TASKS[:6]:
            ep = expert_episode(t, scene, seed)
            assert ep["success"]
            acts[t.name] = np.c_[ep["action/cartesian_position"], ep["action/gripper_position"]]
        for t in TASKS[:6]:
            assert not task_success(t, scene, scene.reset())
            for name, a in acts.items():
                s = scene.reset()
                for x in a: s = scene.step(s, x)
                assert task_success(t, scene, s) == (name == t.name), (t.name, name)


def test_same_task_demos_are_closer_than_other_tasks():
    "In one scene, two demos of a task differ by noise only; demos of different tasks differ by their goal."
    def resampled(ep, n=50):
        a = ep["action/cartesian_position"][:, :3]
        t = np.linspace(0, len(a) - 1, n)
        return np.stack([np.interp(t, np.arange(len(a)), a[:, j]) for j in range(3)], 1)
    same, other = [], []
    for seed in range(5):
        scene = SyntheticScene.sample(seed)
        demos = {k: [resampled(expert_episode(k, scene, r)) for r in (100 + seed, 200 + seed)] for k in range(6)}
        for k in range(6):
            same.append(np.abs(demos[k][0] - demos[k][1]).mean())
            other += [np.abs(demos[k][0] - demos[j][0]).mean() for j in range(6) if j != k]
    assert np.mean(other) > 5 * np.mean(same)
    assert min(other) > max(same)


@pytest.mark.slow
def test_default_dataset_is_fast(tmp_path):
    t0 = time.time()
    cfg = make_synthetic_dataset(tmp_path / "default", progress=False)   # 6 tasks x 10 episodes at 180x320
    dt = time.time() - t0
    assert dt < 30, f"6 x 10 episodes at 180x320 took {dt:.1f} s"
    summary, problems = check_dataset(cfg, max_episodes=3)
    assert problems == [] and summary["episodes"] == 60
