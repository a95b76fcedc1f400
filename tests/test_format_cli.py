"End-to-end runs of the `icrt_check` console script (icrt.data.format) in subprocesses (icrt_convert: test_convert.py)."
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from icrt.data.format import (DEFAULT_ACTION_KEYS, DEFAULT_IMAGE_KEYS, DEFAULT_PROPRIO_KEYS, EpisodeWriter, write_dataset_files)

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


def test_cli_help():
    r = run_cli("check_cli", "--help")
    assert r.returncode == 0 and "usage:" in r.stdout
