"""`icrt_convert SRC OUT --from droid` on raw DROID episode folders, as a user runs it.

The fixture is written by `icrt.data.droid.write_droid_example` from DROID's documented raw layout (docs/the-droid-dataset.md,
droid/trajectory_utils/trajectory_writer.py, droid/postprocessing/schema.py and util/svo2mp4.py of droid-dataset/droid):
`<LAB>/success|failure/<date>/<time>/` folders with `trajectory.h5`, `metadata_<id>.json`, `recordings/MP4/<serial>.mp4`
(real H.264 files, one frame per step) and a `droid_language_annotations.json` next to them. DROID's own tooling cannot
write or read these here: it is not on PyPI, pins mujoco 2.3.2 / opencv 4.6.0.66 / dm-control 1.0.5, and its camera code
needs `pyzed.sl` from the ZED SDK installer (PyPI's `pyzed` is an unrelated module).
"""
import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import one_line_error
from icrt.config import parse_args
from icrt.data.convert import convert, open_source
from icrt.data.droid import DroidSource, episode_cameras, psnr, write_droid_example, write_mp4
from icrt.data.format import DatasetError, check_dataset, load_dataset_config, read_frames, read_lowdim
from icrt.tiny import recipe_flags, scale_down

REPO = Path(__file__).resolve().parents[1]
CAMS = {"exterior_image_1_left": "observation/exterior_image_1_left", "wrist_image_left": "observation/wrist_image_left"}


@pytest.fixture(scope="module")
def droid(tmp_path_factory):
    "13 raw DROID episodes of 2 tasks over 2 days, 30-36 steps at 48x64; the last one failed (under failure/)."
    return write_droid_example(tmp_path_factory.mktemp("droid")/"raw", episodes=13, failed=1, steps=(30, 36))


@pytest.fixture(scope="module")
def converted(droid, tmp_path_factory):
    "convert() of the fixture with the default (no) mapping: (summary, output folder)."
    out = tmp_path_factory.mktemp("conv")/"icrt"
    return convert(droid["root"], out, source="droid", progress=False), out


def copy_of(droid, tmp_path)->Path:
    "A copy of the fixture a test may damage."
    return Path(shutil.copytree(droid["root"], tmp_path/"raw"))


def cli(*args):
    "`icrt_convert ARGS` in a fresh process (the console script of icrt.data.convert)."
    return subprocess.run([sys.executable, "-c", "from icrt.data.convert import convert_cli; convert_cli()", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def output_episodes(cfg):
    "{source folder: (episode group name, task, hdf5 file)} of a converted dataset."
    spec = load_dataset_config(cfg)
    out = {}
    for i, names in enumerate(spec.hdf5_keys):
        with h5py.File(spec.dataset_path[i]) as f:
            for n in names: out[f[n].attrs["source"]] = (n, spec.episode_task[n], spec.dataset_path[i])
    return out


def test_convert_keeps_frames_poses_lengths_and_tasks(droid, converted):
    "Every successful episode comes out with its length and task, frames >= 40 dB, poses and grippers to 1e-6."
    s, out = converted
    ok = {rel: e for rel, e in droid["episodes"].items() if e["success"]}
    assert (s["kind"], s["episodes_in"], s["episodes_written"]) == ("droid", 13, 12)
    assert s["skipped"] == {"failed (success=false)": 1} and s["tasks"] == 2
    eps = output_episodes(s["config"])
    assert sorted(str(Path(p).relative_to(droid["root"])) for p in eps) == sorted(ok)
    spec = load_dataset_config(s["config"])
    for src, (name, task, h5) in eps.items():
        e = ok[str(Path(src).relative_to(droid["root"]))]
        assert task == e["task"] and spec.epi_len[name] == e["length"]
        with h5py.File(h5) as f:
            g, T = f[name], e["length"]
            for cam, key in CAMS.items():
                got = read_frames(g, key, 0, T)
                assert got.shape == (T, 48, 64, 3) and psnr(e["frames"][cam], got) >= 40, (name, cam)
            for key, want in (("observation/cartesian_position", e["pose"]), ("action/cartesian_position", e["action_pose"])):
                got = read_lowdim(g, key, 0, T).astype(np.float64)
                np.testing.assert_allclose(got[:, :3], want[:, :3], atol=1e-6)
                dang = np.angle(np.exp(1j*(got[:, 3:] - want[:, 3:])))   # Euler angles: compared modulo 2 pi
                assert np.abs(dang).max() < 1e-6, (name, key)
            for key, want in (("observation/gripper_position", e["grip"]), ("action/gripper_position", e["action_grip"])):
                np.testing.assert_allclose(read_lowdim(g, key, 0, T)[:, 0], want, atol=1e-6)


def test_converted_dataset_passes_icrt_check(converted):
    "icrt_check (the checker, and its console script) finds no problem in the converted dataset."
    s, _ = converted
    summary, problems = check_dataset(s["config"])
    assert problems == [] and summary["episodes"] == 12 and summary["tasks"] == 2
    p = subprocess.run([sys.executable, "-c", "from icrt.data.format import check_cli; check_cli()", s["config"]],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_cli_from_droid_with_two_workers(droid, tmp_path):
    "`icrt_convert SRC OUT --from droid --workers 2`: spawn workers get the pickled source; the summary counts the failure."
    p = cli(droid["root"], tmp_path/"out", "--from", "droid", "--workers", "2", "--shard-episodes", "7", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["episodes_written"], s["skipped"], s["shards"]) == (12, {"failed (success=false)": 1}, 2)
    assert check_dataset(s["config"])[1] == []


def test_source_is_detected_listed_and_picklable(droid):
    "Without --from the folder is detected as DROID; the source and its episodes pickle (for spawn workers)."
    src = open_source(droid["root"])
    assert isinstance(src, DroidSource)
    refs = src.episodes()
    assert [r.name for r in refs] == [f"episode_{i:06d}" for i in range(13)]
    assert [r.info["folder"] for r in refs] == sorted(r.info["folder"] for r in refs)   # failure/ then success/ by day
    assert {r.info["droid_id"] for r in refs} == {e["uuid"] for e in droid["episodes"].values()}
    back = pickle.loads(pickle.dumps((src, refs)))
    assert back[1][3].info == refs[3].info and "_refs" not in vars(back[0])   # jobs do not carry the episode list
    assert back[0].episodes()[3].info == refs[3].info
    ks = src.keys()
    assert ks["observation/robot_state/gripper_position"] == ((1,), "float64") and ks["wrist_image_left"] == ((48, 64, 3), "uint8")


def test_stereo_only_recordings_read_their_left_half(tmp_path):
    "With only `<serial>-stereo.mp4` (side by side), the *_left keys are the left halves and *_right keys exist."
    gt = write_droid_example(tmp_path/"raw", episodes=2, failed=0, steps=(30, 30), videos="stereo")
    src = DroidSource(gt["root"]); ref = src.episodes()[0]; e = gt["episodes"][ref.info["folder"]]
    assert "exterior_image_1_right" in src.keys()
    d = src.read(ref, ["exterior_image_1_left", "wrist_image_left", "wrist_image_right"])
    for k in ("exterior_image_1_left", "wrist_image_left"): assert psnr(e["frames"][k], d[k]) >= 40
    assert d["wrist_image_right"].shape == (30, 48, 64, 3)


def test_short_video_is_a_one_line_error(droid, tmp_path):
    "A camera MP4 with fewer frames than its episode's steps: one line naming the mp4, the episode and the key (API and CLI)."
    raw = copy_of(droid, tmp_path)
    src = DroidSource(raw); ref = src.episodes()[4]; e = droid["episodes"][ref.info["folder"]]
    mp4 = Path(episode_cameras(ref.info)["wrist_image_left"][0])
    write_mp4(mp4, e["frames"]["wrist_image_left"][:-3])
    T = e["length"]
    with pytest.raises(DatasetError) as x: convert(raw, tmp_path/"out", source="droid", progress=False)
    one_line_error(x, str(mp4), ref.name, "'wrist_image_left'", f"video has {T - 3} frames for the episode's {T} steps")
    p = cli(raw, tmp_path/"out2", "--from", "droid", "--workers", "1")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and f"has {T - 3} frames" in p.stderr, p.stderr
    assert not (tmp_path/"out").exists() and not (tmp_path/"out2").exists()


def test_missing_camera_lists_the_cameras_there(droid, tmp_path):
    "An episode without the wrist MP4: one line with the episode, the key and the cameras that exist."
    raw = copy_of(droid, tmp_path)
    ref = DroidSource(raw).episodes()[9]
    Path(episode_cameras(ref.info)["wrist_image_left"][0]).unlink()
    with pytest.raises(DatasetError) as x: convert(raw, tmp_path/"out", source="droid", progress=False)
    one_line_error(x, ref.name, "'wrist_image_left'", "the cameras here are: exterior_image_1_left, exterior_image_2_left")
    with pytest.raises(DatasetError) as x: DroidSource(raw).read(ref, ["observation/robot_state/joint_position"])
    one_line_error(x, "key 'observation/robot_state/joint_position' not found; this dataset has:", "joint_positions")


def test_task_from_rules(droid, tmp_path):
    "--task-from: annotation (the JSON, else current_task), folder, text:...; none found -> one line saying to pass --task-from."
    raw = copy_of(droid, tmp_path)
    (raw/"droid_language_annotations.json").unlink()
    ok = {rel: e for rel, e in droid["episodes"].items() if e["success"]}
    assert {r.info["folder"]: r.task for r in DroidSource(raw).episodes() if not r.skip} == {k: e["current_task"] for k, e in ok.items()}
    assert {r.task for r in DroidSource(raw, task_from="text:wipe the table").episodes()} == {"wipe the table"}
    with pytest.raises(DatasetError) as x: DroidSource(raw, task_from="parent").episodes()
    one_line_error(x, "--task-from parent", "annotation, folder or text:")
    meta = next(p for p in (raw/next(iter(ok))).glob("metadata_*.json"))
    m = json.loads(meta.read_text()); m["current_task"] = ""; meta.write_text(json.dumps(m))
    with pytest.raises(DatasetError) as x: convert(raw, tmp_path/"out", source="droid", progress=False)
    one_line_error(x, next(iter(ok)), "no task", "--task-from folder", "--task-from 'text:YOUR TASK'")
    s = convert(raw, tmp_path/"out", source="droid", task_from="text:wipe the table", progress=False)
    assert s["tasks"] == 1 and s["episodes_written"] == 12


def test_task_folders_and_metadata_free_episodes(tmp_path):
    "ICRT's TASK/TIME/ layout with --task-from folder; without metadata JSON the h5 attributes and camera_type decide."
    gt = write_droid_example(tmp_path/"raw", episodes=5, failed=1, layout="tasks", annotate=False)
    for p in gt["root"].rglob("metadata_*.json"): p.unlink()
    s = convert(gt["root"], tmp_path/"out", source="droid", task_from="folder", progress=False)
    assert s["skipped"] == {"failed (success=false)": 1} and s["episodes_written"] == 4
    want = {str(gt["root"]/rel): rel.split("/")[0] for rel, e in gt["episodes"].items() if e["success"]}
    assert {src: task for src, (_, task, _) in output_episodes(s["config"]).items()} == want


def test_training_starts_from_a_converted_dataset(assets, droid, tmp_path, one_thread):
    "The tiny guide recipe trains one epoch on the converted DROID episodes (CPU)."
    from icrt.train import train
    s = convert(droid["root"], tmp_path/"icrt", source="droid", progress=False)
    flags = scale_down(recipe_flags("train"), replace(assets, dataset_json=Path(s["config"])), tmp_path/"runs",
                       ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "16", "--dataset-cfg.non-overlapping", "48"])
    run = train(parse_args(flags))
    assert (run/"checkpoint-0.pth").is_file()
