"""Joint-space LeRobot datasets end to end (issue #24, data in): an SO-100-like set (5 joints + gripper, 2 cameras) and an
ALOHA-like set (two arms of 6 joints + gripper, 14 columns, 4 cameras), converted by `icrt_convert` with no flags,
checked by `icrt_check`, trained a few steps, served by `icrt_serve`; robomimic's joint positions added beside its pose
with --map; and the bad inputs of joint conversion, each refused in one line.

The fixtures are written by `icrt.data.lerobot.write_lerobot_example(robot=...)` from the LeRobot v3.0 format
specification: LeRobot itself pins torch<2.11 and cannot be installed beside this project (see test_convert_lerobot.py).
"""
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import FAST, one_line_error, serve_process
from icrt.config import parse_args
from icrt.data.convert import convert, write_robomimic_example
from icrt.data.format import DatasetError, check_dataset, load_dataset_config, read_lowdim
from icrt.data.lerobot import ROBOTS, write_lerobot_example
from icrt.spaces import preset
from icrt.tiny import recipe_flags, scale_down
from test_convert_lerobot import run_cli
from test_inference import _observation, raw_episode

WIDTH = {"so100": 6, "aloha": 14}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


@pytest.fixture(scope="module", params=["so100", "aloha"])
def joint_run(request, assets, tmp_path_factory):
    "A LeRobot v3.0 joint-space set (10 episodes of 30-34 steps, 2 tasks, 24x32 frames) converted with no flags, checked, trained."
    robot, d = request.param, tmp_path_factory.mktemp(request.param)
    ex = write_lerobot_example(d / "le", "v3.0", episodes=10, steps=(30, 34), height=24, width=32, robot=robot, seed=11)
    r = run_cli("icrt.data.convert", "convert_cli", ex["path"], d / "icrt", "--workers", "1", "--train-split", "0.9")
    assert r.returncode == 0, r.stderr
    assert f"joint space ({robot})" in r.stdout and f"robot space: '{robot}'" in r.stdout, r.stdout
    cfg = d / "icrt" / "dataset_config.json"
    c = run_cli("icrt.data.format", "check_cli", cfg)
    assert c.returncode == 0, c.stdout + c.stderr
    from icrt.train import train
    n_cams = len(ROBOTS[robot]["cameras"])
    run = train(parse_args(scale_down(recipe_flags("train"), replace(assets, dataset_json=cfg), d / "runs",
                                      FAST + ["--shared-cfg.num-cameras", str(n_cams)])))
    return robot, ex, load_dataset_config(cfg), run


def test_converted_with_no_flags_in_the_robots_own_space(joint_run):
    "The dataset's robot space is the preset's layout (keys, widths) with LeRobot's units and column names; values as recorded."
    robot, ex, spec, _ = joint_run
    sp = spec.space
    assert (sp.name, sp.state_keys, sp.action_keys) == (robot, preset(robot).state_keys, preset(robot).action_keys)
    assert sp.robot_columns() == ROBOTS[robot]["names"] and sp.action_dim == sp.state_dim == WIDTH[robot]
    assert {p.unit for p in sp.state} == ({"deg", "range_0_100"} if robot == "so100" else {"rad", "act_normalized"})
    assert spec.image_keys == [f"observation/{k.split('.')[-1]}" for k in ROBOTS[robot]["cameras"]]
    e = ex["episodes"][3]; name = f"episode_{e['episode_index']:06d}"
    got = raw_episode(spec, name)
    state = np.concatenate([got[k] for k in spec.proprio_keys], 1)
    action = np.concatenate([got[k] for k in spec.action_keys], 1)
    np.testing.assert_allclose(state, e["observation.state"], atol=1e-5)     # columns in the source's order
    np.testing.assert_allclose(action, e["action"], atol=1e-5)


def test_served_actions_have_the_runs_own_shape(joint_run, tmp_path):
    "`icrt_serve RUN`: a client session prompted with one converted episode receives actions of 6 (SO-100) or 14 (ALOHA) numbers."
    from icrt.client import PolicyClient
    robot, _, spec, run = joint_run
    eps = sorted(spec.epi_len); demo, ep = raw_episode(spec, eps[0]), raw_episode(spec, eps[1])
    with serve_process(run, tmp_path, "--max-sessions", "1") as (port, _):
        with PolicyClient(f"ws://127.0.0.1:{port}") as c:
            assert c.metadata["action_layout"] == ROBOTS[robot]["names"] and c.metadata["robot_space"]["name"] == robot
            c.prompt([demo])
            a = np.stack([c.act(_observation(spec, ep, t)) for t in range(3)])
    assert a.shape == (3, WIDTH[robot]) and np.isfinite(a).all()


def test_icrt_eval_measures_a_converted_joint_run(joint_run, tmp_path):
    "icrt_eval on the converted run: per-part errors in the joints' own units."
    from icrt.eval import evaluate_run
    robot, _, _, run = joint_run
    res = evaluate_run(run, out=tmp_path / "eval")
    text = json.dumps(res, default=str)
    assert ("deg" if robot == "so100" else "rad") in text and ROBOTS[robot]["names"][0] in text, text[-500:]


def test_robomimic_adds_its_joint_positions_beside_the_pose(tmp_path):
    "--map joints=obs/robot0_joint_pos: the pose default stays (same pose, gripper and actions), 7 joints join the state."
    src = tmp_path / "lift.hdf5"; demos = write_robomimic_example(src, demos=3, steps=30)
    plain = convert(src, tmp_path / "plain", progress=False)
    s = convert(src, tmp_path / "joints", mapping={"joints": "obs/robot0_joint_pos"}, progress=False)
    assert check_dataset(s["config"])[1] == []
    sp, base = load_dataset_config(s["config"]).space, load_dataset_config(plain["config"])
    assert "robot_space" not in json.loads(Path(plain["config"]).read_text())          # the published layout, as before
    assert sp.state_keys == base.space.state_keys + ["observation/joint_position"] and sp.action == base.space.action
    assert [(p.kind, p.dim, p.unit) for p in sp.state[2:]] == [("joints", 7, "rad")]
    a, b = raw_episode(load_dataset_config(s["config"]), "demo_2_episode"), raw_episode(base, "demo_2_episode")
    for k in base.proprio_keys + base.action_keys: np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(a["observation/joint_position"], demos["demo_2"]["obs/robot0_joint_pos"], atol=1e-6)


def test_extra_state_keys_join_a_joint_space(tmp_path):
    "--map extra=NAME=KEY adds an `other` part after the arm's parts; the action is untouched."
    ex = write_lerobot_example(tmp_path / "le", "v3.0", episodes=2, steps=30, height=16, width=16, robot="so100", keep_frames=False)
    s = convert(ex["path"], tmp_path / "out", mapping={"extra": "wrist_angles=observation.state[3:5]"}, progress=False)
    sp = load_dataset_config(s["config"]).space
    assert sp.state_keys[-1] == "observation/wrist_angles" and sp.state[-1].kind == "other" and sp.state_dim == 8 and sp.action_dim == 6
    with h5py.File(load_dataset_config(s["config"]).dataset_path[0]) as f:
        np.testing.assert_allclose(read_lowdim(f["episode_000001"], "observation/wrist_angles", 0, 30),
                                   ex["episodes"][1]["observation.state"][:, 3:5], atol=1e-6)


# --- bad input: one line each, before anything is written ------------------------------------------------------------
@pytest.fixture(scope="module")
def so100(tmp_path_factory):
    return write_lerobot_example(tmp_path_factory.mktemp("bad") / "so", "v3.0", episodes=2, steps=30, height=16, width=16,
                                 robot="so100", keep_frames=False)


def _edited(so100, tmp_path, edit):
    "A copy of the SO-100 set with its info.json features edited by `edit(features)`."
    import shutil
    p = tmp_path / "so"; shutil.copytree(so100["path"], p)
    info = json.loads((p / "meta/info.json").read_text()); edit(info["features"])
    (p / "meta/info.json").write_text(json.dumps(info)); return p


def test_a_mapped_state_or_action_key_the_dataset_lacks(so100, tmp_path):
    for role, key in (("joints", "observation.joint_pos[0:5]"), ("action_joints", "action.joints[0:5]")):
        with pytest.raises(DatasetError) as e: convert(so100["path"], tmp_path / "out", mapping={role: key}, progress=False)
        one_line_error(e, f"key '{key.split('[')[0]}' not found; low-dim keys: observation.state, action")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_joint_names_that_do_not_match_the_width(so100, tmp_path):
    src = _edited(so100, tmp_path, lambda f: f["observation.state"].update(names=ROBOTS["so100"]["names"][:5]))
    with pytest.raises(DatasetError) as e: convert(src, tmp_path / "out", progress=False)
    one_line_error(e, "meta/info.json: features['observation.state'] has 5 names for its 6 columns",
                   "--map joints=observation.state[0:5] --map gripper=observation.state[5] --map action_joints=action[0:5] --map action_gripper=action[5]")
    assert not (tmp_path / "out").exists()


def test_an_unrecognised_naming_says_which_map_to_pass(so100, tmp_path):
    src = _edited(so100, tmp_path, lambda f: [f[k].update(names=[f"motor_{i}" for i in range(6)]) for k in ("observation.state", "action")])
    r = run_cli("icrt.data.convert", "convert_cli", src, tmp_path / "out")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "are neither a hand pose (x, y, z + rotation) nor a known arm's joints (SO-100/101, Koch, ALOHA)" in r.stderr, r.stderr
    hint = r.stderr.split("e.g. ")[1].split(" (the last")[0].replace("UNIT", "deg", 1).replace("UNIT", "range_0_100")
    r = run_cli("icrt.data.convert", "convert_cli", src, tmp_path / "out", *hint.split())   # the advice works as given
    assert r.returncode == 0, r.stderr
    sp = load_dataset_config(tmp_path / "out" / "dataset_config.json").space
    assert (sp.state_dim, sp.action_dim, sp.state[0].unit, sp.state[1].unit) == (6, 6, "deg", "range_0_100")


def test_nan_in_a_joint_entry_skips_the_episode_or_strict_refuses(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    ex = write_lerobot_example(tmp_path / "le", "v3.0", episodes=3, steps=30, height=16, width=16, robot="so100",
                               episodes_per_file=3, keep_frames=False)
    f = Path(ex["path"]) / "data/chunk-000/file-000.parquet"
    t = pq.read_table(f); st = np.stack(t.column("observation.state").to_pylist()).astype(np.float32)
    st[40, 2] = np.nan                                                    # episode 1, step 10, elbow_flex
    t = t.set_column(t.column_names.index("observation.state"), "observation.state",
                     pa.FixedSizeListArray.from_arrays(pa.array(st.reshape(-1)), 6))
    pq.write_table(t, f, row_group_size=30)
    s = convert(ex["path"], tmp_path / "out", progress=False)
    assert s["episodes_written"] == 2 and s["skipped"] == {"NaN/inf in 'observation.state'": 1}
    with pytest.raises(DatasetError) as e: convert(ex["path"], tmp_path / "strict", strict=True, progress=False)
    one_line_error(e, "episode 1: NaN/inf in 'observation.state' (first at step 10)")
