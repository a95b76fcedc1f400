"Meta-World demonstrations -> ICRT dataset, replay, and the closed-loop evaluator (tiny sizes, CPU rendering)."
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "osmesa")  # CPU rendering; must precede the first `import mujoco`
pytest.importorskip("metaworld")

from PIL import Image

from icrt.data.format import check_dataset, load_dataset_config
import icrt.sim.metaworld as mw
from icrt.sim.core import ExpertPolicy, ReplayPolicy
from icrt.sim.metaworld import (DEFAULT_IMAGE_KEYS, EVAL_STREAM, GOAL_REGIONS, MetaWorldSim, evaluate_closed_loop,
                                generate_metaworld_dataset, load_raw_episode, mw_action_to_target, replay_dataset,
                                target_to_mw_action)

pytestmark = pytest.mark.filterwarnings("ignore:Constant")  # the experts' own "Constant(s) may be too high" notes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    "Two tasks (one per suite) x 2 episodes at 24x24, written by a 2-process spawn pool."
    out = tmp_path_factory.mktemp("mw")
    cfg = generate_metaworld_dataset(out, tasks=["reach-v3", "reach-goal-1"], episodes_per_task=2, image_size=24,
                                     seed=3, num_procs=2)
    return cfg


def test_dataset_passes_check(dataset):
    summary, problems = check_dataset(dataset)
    assert problems == []
    spec = load_dataset_config(dataset)
    assert sorted(spec.verb_to_episode) == ["reach-goal-1", "reach-v3"]
    assert all(len(v) == 2 for v in spec.verb_to_episode.values())
    assert all("episode" in e and n >= 30 for e, n in spec.epi_len.items())
    assert spec.image_keys == DEFAULT_IMAGE_KEYS


def test_episode_contents(dataset):
    spec = load_dataset_config(dataset)
    meta = json.loads((dataset.parent / "metaworld_meta.json").read_text())
    for name, T in spec.epi_len.items():
        ep = load_raw_episode(spec, name)
        for k in DEFAULT_IMAGE_KEYS:
            assert ep[k].shape == (T, 24, 24, 3) and ep[k].dtype == np.uint8
            assert ep[k].std() > 5  # a rendered scene, not a blank frame
        pose, act = ep["observation/cartesian_position"], ep["action/cartesian_position"]
        assert pose.shape == act.shape == (T, 6)
        assert np.all(pose[:, 3:] == 0) and np.all(act[:, 3:] == 0)  # fixed orientation stored as Euler zeros
        step = np.abs(act[:, :3] - pose[:, :3]).max()
        assert 0 < step <= 0.01 + 1e-6  # one Meta-World action reaches at most action_scale per axis
        for k in ["observation/gripper_position", "action/gripper_position"]:
            assert ep[k].shape == (T, 1) and ep[k].min() >= 0 and ep[k].max() <= 1
        m = meta["episodes"][name]
        assert m["success_step"] < T and m["length"] == T
        if m["task"] == "reach-goal-1":  # the hidden goal lies in the task's region
            assert np.abs(np.array(m["rand_vec"][3:6]) - GOAL_REGIONS["reach-v3"][1]).max() <= 0.02 + 1e-9


def test_generation_independent_of_num_procs(dataset, tmp_path):
    cfg = generate_metaworld_dataset(tmp_path, tasks=["reach-goal-1"], episodes_per_task=2, image_size=24, seed=3,
                                     num_procs=1)
    a, b = load_dataset_config(dataset), load_dataset_config(cfg)
    assert b.verb_to_episode["reach-goal-1"] == a.verb_to_episode["reach-goal-1"]
    for name in b.verb_to_episode["reach-goal-1"]:
        ea, eb = load_raw_episode(a, name), load_raw_episode(b, name)
        np.testing.assert_allclose(eb["action/cartesian_position"], ea["action/cartesian_position"], atol=1e-6)
        np.testing.assert_array_equal(eb[DEFAULT_IMAGE_KEYS[0]], ea[DEFAULT_IMAGE_KEYS[0]])


def test_expert_scores_through_absolute_targets(tmp_path):
    "The scripted expert, run via policy.act -> absolute target -> Meta-World action, keeps its ~100% rate."
    res = evaluate_closed_loop(ExpertPolicy, ["pick-place-v3", "reach-goal-0"], seeds=[0, 1], k_prompt=1,
                               image_size=24, expert=False, wrong_prompt=False, out_dir=tmp_path, num_gifs=1)
    for t in ["pick-place-v3", "reach-goal-0"]:
        r = res["tasks"][t]["policy"]
        assert (r["successes"], r["n"]) == (2, 2)
        assert r["ci95"][0] > 0.3 and r["ci95"][1] == 1.0
        assert max(r["length"]) < 200
    assert len(res["gifs"]) == 2
    im = Image.open(res["gifs"][0])
    assert im.size == (48, 24) and im.n_frames > 10  # exterior | wrist side by side
    assert "pick-place-v3" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["k_prompt"] == 1


class _FollowPrompt:
    "Replays its first prompt demo; remembers every prompt it got."
    def __init__(self, sim):
        self.prompts, self.first_obs, self.inner = [], [], None
    def reset(self): self.inner = None
    def prompt(self, episodes):
        self.prompts.append(episodes); self.inner = ReplayPolicy(episodes[0])
    def act(self, observation):
        if self.inner.t == 0: self.first_obs.append(observation)
        return self.inner.act(observation)


def test_wrong_prompt_control_and_fresh_prompts():
    made = []
    def factory(sim):
        made.append(_FollowPrompt(sim)); return made[-1]
    res = evaluate_closed_loop(factory, ["reach-goal-0", "reach-goal-3"], seeds=[0], k_prompt=2, image_size=24,
                               max_steps=40, expert=False)
    for t in ["reach-goal-0", "reach-goal-3"]:
        assert res["tasks"][t]["wrong_prompt"]["rate"] == 0.0
        assert res["tasks"][t]["wrong_prompt"]["length"] == [40]
    p = made[0]
    assert len(p.prompts) == 2 and all(len(ps) == 2 for ps in p.prompts)  # own prompt, then the other task's
    own, eval_first = p.prompts[0], p.first_obs[0]
    key = DEFAULT_IMAGE_KEYS[0]
    assert not np.array_equal(own[0][key][0], own[1][key][0])  # two different demos
    assert all(not np.array_equal(d[key][0], eval_first[key]) for d in own)  # neither is the evaluation scene


def test_closing_one_sim_leaves_others_intact():
    "Each sim frees its GL objects in its own OSMesa context (mujoco's Renderer.close would free another's)."
    import gc
    k = DEFAULT_IMAGE_KEYS[0]
    b = MetaWorldSim("drawer-open-v3", 32)
    b.reset(b.sample_initial_state((EVAL_STREAM, 0)))
    ref = b.observe()[k]
    for how in ["close", "gc"]:
        a = MetaWorldSim("pick-place-v3", 32)
        a.reset(a.sample_initial_state((EVAL_STREAM, 0))); a.observe()
        b.observe()  # b's context is the current one
        if how == "close": a.close()
        else: del a; gc.collect()
        np.testing.assert_array_equal(b.observe()[k], ref)
    b.close()


def test_action_conversion_roundtrip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, hand = rng.uniform(-1, 1, 4), rng.uniform(-0.3, 0.8, 3)
        tgt = mw_action_to_target(a, hand, 0.01)
        assert tgt.shape == (7,) and 0 <= tgt[6] <= 1
        np.testing.assert_allclose(target_to_mw_action(tgt, hand, 0.01), a, atol=1e-6)
    np.testing.assert_allclose(target_to_mw_action([5, -5, 0.2, 1, 2, 3, 2.0], [0, 0, 0.2], 0.01), [1, -1, 0, 1])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'fly-v3'"):
        generate_metaworld_dataset(tmp_path, tasks=["fly-v3"])
    with pytest.raises(ValueError, match="suite='nope'"):
        generate_metaworld_dataset(tmp_path, suite="nope")
    with pytest.raises(ValueError, match="episodes_per_task=0"):
        generate_metaworld_dataset(tmp_path, tasks=["reach-v3"], episodes_per_task=0)
    with pytest.raises(ValueError, match="image_size=4"):
        MetaWorldSim("reach-v3", image_size=4)
    with pytest.raises(ValueError, match="camera 'nocam'"):
        MetaWorldSim("reach-v3", cameras={"observation/exterior_image_1_left": "nocam"})
    with pytest.raises(ValueError, match=r"expected \(7,\)"):
        target_to_mw_action(np.zeros(3), np.zeros(3), 0.01)
    with pytest.raises(ValueError, match="at least one task"):
        evaluate_closed_loop(ExpertPolicy, [], seeds=[0])
    (tmp_path / "cfg").mkdir()
    cfg = generate_metaworld_dataset(tmp_path / "cfg", tasks=["reach-v3"], episodes_per_task=1, image_size=16,
                                     num_procs=1)
    (tmp_path / "cfg/metaworld_meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="metaworld_meta.json"):
        replay_dataset(cfg)


def test_missing_metaworld_message(monkeypatch):
    monkeypatch.setattr(mw, "_IMPORT_ERROR", ImportError("No module named 'metaworld'"))
    with pytest.raises(ImportError, match="pip install metaworld"):
        mw.generate_metaworld_dataset("/nonexistent", tasks=["reach-v3"])


def test_cli(tmp_path):
    cmd = [sys.executable, "-c", "from icrt.sim.metaworld import gen_cli; gen_cli()"]
    res = subprocess.run(cmd + [str(tmp_path / "d"), "--tasks", "reach-goal-2", "--episodes-per-task", "1",
                                "--image-size", "16", "--num-procs", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "frames/s" in res.stdout and "dataset config:" in res.stdout
    assert check_dataset(tmp_path / "d/dataset_config.json")[1] == []
    bad = subprocess.run(cmd + [str(tmp_path / "e"), "--tasks", "fly-v3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task 'fly-v3'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr, bad.stderr


def test_state_keys_give_the_policy_the_puck_and_the_goal(tmp_path):
    "--state-keys (issue #24 item 4): the puck's and the (hidden) goal's positions recorded and named in the robot space."
    task = mw.icl_task_name("push", [0.05, 0.85, 0.2])
    cfg = generate_metaworld_dataset(tmp_path, tasks=[task], episodes_per_task=1, image_size=16, num_procs=1,
                                     state_keys=("object_position", "goal_position"))
    spec = load_dataset_config(cfg)
    assert spec.space.state_dim == 16 and spec.space.state_keys[2:] == ["observation/object_position", "observation/goal_position"]
    assert check_dataset(cfg)[1] == []
    ep = load_raw_episode(spec, sorted(spec.epi_len)[0])
    goal = ep["observation/goal_position"]
    np.testing.assert_allclose(goal, np.broadcast_to(goal[0], goal.shape))                 # the goal stays put
    np.testing.assert_allclose(goal[0, :2], mw.parse_icl_task(task)[1][:2], atol=1e-6)      # the task's goal ...
    assert goal[0, 2] < 0.05                                                                 # ... dropped to the table (push)
    puck = ep["observation/object_position"]
    assert np.linalg.norm(puck[-1, :2] - goal[0, :2]) < 0.07                                 # the expert pushed it there
    with pytest.raises(ValueError, match=r"state key\(s\) \['puck'\]: use object_position, goal_position"):
        generate_metaworld_dataset(tmp_path / "bad", tasks=[task], state_keys=("puck",))
    assert not (tmp_path / "bad").exists()
