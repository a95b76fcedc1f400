"""A joint-space robot end to end (issue #24): the synthetic world recorded with a 5-joint arm, trained, deployed and run
in closed loop in joint positions; a run carries its robot space, and its actions are the robot's own (joints + gripper)."""
import numpy as np
import pytest

from conftest import FAST
from icrt.config import parse_args
from icrt.data.arm import ARM_SPACE, JOINT_KEYS, Arm
from icrt.data.format import load_dataset_config
from icrt.data.synthetic import episode_world, load_world, make_synthetic_dataset
from icrt.inference import ICRTPolicy, InferenceError
from icrt.sim.core import rollout
from icrt.sim.synthetic import SyntheticSim
from icrt.spaces import load_space
from icrt.tiny import recipe_flags, scale_down
from icrt.train import RUN_SPACE, train
from test_inference import _observation, raw_episode


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


@pytest.fixture(scope="module")
def joint_run(assets, tmp_path_factory):
    "A tiny run trained on the synthetic world recorded in joint space (3 tasks x 5 episodes)."
    d = tmp_path_factory.mktemp("joints")
    cfg = make_synthetic_dataset(d / "data", num_tasks=3, episodes_per_task=5, height=48, width=64, max_len=80,
                                 train_split=0.8, progress=False, arm=Arm())
    flags = scale_down(recipe_flags("train"), assets, d / "runs", FAST)
    flags[flags.index("--dataset-cfg.dataset-json") + 1] = str(cfg)
    return train(parse_args(flags)), load_dataset_config(cfg)


def test_the_run_carries_its_robot_space_and_acts_in_joints(joint_run):
    run, spec = joint_run
    assert load_space(run / RUN_SPACE) == ARM_SPACE
    p = ICRTPolicy.from_run(run)
    assert p.space == ARM_SPACE and p.model.state_dim == p.model.action_dim == 6 and p.model.action_mean.shape == (6,)
    eps = sorted(spec.epi_len)
    demo, ep = raw_episode(spec, eps[0]), raw_episode(spec, eps[1])
    p.prompt([demo])
    a = np.stack([p.act(_observation(spec, ep, t), None if t == 0 else
                        np.r_[ep[JOINT_KEYS[1]][t - 1], ep["action/gripper_position"][t - 1]]) for t in range(5)])
    assert a.shape == (5, 6) and np.isfinite(a).all() and p.last_chunk.shape == (p.num_pred_steps, 6)
    bad = {**_observation(spec, ep, 0), JOINT_KEYS[0]: np.zeros(6)}
    with pytest.raises(InferenceError, match=r"'observation/joint_position': a joints part must be 5 numbers, got 6"): p.act(bad)
    with pytest.raises(InferenceError, match=r"'executed_action': must be the action keys .* end to end, got 7"):
        p.act(_observation(spec, ep, 5), np.zeros(7))


def test_a_joint_space_policy_runs_the_arm_in_closed_loop(joint_run):
    run, spec = joint_run
    world = load_world(spec.config_path)
    name = sorted(spec.epi_len)[2]
    task, scene, expert = episode_world(world, name)
    p = ICRTPolicy.from_run(run)
    p.prompt([raw_episode(spec, sorted(spec.epi_len)[0])])
    r = rollout(SyntheticSim(scene, task, arm=Arm()), p, max_steps=12, record=True, space=ARM_SPACE)
    assert r["actions"].shape == (12, 6) and np.isfinite(r["actions"]).all()
    assert r["episode"][JOINT_KEYS[1]].shape == (12, 5) and r["episode"][JOINT_KEYS[0]].shape == (12, 5)


def test_the_server_answers_a_joint_space_run_in_joints(joint_run):
    from icrt.client import PolicyClient
    from icrt.serve import start_server, stop_server
    run, spec = joint_run
    p = ICRTPolicy.from_run(run)
    eps = sorted(spec.epi_len); demo, ep = raw_episode(spec, eps[0]), raw_episode(spec, eps[1])
    local = ICRTPolicy.from_run(run); local.reset(max_len=512); local.prompt([demo])
    want = np.stack([local.act(_observation(spec, ep, t)) for t in range(4)])
    srv = start_server(p, max_sessions=2, max_len=512)
    try:
        with PolicyClient(f"ws://127.0.0.1:{srv.port}") as c:
            assert c.metadata["action_layout"] == [f"joint_position[{i}]" for i in range(5)] + ["gripper"]
            assert c.metadata["robot_space"]["name"] == "synthetic_arm" and "joints in rad" in c.metadata["action_frame"]
            c.prompt([demo])
            got = np.stack([c.act(_observation(spec, ep, t)) for t in range(4)])
    finally: stop_server(srv)
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_run_of_another_space_is_refused_as_pretrained_path_or_resume(joint_run, assets, tmp_path, capsys):
    from test_train import _main_error
    run, _ = joint_run
    ck = str(run / "checkpoint-0.pth")
    base = scale_down(recipe_flags("train"), assets, tmp_path, FAST + ["--trainer-cfg.epochs", "2"])
    line = _main_error(base + ["--model-cfg.policy-cfg.pretrained-path", ck], capsys)
    assert "--model-cfg.policy-cfg.pretrained-path" in line and "was trained in robot space 'synthetic_arm'" in line, line
    line = _main_error(base + ["--shared-cfg.resume", ck], capsys)
    assert "--shared-cfg.resume" in line and "robot space 'synthetic_arm'" in line and "'published'" in line, line
    assert not (tmp_path / "log_name").exists()   # refused before anything was written


def test_icrt_eval_scores_a_joint_space_run_in_the_joints_unit(joint_run, tmp_path):
    """icrt_eval on a joint-space run: errors in radians per joint and on average, equal to a hand computation on the raw
    recorded joints (teacher-forced and closed loop), so an error computed on normalised values would fail."""
    from icrt.eval import closed_loop, evaluate_run, teacher_forced
    run, spec = joint_run
    rep = evaluate_run(run, out=tmp_path / "eval", episodes=2, seed=1)
    assert rep["num_episodes"] == 2 and "trans_mm" not in rep["teacher_forced"] and rep["robot_space"]["name"] == "synthetic_arm"
    assert rep["joint_columns"] == {"joint_rad_each": [f"joint_position[{i}]" for i in range(5)]}
    e = rep["episodes"][0]
    p = ICRTPolicy.from_run(run)
    ep, prompts = raw_episode(spec, e["episode"]), [raw_episode(spec, n) for n in e["prompts"]]
    first, _ = teacher_forced(p, p.inputs(ep), [p.inputs(d) for d in prompts])     # (T, 6): 5 joints (rad) + gripper
    err = np.abs(first[:, :5] - ep[JOINT_KEYS[1]])                                  # (T, 5) against the recorded joints
    tf = e["teacher_forced"]
    assert tf["steps"] == len(err) and tf["joint_rad"] == pytest.approx(err.mean(), rel=1e-4)
    assert tf["joint_rad_median"] == pytest.approx(np.median(err.mean(1)), rel=1e-4)
    np.testing.assert_allclose(tf["joint_rad_each"], err.mean(0), rtol=1e-4)
    assert tf["gripper_acc"] == pytest.approx(np.mean((first[:, 5] > 0.5) == (ep["action/gripper_position"][:, 0] > 0.5)))
    task, scene, expert = episode_world(load_world(spec.config_path), e["episode"])   # closed loop in the arm's world
    acts, ok = closed_loop(p, SyntheticSim(scene, task, arm=Arm()), [p.inputs(d) for d in prompts], len(err))
    cl = e["closed_loop"]
    assert cl["joint_rad"] == pytest.approx(np.abs(acts[:, :5] - expert[JOINT_KEYS[1]]).mean(), rel=1e-4) and cl["success"] == ok
    g = rep["in_context_gap"]
    assert g["ratio"]["joint_rad"] == pytest.approx(g["wrong"]["joint_rad"] / g["same"]["joint_rad"], rel=1e-6)
    assert g["closed_loop"]["episodes"] == 2 and set(g["closed_loop"]["success"]) == {"same", "wrong"}
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| mode | steps | joint mean (rad) | joint median (rad) | gripper acc. |" in md and "Mean absolute error per joint (rad)" in md
    assert (tmp_path / "eval" / "figures" / f"{e['episode']}.png").is_file()


def test_icrt_eval_refuses_data_of_another_robot_space_in_one_line(joint_run, tmp_path):
    "A dataset config whose robot_space has the run's keys but other units is refused before anything is written."
    import json
    from icrt.eval import EvalError, evaluate_run
    run, spec = joint_run
    cfg = json.loads(spec.config_path.read_text())
    for part in cfg["robot_space"]["state"] + cfg["robot_space"]["action"]:
        if part["kind"] == "joints": part["unit"] = "deg"
    bad = spec.config_path.parent / "degrees.json"; bad.write_text(json.dumps(cfg))
    with pytest.raises(EvalError) as e: evaluate_run(run, bad, out=tmp_path / "eval")
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "key 'robot_space'" in msg and "has unit 'deg', the run 'rad'" in msg, msg
    assert not (tmp_path / "eval").exists()


def test_normalize_proprio_scales_the_joints_by_the_training_split(joint_run, assets, tmp_path):
    """--model-cfg.policy-cfg.normalize-proprio: the checkpoint carries the training split's state mean/std; the deployed policy
    reads raw joints through them; a run without the flag keeps the published checkpoint keys."""
    from icrt.data.dataset import SequenceDataset
    _, spec = joint_run
    flags = scale_down(recipe_flags("train"), assets, tmp_path / "runs", FAST + ["--model-cfg.policy-cfg.normalize-proprio"])
    flags[flags.index("--dataset-cfg.dataset-json") + 1] = str(spec.config_path)
    run = train(parse_args(flags))
    p = ICRTPolicy.from_run(run)
    cfg = parse_args(flags)
    ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg, split="train")                 # the split the trainer used
    st = ds.lowdim_statistics()["proprio"]
    np.testing.assert_allclose(p.model.proprio_mean.numpy(), st["mean"], rtol=1e-5)
    np.testing.assert_allclose(p.model.proprio_std.numpy(), st["std"], rtol=1e-5)
    assert not np.allclose(st["std"], 1)                                   # joints really were scaled
    assert "proprio_mean" not in ICRTPolicy.from_run(joint_run[0]).model.state_dict()   # without the flag: the published keys
    eps = sorted(spec.epi_len)
    p.prompt([raw_episode(spec, eps[0])]); ep = raw_episode(spec, eps[1])
    a = np.stack([p.act(_observation(spec, ep, t)) for t in range(3)])
    assert a.shape == (3, 6) and np.isfinite(a).all()
