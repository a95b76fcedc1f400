"""`icrt_convert SRC OUT --from lerobot`: LeRobot v3.0 and v2.1 datasets read, converted, checked and trained on.

The fixtures are written by `icrt.data.lerobot.write_lerobot_example`, a writer of the LeRobotDataset layouts made
from the format's specification (meta/info.json, meta/episodes/ or episodes.jsonl, data/ parquet, videos/ MP4s encoded
with PyAV), because LeRobot's own writer cannot be installed beside this project: lerobot-dataset 0.4.4 pins
av<16, huggingface-hub<0.36 and packaging<26 (this environment has av 18, and transformers 5 needs huggingface-hub>=1.31).
A dataset written by lerobot-dataset 0.4.4 itself (in a separate virtual environment) was read by the same reader
when this was written; `test_reads_a_dataset_written_by_lerobot` reruns that check when the `ledataset` package is there.
"""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import FAST, one_line_error
from icrt.config import parse_args
from icrt.data.convert import convert
from icrt.data.format import DatasetError, check_dataset, load_dataset_config, read_frames, read_lowdim
from icrt.data.lerobot import LeRobotSource, psnr, write_lerobot_example
from icrt.tiny import recipe_flags, scale_down

REPO = Path(__file__).resolve().parents[1]
CAMS = {"front": "observation.images.front", "wrist": "observation.images.wrist"}


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    "A v3.0 dataset: 6 episodes of 30-36 steps at 48x64, 2 per data file, 3 per video file, 2 files per chunk folder."
    return write_lerobot_example(tmp_path_factory.mktemp("lerobot") / "v3", "v3.0", episodes=6, steps=(30, 36),
                                 chunks_size=2, seed=3)


@pytest.fixture(scope="module")
def v21(tmp_path_factory):
    "A v2.1 dataset: 4 episodes, two video cameras and one PNG image camera."
    return write_lerobot_example(tmp_path_factory.mktemp("lerobot") / "v21", "v2.1", episodes=4, steps=(30, 36),
                                 image_cameras=("observation.images.side",), seed=4)


def converted(cfg)->dict:
    "{episode name: {ICRT key: array}} of a converted dataset, and its loaded config."
    spec, out = load_dataset_config(cfg), {}
    for path, names in zip(spec.dataset_path, spec.hdf5_keys):
        with h5py.File(path, "r") as f:
            for n in names:
                T = spec.epi_len[n]
                out[n] = {k: read_frames(f[n], k, 0, T) for k in spec.image_keys}
                out[n].update({k: read_lowdim(f[n], k, 0, T) for k in spec.proprio_keys + spec.action_keys})
    return out, spec


def assert_same_episodes(cfg, ex:dict, cams:dict):
    "The converted dataset at `cfg` holds example `ex`: frames (PSNR >= 40 dB), poses, grippers, lengths and tasks."
    got, spec = converted(cfg)
    assert sorted(got) == [f"episode_{e['episode_index']:06d}" for e in ex["episodes"]]
    for e in ex["episodes"]:
        g, T = got[f"episode_{e['episode_index']:06d}"], e["length"]
        assert spec.epi_len[f"episode_{e['episode_index']:06d}"] == T
        for name, key in cams.items():
            assert g[f"observation/{name}"].shape == (T, 48, 64, 3)
            assert psnr(g[f"observation/{name}"], e["frames"][key]) >= 40, (e["episode_index"], key)
        s, a = e["observation.state"], e["action"]
        np.testing.assert_allclose(g["observation/cartesian_position"], s[:, :6], atol=1e-6)
        np.testing.assert_allclose(g["observation/gripper_position"], s[:, 6:], atol=1e-6)
        np.testing.assert_allclose(g["action/cartesian_position"], a[:, :6], atol=1e-6)
        np.testing.assert_allclose(g["action/gripper_position"], a[:, 6:], atol=1e-6)
    tasks = {}
    for e in ex["episodes"]: tasks.setdefault(e["task"], []).append(f"episode_{e['episode_index']:06d}")
    assert {t: sorted(v) for t, v in spec.verb_to_episode.items()} == tasks


def run_cli(module:str, fn:str, *args):
    "`python -c 'from MODULE import FN; FN()' ARGS` as its console script runs."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", f"from {module} import {fn}; {fn}()", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("version", ["v3", "v21"])
def test_read_returns_what_was_written(version, v3, v21):
    "read() of every episode: frames within 40 dB of the written ones (PNG images exact), states/actions exact, metadata lengths and tasks."
    ex = {"v3": v3, "v21": v21}[version]
    src = LeRobotSource(ex["path"])
    refs = src.episodes()
    assert [(r.name, r.task, r.length) for r in refs] == [(f"episode_{e['episode_index']:06d}", e["task"], e["length"])
                                                          for e in ex["episodes"]]
    for r, e in zip(refs, ex["episodes"]):
        keys = list(e["frames"]) + ["observation.state", "action"]
        got = src.read(r, keys)
        assert all(len(got[k]) == e["length"] for k in keys)
        for k in e["frames"]:
            if src.features[k]["dtype"] == "image": np.testing.assert_array_equal(got[k], e["frames"][k])
            else: assert psnr(got[k], e["frames"][k]) >= 40, (r.name, k)
        np.testing.assert_allclose(got["observation.state"], e["observation.state"], atol=1e-6)
        np.testing.assert_allclose(got["action"], e["action"], atol=1e-6)


def test_convert_v3_then_icrt_check(v3, tmp_path):
    "convert() of the v3.0 dataset with the default mapping, in 2 shards and 2 workers: same frames, poses, lengths, tasks; icrt_check passes."
    s = convert(v3["path"], tmp_path / "out", workers=2, shard_episodes=3, progress=False)
    assert (s["kind"], s["detected"], s["episodes_written"], s["tasks"], s["frames"]) == \
        ("lerobot", True, 6, 2, 2 * sum(e["length"] for e in v3["episodes"]))
    assert_same_episodes(s["config"], v3, CAMS)
    assert check_dataset(s["config"])[1] == []


def test_cli_converts_v21_then_icrt_check_passes(v21, tmp_path):
    "`icrt_convert SRC OUT --from lerobot` on the v2.1 dataset (3 cameras, one of PNG images), then `icrt_check OUT/dataset_config.json`."
    out = tmp_path / "out"
    r = run_cli("icrt.data.convert", "convert_cli", v21["path"], out, "--from", "lerobot", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "read " in r.stdout and "as lerobot" in r.stdout and "episodes: 4 in, 4 written, 0 skipped" in r.stdout, r.stdout
    assert_same_episodes(out / "dataset_config.json", v21, dict(CAMS, side="observation.images.side"))
    c = run_cli("icrt.data.format", "check_cli", out / "dataset_config.json")
    assert c.returncode == 0, c.stdout + c.stderr


def test_cli_list_keys(v3):
    "--list-keys names the format, the episodes and every feature, and prints the default mapping."
    r = run_cli("icrt.data.convert", "convert_cli", v3["path"], "--list-keys")
    assert r.returncode == 0, r.stderr
    assert "lerobot, 6 episode(s)" in r.stdout and "2 task(s)" in r.stdout
    assert "observation.images.front  (48, 64, 3) uint8" in r.stdout
    assert '"pose": ["observation.state[0:6]"]' in r.stdout


def test_video_shorter_than_its_episode(tmp_path):
    "A v3 video file whose last episode lost 4 frames: read() and icrt_convert refuse it in one line naming the mp4, episode and key."
    ex = write_lerobot_example(tmp_path / "short", "v3.0", episodes=3, steps=30, video_episodes_per_file=3,
                               drop_frames={(2, "observation.images.wrist"): 4}, keep_frames=False)
    src = LeRobotSource(ex["path"]); ref = src.episodes()[2]
    with pytest.raises(DatasetError) as e: src.read(ref, ["observation.images.wrist"])
    one_line_error(e, "videos/observation.images.wrist/chunk-000/file-000.mp4: episode 2, key 'observation.images.wrist'",
                   "video has 26 frames for the episode's 30 steps; re-encode or drop the episode")
    r = run_cli("icrt.data.convert", "convert_cli", ex["path"], tmp_path / "out", "--workers", "1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "file-000.mp4: episode 2, key 'observation.images.wrist': video has 26 frames" in r.stderr
    assert not (tmp_path / "out").exists()


def test_v21_video_shorter_than_its_episode(tmp_path):
    "The same in v2.1, where each episode has its own mp4."
    ex = write_lerobot_example(tmp_path / "short", "v2.1", episodes=2, steps=12, drop_frames={(1, "observation.images.front"): 1},
                               keep_frames=False)
    src = LeRobotSource(ex["path"])
    with pytest.raises(DatasetError) as e: src.read(src.episodes()[1], ["observation.images.front", "action"])
    one_line_error(e, "videos/chunk-000/observation.images.front/episode_000001.mp4: episode 1, key 'observation.images.front'",
                   "video has 11 frames for the episode's 12 steps")


def test_unknown_camera_key(v3, tmp_path):
    "A camera key the dataset lacks: read() lists the dataset's keys; icrt_convert --map cameras=... lists its cameras."
    src = LeRobotSource(v3["path"])
    with pytest.raises(DatasetError) as e: src.read(src.episodes()[0], ["observation.images.top"])
    one_line_error(e, "episode 0: key 'observation.images.top' not found; this dataset has: observation.state, action, "
                      "observation.images.front, observation.images.wrist, timestamp")
    r = run_cli("icrt.data.convert", "convert_cli", v3["path"], tmp_path / "out", "--map", "cameras=observation.images.top")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "camera key 'observation.images.top' not found; cameras: observation.images.front, observation.images.wrist" in r.stderr


def test_unsupported_version(tmp_path):
    "A v1.6 info.json (or a future v4.0) is refused in one line saying which versions are read."
    (tmp_path / "old" / "meta").mkdir(parents=True)
    (tmp_path / "old" / "meta" / "info.json").write_text('{"codebase_version": "v1.6", "fps": 10, "features": {}}')
    with pytest.raises(DatasetError) as e: convert(tmp_path / "old", tmp_path / "out", progress=False)
    one_line_error(e, "meta/info.json: codebase_version v1.6: not supported", "v2.x (v2.0, v2.1) and v3.x (v3.0)")


def test_metadata_length_disagrees_with_rows(tmp_path):
    "An episode whose recorded length is not its row count is refused, naming the data file and episode."
    import json
    ex = write_lerobot_example(tmp_path / "v21", "v2.1", episodes=2, steps=10, cameras=(), keep_frames=False)
    p = Path(ex["path"]) / "meta" / "episodes.jsonl"
    rows = [json.loads(l) for l in p.read_text().splitlines()]; rows[1]["length"] = 12
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = LeRobotSource(ex["path"])
    with pytest.raises(DatasetError) as e: src.read(src.episodes()[1], ["action"])
    one_line_error(e, "episode_000001.parquet, episode 1: 10 rows for the episode's 12 steps")


def test_training_starts_from_a_converted_dataset(assets, tmp_path, one_thread):
    "The tiny guide recipe trains one epoch on a converted v3.0 dataset (2 tasks x 5 episodes, 2 cameras, 48x64)."
    from icrt.train import train
    ex = write_lerobot_example(tmp_path / "v3", "v3.0", episodes=10, steps=(30, 40), keep_frames=False, seed=5)
    s = convert(ex["path"], tmp_path / "icrt", train_split=0.9, progress=False)
    flags = scale_down(recipe_flags("train"), replace(assets, dataset_json=Path(s["config"])), tmp_path / "runs", FAST)
    run = train(parse_args(flags))
    assert (run / "checkpoint-0.pth").is_file()


def test_reads_a_dataset_written_by_lerobot(tmp_path):
    "A v3.0 dataset made by LeRobot's own LeRobotDataset.create/add_frame/save_episode (lerobot-dataset 0.4.4, libsvtav1)."
    ledataset = pytest.importorskip("ledataset", reason="lerobot-dataset is not installed (it pins av<16; see the module docstring)")
    from ledataset.datasets.lerobot_dataset import LeRobotDataset
    names = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    feats = {"observation.state": {"dtype": "float32", "shape": (7,), "names": names},
             "action": {"dtype": "float32", "shape": (7,), "names": names},
             "observation.images.top": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]}}
    ds = LeRobotDataset.create("local/test", fps=10, features=feats, root=tmp_path / "le", vcodec="libsvtav1")
    rng, truth = np.random.default_rng(0), []
    for e, T in enumerate([12, 9, 15]):
        st = rng.normal(size=(T, 7)).astype(np.float32)
        frames = [np.full((48, 64, 3), (e * 60 + t * 5) % 255, np.uint8) for t in range(T)]
        for t in range(T): ds.add_frame({"observation.state": st[t], "action": st[t], "observation.images.top": frames[t], "task": f"task {e % 2}"})
        ds.save_episode(); truth.append((st, np.stack(frames), f"task {e % 2}"))
    ds.finalize()   # writes the buffered meta/episodes/ parquet
    src = LeRobotSource(tmp_path / "le")
    for r, (st, frames, task) in zip(src.episodes(), truth):
        got = src.read(r, ["observation.state", "observation.images.top"])
        assert r.task == task and r.length == len(st)
        np.testing.assert_array_equal(got["observation.state"], st)
        assert psnr(got["observation.images.top"], frames) >= 40


def test_bench_convert_cli(tmp_path):
    "`icrt_bench_convert` on a tiny set (3 episodes of 30 steps at 48x64, one worker): JSON with frames/s and the machine."
    import json
    r = run_cli("icrt.bench.convert", "bench_convert_cli", "--out", tmp_path, "--episodes", "3", "--steps", "30",
                "--size", "48", "64", "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["runs"][0]["frames"] == 180 and res["runs"][0]["frames_per_s"] > 0 and res["machine"]["cores"] >= 1
    assert (tmp_path / "bench_convert.json").is_file()


# --- incomplete or damaged metadata and files (issue 28), a missing optional package (issue 27) ----------------------
import json


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_episode_metadata_missing_episodes_refused(tmp_path, version):
    """info.json says 6 episodes but the episode metadata lists 4 (v3: one meta/episodes parquet file gone; v2.1: two
    episodes.jsonl lines gone): refused in one line naming both counts and the missing episode indices, before any
    output. Before: 4 of 6 converted with rc 0, and the result passed icrt_check."""
    ex = write_lerobot_example(tmp_path / "le", version, episodes=6, steps=30, cameras=(), image_cameras=("observation.images.side",),
                               episodes_per_file=2, keep_frames=False)
    meta = Path(ex["path"]) / "meta"
    if version == "v3.0": (meta / "episodes" / "chunk-000" / "file-001.parquet").unlink()
    else:
        lines = (meta / "episodes.jsonl").read_text().splitlines(keepends=True)
        (meta / "episodes.jsonl").write_text("".join(lines[:2] + lines[4:]))
    with pytest.raises(DatasetError) as e: convert(ex["path"], tmp_path / "out", progress=False)
    one_line_error(e, "4 episodes", "info.json", "total_episodes 6", "missing episode_index 2, 3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("edit,needle", [({"features": "x"}, "'features' is a str"), ({"fps": "ten"}, "fps 'ten'"),
                                         ({"fps": 0}, "fps 0"), ({"features": {"action": 3}}, "features['action'] is a int"),
                                         ({"features": {"action": {"dtype": "float32", "shape": "7"}}}, "features['action']: shape '7'"),
                                         ({"total_episodes": "six"}, "total_episodes 'six'")])
def test_damaged_info_json_is_one_line(tmp_path, edit, needle):
    "A damaged meta/info.json value: one line naming the file and the value, before any output (before: AttributeError, ValueError)."
    ex = write_lerobot_example(tmp_path / "le", "v2.1", episodes=2, steps=10, cameras=(), image_cameras=("observation.images.side",),
                               keep_frames=False)
    p = Path(ex["path"]) / "meta" / "info.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **edit}))
    with pytest.raises(DatasetError) as e: convert(ex["path"], tmp_path / "out", progress=False)
    one_line_error(e, str(p), needle)
    assert not (tmp_path / "out").exists()


def test_truncated_data_parquet_then_resume(tmp_path):
    """A truncated data parquet (the second of two): icrt_convert stops with one line naming the file and saying how
    to go on (restore it, then --resume); once restored, --resume keeps the shard already converted and finishes.
    Before: an ArrowInvalid traceback, leaving OUT.partial with no hint."""
    ex = write_lerobot_example(tmp_path / "le", "v3.0", episodes=4, steps=30, cameras=("observation.images.front",),
                               episodes_per_file=2, keep_frames=False)
    f = Path(ex["path"]) / "data" / "chunk-000" / "file-001.parquet"
    good = f.read_bytes(); f.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    r = run_cli("icrt.data.convert", "convert_cli", ex["path"], out, "--workers", "1", "--shard-episodes", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert str(f) in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    f.write_bytes(good)
    r = run_cli("icrt.data.convert", "convert_cli", ex["path"], out, "--workers", "1", "--shard-episodes", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert "episodes: 4 in, 4 written" in r.stdout and "resumed: 1 of 2 shard(s)" in r.stdout, r.stdout


@pytest.mark.parametrize("package", ["av", "pyarrow"])
def test_missing_optional_package_is_one_line(tmp_path, monkeypatch, capsys, package):
    """Without PyAV (or pyarrow), `icrt_convert --from lerobot` says in one line which install brings them (the
    `convert` extra of setup.py); detecting another format still works. Before: a ModuleNotFoundError traceback."""
    from icrt.data.convert import convert_cli, write_robomimic_example
    monkeypatch.setitem(sys.modules, package, None)   # `import av` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "icrt.data.lerobot")
    (tmp_path / "le" / "meta").mkdir(parents=True)
    (tmp_path / "le" / "meta" / "info.json").write_text('{"codebase_version": "v3.0", "fps": 10, "features": {}}')
    with pytest.raises(SystemExit) as e: convert_cli([str(tmp_path / "le"), str(tmp_path / "out"), "--from", "lerobot"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("icrt_convert: error:") and "pip install 'icrt[convert]'" in err and package in err, err
    write_robomimic_example(tmp_path / "lift.hdf5", demos=2, steps=30)
    convert_cli([str(tmp_path / "lift.hdf5"), "--list-keys"])
    assert "robomimic, 2 episode(s)" in capsys.readouterr().out
