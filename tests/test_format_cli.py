"End-to-end runs of the `icrt_check` and `icrt_convert` console scripts (icrt.data.format) in subprocesses."
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from icrt.data.format import (DEFAULT_ACTION_KEYS, DEFAULT_IMAGE_KEYS, DEFAULT_PROPRIO_KEYS, EpisodeWriter,
                              read_frames, read_lowdim, write_dataset_files)

REPO = Path(__file__).resolve().parents[1]
ALL_KEYS = DEFAULT_IMAGE_KEYS + DEFAULT_PROPRIO_KEYS + DEFAULT_ACTION_KEYS


def run_cli(fn, *args):
    "Run `icrt.data.format.<fn>()` as a console script would, with `args` as its command line."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    code = f"from icrt.data.format import {fn}; {fn}()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def episode(T, seed, quat=False, H=12, W=16):
    rng = np.random.default_rng(seed)
    d = {k: rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8) for k in DEFAULT_IMAGE_KEYS}
    d.update({k: rng.normal(size=(T, 7 if quat else 6)) for k in DEFAULT_PROPRIO_KEYS[:1] + DEFAULT_ACTION_KEYS[:1]})
    d.update({k: rng.uniform(size=(T, 1)) for k in DEFAULT_PROPRIO_KEYS[1:] + DEFAULT_ACTION_KEYS[1:]})
    return d


@pytest.fixture
def dataset(tmp_path):
    "A valid 2-task, 4-episode dataset in one HDF5 file; returns its config path."
    h5, names, lens, v2e = tmp_path / "data.hdf5", [], {}, {}
    with EpisodeWriter(h5) as w:
        for t, task in enumerate(["open", "close"]):
            for i in range(2):
                name = f"{task}_episode_{i}"
                lens[name] = w.write(name, episode(30 + t + i, 10 * t + i, quat=t == 1))
                names.append(name); v2e.setdefault(task, []).append(name)
    return write_dataset_files(tmp_path, [h5], [names], lens, v2e)


def test_check_good_dataset(dataset):
    r = run_cli("check_cli", dataset)
    assert r.returncode == 0, r.stderr
    assert "tasks: 2" in r.stdout and "episodes: 4" in r.stdout and "steps: 124" in r.stdout
    assert "observation/wrist_image_left: 12x16x3 uint8 (flat)" in r.stdout
    assert "observation/cartesian_position: 6, 7 float32" in r.stdout
    r = run_cli("check_cli", dataset, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["length"]["max"] == 32


def test_check_lists_every_problem(dataset):
    h5 = dataset.parent / "data.hdf5"
    with h5py.File(h5, "a") as f:
        f["open_episode_1/action/cartesian_position"][1, 2] = np.nan
        del f["close_episode_0/observation/wrist_image_left"]
        del f["close_episode_1/observation/exterior_image_1_left"]
        f.create_dataset("close_episode_1/observation/exterior_image_1_left", data=np.zeros((32, 100), np.uint8))
    lens = json.loads((dataset.parent / "epi_len_mapping.json").read_text())
    lens["open_episode_0"] = 40   # the file holds 30
    (dataset.parent / "epi_len_mapping.json").write_text(json.dumps(lens))
    r = run_cli("check_cli", dataset)
    assert r.returncode == 1
    err = r.stderr
    assert "4 problem(s)" in err, err
    assert f"{h5}: episode 'open_episode_1': key 'action/cartesian_position': 1 non-finite" in err
    assert f"{h5}: episode 'close_episode_0': key 'observation/wrist_image_left': missing" in err
    # no frame_shape attribute, "episode" in the name -> 180x320x3 expected, 100 bytes found
    assert f"{h5}: episode 'close_episode_1': key 'observation/exterior_image_1_left': flat image buffer has 100" in err
    assert f"{h5}: episode 'open_episode_0': key 'observation/exterior_image_1_left': has 30 steps but epi_len_mapping says 40" in err


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: (d / "data.hdf5").unlink(), "key 'dataset_path': HDF5 file"),
    (lambda d: (d / "verb_to_episode.json").write_text('{"open": ["open_episode_0"'), "verb_to_episode.json: malformed JSON"),
    (lambda d: (d / "hdf5_keys.json").write_text('["open_episode_0", "ghost_episode_7"]'), "episode 'ghost_episode_7'"),
    (lambda d: (d / "verb_to_episode.json").write_text('{"open": []}'), "task 'open': task with no episodes"),
])
def test_check_config_problems(dataset, breakage, expected):
    breakage(dataset.parent)
    r = run_cli("check_cli", dataset)
    assert r.returncode == 1 and expected in r.stderr, r.stderr


def test_check_fails_when_no_episode_is_usable(tmp_path):
    "Every episode outside the 30-450 steps a training run keeps: icrt_check exits 1 saying why; nothing is changed."
    h5, names, lens = tmp_path / "short.hdf5", [], {}
    with EpisodeWriter(h5) as w:
        for i in range(3):
            names.append(f"pick_episode_{i}"); lens[names[-1]] = w.write(names[-1], episode(12 + i, i))
    cfg = write_dataset_files(tmp_path, [h5], [names], lens, {"pick": names})
    before = {p: p.read_bytes() for p in sorted(tmp_path.iterdir())}
    r = run_cli("check_cli", cfg)
    assert r.returncode == 1, r.stdout
    assert "1 problem(s)" in r.stderr and "no episode has 30-450 steps (they have 12-14)" in r.stderr
    assert "no run can use this dataset" in r.stderr
    assert {p: p.read_bytes() for p in sorted(tmp_path.iterdir())} == before


def test_check_missing_config(tmp_path):
    r = run_cli("check_cli", tmp_path / "nope.json")
    assert r.returncode == 1 and "nope.json: dataset config file not found" in r.stderr


def make_source(root, kinds=(".npz", ".hdf5"), n=2):
    "root/<task>/rec_i.<ext>, one task per kind; returns {(task, i): episode dict}."
    eps = {}
    for t, ext in enumerate(kinds):
        task = f"task{t}"
        (root / task).mkdir(parents=True)
        for i in range(n):
            e = eps[(task, i)] = episode(30 + i + t, 100 + 10 * t + i)
            if ext == ".npz":
                np.savez(root / task / f"rec_{i}.npz", **e)
            else:
                with h5py.File(root / task / f"rec_{i}{ext}", "w") as f:
                    for k, v in e.items(): f[k] = v
    return eps


@pytest.mark.parametrize("layout, ndim", [("flat", 2), ("plain", 4)])
def test_convert_round_trip(tmp_path, layout, ndim):
    eps = make_source(tmp_path / "src", kinds=(".npz", ".hdf5", ".h5"))
    out = tmp_path / "out"
    r = run_cli("convert_cli", tmp_path / "src", out, "--image-layout", layout)
    assert r.returncode == 0, r.stderr
    assert "3 tasks, 6 episodes" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["dataset.hdf5", "dataset_config.json", "epi_len_mapping.json",
                                                     "hdf5_keys.json", "verb_to_episode.json"]
    cfg = json.loads((out / "dataset_config.json").read_text())
    assert cfg["dataset_path"] == ["dataset.hdf5"] and cfg["hdf5_keys"] == ["hdf5_keys.json"]
    with h5py.File(out / "dataset.hdf5", "r") as f:
        for (task, i), e in eps.items():
            g = f[f"{task}_episode_{i}"]
            T = len(e["action/gripper_position"])
            assert g["observation/exterior_image_1_left"].ndim == ndim
            np.testing.assert_array_equal(read_frames(g, "observation/exterior_image_1_left", 0, T), e["observation/exterior_image_1_left"])
            np.testing.assert_allclose(read_lowdim(g, "action/cartesian_position", 0, T), e["action/cartesian_position"], rtol=1e-6)
    # the result moves as a whole (relative paths) and passes the checker
    moved = tmp_path / "moved"
    out.rename(moved)
    r = run_cli("check_cli", moved / "dataset_config.json")
    assert r.returncode == 0 and "episodes: 6" in r.stdout, r.stderr


def test_convert_refuses_to_overwrite(tmp_path):
    make_source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir(); (out / "keep.txt").write_text("mine")
    r = run_cli("convert_cli", tmp_path / "src", out)
    assert r.returncode == 1 and "already exists; pass --overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = run_cli("convert_cli", tmp_path / "src", out, "--overwrite")
    assert r.returncode == 0, r.stderr
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

def _nan(src):
    e = episode(5, 0); e["observation/cartesian_position"][3, 1] = np.inf
    np.savez(src / "task0" / "rec_0.npz", **e)
    return "rec_0.npz: key 'observation/cartesian_position': NaN/inf at steps [3]"

def _bad_images(src):
    e = episode(5, 0); e["observation/wrist_image_left"] = e["observation/wrist_image_left"].astype(np.float32)
    np.savez(src / "task0" / "rec_0.npz", **e)
    return "rec_0.npz: key 'observation/wrist_image_left': images must be uint8"


@pytest.mark.parametrize("breakage", [_missing_key, _inconsistent_T, _empty_task, _nan, _bad_images])
@pytest.mark.parametrize("existing", [False, True])
def test_convert_bad_input(tmp_path, breakage, existing):
    src = tmp_path / "src"
    make_source(src)
    out = tmp_path / "out"
    if existing:  # a valid earlier conversion must survive a failed --overwrite
        assert run_cli("convert_cli", src, out).returncode == 0
        before = (out / "dataset_config.json").read_text()
    expected = breakage(src)
    r = run_cli("convert_cli", src, out, *(["--overwrite"] if existing else []))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrt_convert: error: ") and expected in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "src"] if existing else ["src"])
    if existing:
        assert (out / "dataset_config.json").read_text() == before
        assert run_cli("check_cli", out / "dataset_config.json").returncode == 0


def test_convert_empty_source(tmp_path):
    (tmp_path / "src").mkdir()
    r = run_cli("convert_cli", tmp_path / "src", tmp_path / "out")
    assert r.returncode == 1 and "no task folders" in r.stderr and not (tmp_path / "out").exists()
    r = run_cli("convert_cli", tmp_path / "missing", tmp_path / "out")
    assert r.returncode == 1 and "source folder not found" in r.stderr


def test_cli_help():
    for fn in ("check_cli", "convert_cli"):
        r = run_cli(fn, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout
    assert "--image-layout" in run_cli("convert_cli", "-h").stdout
