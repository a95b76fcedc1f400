"The Meta-World `icl` suite: verbs x hidden goals, unseen evaluation goals, the icl evaluator and its benchmark."
import json
import os
import subprocess

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "osmesa")  # CPU rendering; must precede the first `import mujoco`
pytest.importorskip("metaworld")

from icrt.sim.core import ReplayPolicy, SimError
from icrt.sim.metaworld import (EVAL_STREAM, ICL_FAR_GOAL_DISTANCE, ICL_MIN_GOAL_DISTANCE, ICL_VERBS, MetaWorldSim,
                                evaluate_icl, get_task, icl_distance, icl_env_goal, icl_scenes, icl_task_name, icl_tasks,
                                icl_train_goals, parse_icl_task, train_key)
from test_bench_metaworld import _run as _bench  # icrt_bench_metaworld in a subprocess, one torch thread
from icrt.bench.metaworld import goal_following, window_length
from icrt.config import DatasetConfig, SharedConfig
from icrt.data.dataset import SequenceDataset
from icrt.sim.metaworld import generate_metaworld_dataset

pytestmark = pytest.mark.filterwarnings("ignore:Constant")


def test_task_names_round_trip_and_goals_stay_in_the_box():
    tasks = icl_tasks(16)
    assert len(tasks) == 3 * 16 and len(set(tasks)) == len(tasks)
    for name in tasks:
        verb, g = parse_icl_task(name)
        assert icl_task_name(verb, g) == name
        t = get_task(name)
        assert t.env_name == ICL_VERBS[verb] and t.hide_goal and t.goal_halfwidth == 0
        np.testing.assert_allclose(t.goal_center, icl_env_goal(verb, g))
    assert all(get_task(n).goal_center[2] == 0.02 for n in tasks if n.startswith("push@"))  # push goals lie on the table


def test_unseen_goals_are_far_from_every_training_goal():
    for G in (4, 16, 32):
        sc = icl_scenes(24, train_goals=G)
        tg = icl_train_goals(G)
        for v in ICL_VERBS:  # recomputed here, not read from the scenes
            d = np.array([[icl_distance(v, u, t) for t in tg[v]] for u in sc.unseen])
            assert d.min() >= ICL_MIN_GOAL_DISTANCE
            assert (icl_distance(v, sc.far[v], sc.unseen) >= ICL_FAR_GOAL_DISTANCE).all()
            assert {tuple(g) for g in sc.seen[v]} <= {tuple(g) for g in tg[v]}
        assert min(sc.min_goal_distance().values()) >= ICL_MIN_GOAL_DISTANCE
    assert not np.allclose(icl_scenes(4, seed=1).unseen, icl_scenes(4, seed=0).unseen)


def test_one_scene_for_every_verb_and_the_goal_is_invisible():
    "The same key gives every verb the same puck and the same first frames; moving the goal changes no pixel."
    g = icl_scenes(1).unseen[0]
    frames, pucks = {}, {}
    for v in ICL_VERBS:
        sim = MetaWorldSim(icl_task_name(v, g), image_size=32)
        rv = sim.sample_initial_state((EVAL_STREAM, 0, 0))
        obs = sim.reset(rv)
        frames[v], pucks[v] = obs["observation/exterior_image_1_left"], rv[:3]
        if v == "reach":  # another goal, same key: identical images (the goal site is hidden)
            other = sim.set_task(icl_task_name(v, [0.09, 0.89, 0.29])).sample_initial_state((EVAL_STREAM, 0, 0))
            np.testing.assert_allclose(other[:3], rv[:3])
            np.testing.assert_array_equal(sim.reset(other)["observation/exterior_image_1_left"], frames[v])
        sim.close()
    for v in ICL_VERBS:
        np.testing.assert_allclose(pucks[v], pucks["reach"])
        assert np.abs(frames[v].astype(int) - frames["reach"]).mean() < 0.5


def test_training_tasks_do_not_share_puck_positions():
    a, b = icl_tasks(2)[:2]
    assert train_key(a, 0, 0) != train_key(b, 0, 0)
    assert train_key("reach-goal-1", 0, 3) == [0, 0, 3]  # the older suites keep their keys (and their data)


def test_evaluator_tells_a_prompt_follower_from_the_goal():
    "Replaying the prompt's targets reaches the prompted goal: success on unseen goals, failure on the far-goal control."
    class FollowPrompt:
        def __init__(self, sim): self.inner = None
        def reset(self): pass
        def prompt(self, episodes): self.inner = ReplayPolicy(episodes[0]) if episodes else None
        def act(self, observation):  # no prompt: hold the hand where it is
            if self.inner is None:
                return np.r_[observation["observation/cartesian_position"], observation["observation/gripper_position"]]
            return self.inner.act(observation)
    res = evaluate_icl(FollowPrompt, scenes=3, train_goals=4, ks=(1, 2), verbs=["reach"], image_size=24, max_steps=90,
                       expert=True)
    r = res["verbs"]["reach"]
    assert r["unseen_k1"]["rate"] == 1.0 and r["unseen_k2"]["rate"] == 1.0 and r["expert"]["rate"] == 1.0
    assert r["far_goal"]["rate"] == 0.0 and r["other_verb"]["rate"] == 0.0  # a push demo does not lift the hand to the goal
    assert r["no_prompt"]["rate"] == 0.0 and r["no_prompt"]["n"] == 3  # nothing to follow: the hand stays at its start
    assert r["no_prompt"]["mean_error"] > 2 * r["unseen_k1"]["mean_error"]
    assert "| reach | no prompt (the scene alone) | 0/3 | 0% [0, " in res["table"]
    for c in ("unseen_k1", "far_goal"):  # it goes where the prompt says, right or wrong (stopping 10 steps after success)
        assert goal_following(r[c]["runs"])["slope"] > 0.5, (c, goal_following(r[c]["runs"]))
    assert r["far_goal"]["mean_prompt_error"] < 0.05 < ICL_FAR_GOAL_DISTANCE - 0.02 < r["far_goal"]["mean_error"]
    assert r["unseen_k1"]["mean_error"] < 0.5 * res["baselines"]["reach"]["mean_training_goal"]
    for run in r["unseen_k1"]["runs"]:  # the error is the distance from where the hand ended to the goal
        assert abs(np.linalg.norm(np.subtract(run["end"], run["goal"])) - run["error"]) < 1e-9
    assert "| reach | unseen goal, k=2 |" in res["table"] and res["min_goal_distance_m"] >= ICL_MIN_GOAL_DISTANCE


def test_bad_inputs():
    with pytest.raises(SimError, match="the verb must be one of"): get_task("fly@0.000,0.850,0.100")
    with pytest.raises(SimError, match="outside the suite's box"): get_task("reach@0.000,0.850,0.900")
    with pytest.raises(SimError, match="VERB@X,Y,Z"): get_task("reach@nan,0.85,0.1")
    with pytest.raises(SimError, match="verbs="): evaluate_icl(None, scenes=1, verbs=["fly"])
    with pytest.raises(SimError, match="prompt sizes"): evaluate_icl(None, scenes=1, ks=(0,))
    with pytest.raises(SimError, match="scenes=0"): icl_scenes(0)
    sim = MetaWorldSim("reach@0.000,0.850,0.100", image_size=16)
    with pytest.raises(SimError, match="make a MetaWorldSim"): sim.set_task("push@0.000,0.850,0.100")
    sim.close()


def test_bench_icl_smoke_end_to_end(tmp_path):
    out = tmp_path / "icl"
    r = _bench("--suite", "icl", "--preset", "smoke", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    rep, md = json.loads((out / "report.json").read_text()), (out / "report.md").read_text()
    ev = rep["evaluation"]
    assert set(ev["verbs"]) == set(ICL_VERBS) and ev["min_goal_distance_m"] >= ICL_MIN_GOAL_DISTANCE
    conds = {"unseen_k1", "unseen_k2", "seen", "other_verb", "far_goal", "no_prompt", "expert"}
    for v in ICL_VERBS:
        assert set(ev["verbs"][v]) == conds
        for c in conds: assert ev["verbs"][v][c]["n"] == rep["preset"]["seeds"]
    assert rep["dataset"]["episodes"] == 3 * rep["preset"]["train_goals"] * rep["preset"]["episodes_per_task"]
    for f in ("kshot.png", "goal_scatter.png", "loss_curve.png"): assert (out / f).stat().st_size > 1000 and f in md
    assert ev["gifs"] and all((out / g).is_file() for g in ev["gifs"])
    assert "## Targets" in md and "min_goal_distance_m" in md and len(rep["checks"]) >= 3
    assert "## Goal following" in md and set(ev["following"]["push"]) == {"unseen_k1", "unseen_k2", "far_goal"}
    assert "| all | unseen goal, k=1 |" in r.stdout
    assert "| all | no prompt (the scene alone) |" in r.stdout and "With no prompt at all it succeeded in" in md
    pr = ev["probe"]["reach"]["last"]  # the goal probe: 4 training prompts of one goal, so it can only be the baseline
    assert "## Goal probe" in md and (pr["n_fit"], pr["n_test"]) == (4, 1) and abs(pr["error"] - pr["baseline"]) < 1e-9


@pytest.mark.parametrize("args,needle", [
    (["--suite", "icl", "--tasks", "reach-v3"], "--tasks"),
    (["--suite", "icl", "--train-goals", "0"], "--train-goals 0"),
    (["--train-goals", "3"], "--suite icl"),
    (["--set", "foo=1"], "--set foo: not a preset entry"),
    (["--set", "step_weight"], "write KEY=VALUE"),
])
def test_bench_icl_bad_inputs(tmp_path, args, needle):
    r = _bench("--preset", "smoke", "--out", str(tmp_path / "o"), *args)
    lines = [l for l in r.stderr.splitlines() if l.startswith("icrt_bench_metaworld: error:")]
    assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]
    assert not (tmp_path / "o").exists()


def test_gen_cli_train_goals(tmp_path):
    r = subprocess.run(["icrt_metaworld_gen", str(tmp_path / "d"), "--suite", "icl", "--train-goals", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train_goals=0" in r.stderr


def test_two_demos_per_goal_train_every_goal(tmp_path):
    "3 goals x 2 demonstrations: the dataset says min_demos 2, and every goal gives windows whose prompt is its other demo."
    tasks = [t for t in icl_tasks(3) if t.startswith("reach@")]
    cfg = generate_metaworld_dataset(tmp_path / "d", tasks=tasks, episodes_per_task=2, image_size=16, num_procs=2)
    assert json.loads(cfg.read_text())["min_demos"] == 2
    T = window_length(tmp_path / "d", 2)  # prompt + target, as the bench trains
    ds = SequenceDataset(DatasetConfig(dataset_json=str(cfg), non_overlapping=T // 4), SharedConfig(seq_length=T, num_pred_steps=4),
                         data_config=dict(input_size=(3, 16, 16)))
    assert sorted(ds.groups) == sorted(tasks) and set(ds.fill) == set(tasks)
    windows = {ds.plan.block_task[int(np.searchsorted(ds.plan.block_start, s, side="right")) - 1] for s in ds.plan.starts}
    assert windows == set(tasks)  # without the fill no goal's two demos hold a window of two longest demos
    first = ds.episodes[ds.plan.seg_episode[0]]; second = ds.episodes[ds.plan.seg_episode[1]]
    assert first != second and ds.task_of(first) == ds.task_of(second)


def test_bench_icl_one_demo_per_goal(tmp_path):
    "The many-goals, one-demo recipe at smoke size (reach only, k=1), with flatten_pool: every stage runs and the report says what it trained on."
    out = tmp_path / "few"
    r = _bench("--suite", "icl", "--preset", "smoke", "--out", str(out), "--device", "cpu", "--set", "train_goals=4",
               "--set", "episodes_per_task=1", "--set", 'verbs=["reach"]', "--set", "ks=[1]", "--set", "flatten_pool=true")
    assert r.returncode == 0, r.stderr[-2000:]
    rep, md = json.loads((out / "report.json").read_text()), (out / "report.md").read_text()
    assert rep["dataset"]["episodes"] == 4 and json.loads((out / "data" / "dataset_config.json").read_text())["min_demos"] == 1
    assert rep["train"]["log"] and set(rep["evaluation"]["verbs"]) == {"reach"}
    assert "4 goals each, 1 expert demonstrations per (verb, goal) (every training prompt is then its target" in md
    assert rep["preset"]["flatten_pool"] is True
    ckpt = next((out / "train").rglob("checkpoint*.pth"))
    assert any(k.startswith("flat_proj.") for k in torch.load(ckpt, weights_only=True)["model"])  # the run trained with it
