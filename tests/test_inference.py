"ICRTPolicy: a run folder rebuilt into a policy that feeds the model exactly what the training loader fed it."
import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from icrt.config import parse_args
from icrt.data.dataset import SequenceDataset, load_episode, window_pieces
from icrt.data.format import load_dataset_config, read_frames, read_lowdim
from icrt.geometry import euler_to_matrix, matrix_to_quat
from icrt.inference import ICRTPolicy, InferenceError, act_many
from conftest import FAST
from icrt.tiny import recipe_flags, scale_down
from icrt.checkpoint import load_checkpoint
from icrt.train import train


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


@pytest.fixture(scope="module")
def policy(run_dir):
    return ICRTPolicy.from_run(run_dir)


def raw_episode(spec, ep, quat=False):
    "An episode as a robot logger would write it: arrays under the dataset's keys (poses optionally as quaternions)."
    with h5py.File(spec.dataset_path[spec.episode_file[ep]]) as f:
        g = f[ep]; T = g[spec.action_keys[0]].shape[0]
        d = {k: read_frames(g, k, 0, T) for k in spec.image_keys}
        d.update({k: read_lowdim(g, k, 0, T) for k in spec.proprio_keys + spec.action_keys})
    if quat:
        for k in (spec.proprio_keys[0], spec.action_keys[0]):
            p = d[k].astype(np.float64)
            d[k] = np.concatenate([p[:, :3], matrix_to_quat(euler_to_matrix(p[:, 3:]), order="wxyz")], -1)
    return d


@pytest.mark.parametrize("split", ["train", "val"])
def test_policy_inputs_equal_loader_inputs(policy, run_dir, assets, split):
    "Every window of the loader (augmentation and noise off) equals the policy's conversion of the same episode steps."
    cfg, spec = policy.cfg, load_dataset_config(assets.dataset_json)
    ds = SequenceDataset(replace(cfg.dataset_cfg, vision_aug=False, proprio_noise=0.0), cfg.shared_cfg, split=split,
                         split_file=run_dir / f"{split}_split.json", data_config=policy.data_config)
    cache, checked = {}, 0
    for i in range(min(len(ds), 6)):
        sample, pos = ds[i], 0
        for si, a, b in window_pieces(ds.plan, int(ds.plan.starts[i]), ds.T):
            ep = ds.episodes[int(ds.plan.seg_episode[si])]
            if ep not in cache: cache[ep] = policy.inputs(load_episode(spec, ep))
            x, n = cache[ep], b - a
            torch.testing.assert_close(x["observation"][a:b], sample["observation"][pos:pos + n], atol=1e-5, rtol=0)
            torch.testing.assert_close(x["proprio"][a:b], sample["proprio"][pos:pos + n, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(x["action"][a:b], sample["action"][pos:pos + n, 0, :10], atol=1e-5, rtol=0)
            pos += n; checked += n
    assert checked >= ds.T


def test_raw_and_quaternion_episodes_give_the_same_inputs(policy, assets):
    spec = load_dataset_config(assets.dataset_json)
    ep = sorted(spec.epi_len)[0]
    ref = policy.inputs(load_episode(spec, ep))
    for quat in (False, True):
        x = policy.inputs(raw_episode(spec, ep, quat))
        for k in ("observation", "proprio", "action", "abs_action"):
            torch.testing.assert_close(x[k], ref[k], atol=1e-5, rtol=0)


def test_act_matches_step_on_loader_inputs_and_returns_finite_actions(policy, assets):
    "act on raw observations (PIL images for one camera) and step on the converted episode give the same actions."
    from PIL import Image
    spec = load_dataset_config(assets.dataset_json)
    eps = spec.verb_to_episode[sorted(spec.verb_to_episode)[0]]
    demo, ep = load_episode(spec, eps[0]), raw_episode(spec, eps[1])
    x = policy.inputs(ep)
    policy.reset(); policy.prompt([demo])
    ref = [policy.step(x["observation"][t], x["proprio"][t].numpy(), x["abs_action"][t - 1].numpy() if t else None) for t in range(6)]
    policy.reset(); policy.prompt([demo])
    acts = []
    for t in range(6):
        obs = {k: ep[k][t] for k in spec.image_keys}
        obs[spec.image_keys[0]] = Image.fromarray(obs[spec.image_keys[0]])
        obs.update({k: ep[k][t] for k in spec.proprio_keys})
        prev = np.concatenate([ep[k][t - 1] for k in spec.action_keys]) if t else None
        acts.append(policy.act(obs, executed_action=prev))
    acts = np.stack(acts)
    assert acts.shape == (6, 7) and np.isfinite(acts).all()
    np.testing.assert_allclose(acts, np.stack(ref), atol=1e-4)
    assert policy.control_rate > 1.0, policy.control_rate   # steps/s of a tiny model on one CPU thread
    print(f"tiny policy: {policy.control_rate:.1f} control steps/s on CPU")


def test_act_many_sessions_equal_their_lone_runs(policy, assets):
    "8 policies on forks of one model stepped together (act_many: what icrt_serve does with 8 sessions) each equal their lone run."
    spec = load_dataset_config(assets.dataset_json)
    eps = [e for v in sorted(spec.verb_to_episode) for e in spec.verb_to_episode[v]]
    jobs, steps = [(eps[i % len(eps)], raw_episode(spec, eps[(i + 1) % len(eps)])) for i in range(8)], 12
    T = lambda ep: len(ep[spec.action_keys[0]])
    obs_of = lambda ep, t: {k: ep[k][t % T(ep)] for k in spec.image_keys + spec.proprio_keys}
    ex_of = lambda ep, t: np.concatenate([ep[k][(t - 1) % T(ep)] for k in spec.action_keys]) if t % 3 == 2 else None
    lone = []
    for demo, ep in jobs:
        policy.reset(); policy.prompt([load_episode(spec, demo)]); a, c = [], []
        for t in range(steps): a.append(policy.act(obs_of(ep, t), ex_of(ep, t))); c.append(policy.model.last_chunk.clone())
        lone.append((np.stack(a), torch.stack(c)))
    forks = [ICRTPolicy(policy.model.fork(), policy.cfg, policy.keys) for _ in jobs]
    for f, (demo, _) in zip(forks, jobs): f.prompt([load_episode(spec, demo)])
    got = [([], []) for _ in jobs]
    for t in range(steps):
        out = act_many(forks, [obs_of(ep, t) for _, ep in jobs], [ex_of(ep, t) for _, ep in jobs])
        for i, (f, a) in enumerate(zip(forks, out)):
            assert not isinstance(a, BaseException), a
            got[i][0].append(a); got[i][1].append(f.model.last_chunk.clone())
    for i, ((a, c), (ga, gc)) in enumerate(zip(lone, got)):
        # a batched matrix product sums in another order than a one-row one: the network's outputs (the chunk, model
        # space) agree to float32 rounding (~5e-7); the conversion to Euler angles can scale that by 1/|rot6d column| and
        # 1/cos(pitch), large for a random-ish model's chunks, hence 1e-4 on the executed actions
        torch.testing.assert_close(torch.stack(gc), c, rtol=0, atol=1e-5, msg=f"session {i}: chunk")
        np.testing.assert_allclose(np.stack(ga), a, rtol=0, atol=1e-4, err_msg=f"session {i}: actions")
    demo, ep = jobs[0]  # one policy alone: act (act_many of one) is bit for bit the model's own step on the same tensors
    policy.reset(); policy.prompt([load_episode(spec, demo)]); a = [policy.act(obs_of(ep, t)) for t in range(steps)]
    policy.reset(); policy.prompt([load_episode(spec, demo)]); b = [policy.step(*policy.observation_inputs(obs_of(ep, t))) for t in range(steps)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_executed_actions_change_the_context(policy, assets):
    "Teacher forcing is not a no-op: feeding other executed actions changes later predictions."
    spec = load_dataset_config(assets.dataset_json)
    eps = sorted(spec.epi_len)
    x, demo = policy.inputs(load_episode(spec, eps[1])), load_episode(spec, eps[0])
    outs = []
    for shift in (0.0, 0.05):
        policy.reset(); policy.prompt([demo])
        for t in range(4):
            ex = x["abs_action"][t - 1].numpy().copy() if t else None
            if ex is not None: ex[:3] += shift
            a = policy.step(x["observation"][t], x["proprio"][t].numpy(), ex)
        outs.append(a)
    assert not np.allclose(outs[0], outs[1])


def test_nonpretrained_encoder_weights_come_back(assets, tmp_path):
    "A randomly initialised frozen encoder is rebuilt from the checkpoint, not re-drawn."
    run = train(parse_args(scale_down(recipe_flags("train"), assets, tmp_path / "runs",
                                      FAST + ["--model-cfg.vision-encoder-cfg.vision-nonpretrained"])))
    ck = load_checkpoint(sorted(run.glob("checkpoint-*.pth"))[-1])["model"]
    torch.manual_seed(123)  # a re-drawn encoder would differ
    pol = ICRTPolicy.from_run(run)
    sd = pol.model.state_dict()
    vis = [k for k in ck if k.startswith("vision.")]
    assert vis
    for k in vis: torch.testing.assert_close(sd[k], ck[k])


def test_moved_encoder_is_found_beside_the_run(run_dir, tmp_path):
    "A local encoder file that moved is looked for beside the run; when it is gone the error says where to put it."
    new = tmp_path / "run"; shutil.copytree(run_dir, new)
    cfg = yaml.safe_load((new / "run.yaml").read_text())
    enc = Path(cfg["model_cfg"]["vision_encoder_cfg"]["vision_encoder"])
    cfg["model_cfg"]["vision_encoder_cfg"]["vision_encoder"] = str(tmp_path / "gone" / enc.name)
    (new / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(InferenceError, match="vision encoder .* is missing"): ICRTPolicy.from_run(new)
    shutil.copy(enc, new / enc.name)
    assert np.isfinite(ICRTPolicy.from_run(new).model.action_std.numpy()).all()


def test_execution_horizon_and_ensembling_pass_through(policy, assets):
    spec = load_dataset_config(assets.dataset_json)
    eps = sorted(spec.epi_len)
    x, demo = policy.inputs(load_episode(spec, eps[1])), load_episode(spec, eps[0])
    K = policy.num_pred_steps
    policy.reset(action_exec_horizon=K); policy.prompt([demo])
    a = [policy.step(x["observation"][t], x["proprio"][t].numpy()) for t in range(K)]
    np.testing.assert_allclose(np.stack(a), policy.last_chunk, atol=1e-5)
    policy.reset(temporal_ensemble=True); policy.prompt([demo])
    assert np.isfinite(np.stack([policy.step(x["observation"][t], x["proprio"][t].numpy()) for t in range(3)])).all()
    with pytest.raises(ValueError, match="action_exec_horizon"): policy.reset(action_exec_horizon=K + 1)
    policy.reset()


def test_bad_inputs_fail_clearly(run_dir, assets, tmp_path, policy):
    with pytest.raises(InferenceError, match="does not exist"): ICRTPolicy.from_run(tmp_path / "nope")
    with pytest.raises(InferenceError, match="no run.yaml"): ICRTPolicy.from_run(assets.root)
    empty = tmp_path / "empty"; empty.mkdir(); shutil.copy(run_dir / "run.yaml", empty / "run.yaml")
    with pytest.raises(InferenceError, match="no checkpoint"): ICRTPolicy.from_run(empty)
    with pytest.raises(InferenceError, match="no such file"): ICRTPolicy.from_run(run_dir, checkpoint=tmp_path / "x.pth")
    with pytest.raises(InferenceError, match="lacks key"): policy.act({"observation/cartesian_position": np.zeros(6)})
    spec = load_dataset_config(assets.dataset_json)
    obs = {k: np.zeros((48, 64, 3), np.float32) for k in spec.image_keys}
    obs.update({spec.proprio_keys[0]: np.zeros(6), spec.proprio_keys[1]: np.zeros(1)})
    with pytest.raises(InferenceError, match="uint8"): policy.act(obs)
    obs.update({k: np.zeros((48, 64, 3), np.uint8) for k in spec.image_keys}); obs[spec.proprio_keys[0]] = np.zeros(5)
    with pytest.raises(InferenceError, match="pose must be"): policy.act(obs)


def _observation(spec, ep, t):
    return {**{k: ep[k][t] for k in spec.image_keys}, **{k: ep[k][t] for k in spec.proprio_keys}}


@pytest.mark.parametrize("key,bad", [("observation/cartesian_position", np.nan), ("observation/cartesian_position", np.inf),
                                     ("observation/gripper_position", np.nan), ("executed_action", -np.inf)])
def test_non_finite_input_is_refused_and_the_policy_keeps_working(policy, assets, key, bad):
    "NaN/inf in the pose, the gripper or executed_action: an InferenceError naming key and step, before the context; the next valid act equals a fresh policy's."
    spec = load_dataset_config(assets.dataset_json)
    eps = spec.verb_to_episode[sorted(spec.verb_to_episode)[0]]
    demo, ep = load_episode(spec, eps[0]), raw_episode(spec, eps[1])
    prev = lambda t: np.concatenate([ep[k][t - 1] for k in spec.action_keys])
    def fresh(): policy.reset(); policy.prompt([demo])
    fresh(); ref = [policy.act(_observation(spec, ep, 0)), policy.act(_observation(spec, ep, 1), prev(1)),
                    policy.act(_observation(spec, ep, 2), prev(2))]
    fresh(); got = [policy.act(_observation(spec, ep, 0)), policy.act(_observation(spec, ep, 1), prev(1))]
    obs, ex = _observation(spec, ep, 2), prev(2)
    if key == "executed_action": ex = ex.copy(); ex[1] = bad
    else: obs[key] = np.array(obs[key], np.float64); obs[key][-1] = bad
    with pytest.raises(InferenceError) as e: policy.act(obs, ex)
    assert key in str(e.value) and "step 2" in str(e.value) and "\n" not in str(e.value), e.value
    assert policy.t == 2
    got.append(policy.act(_observation(spec, ep, 2), prev(2)))
    np.testing.assert_array_equal(np.stack(got), np.stack(ref))
    assert np.isfinite(np.stack(got)).all()


def test_prompt_with_non_finite_demo_is_refused(policy, assets):
    spec = load_dataset_config(assets.dataset_json)
    eps = sorted(spec.epi_len)
    good, bad = raw_episode(spec, eps[0]), raw_episode(spec, eps[1])
    bad["observation/gripper_position"] = bad["observation/gripper_position"].astype(np.float64)
    bad["observation/gripper_position"][4, 0] = np.nan
    policy.reset()
    with pytest.raises(InferenceError, match=r"prompt episode 1: 'observation/gripper_position' holds NaN/inf at step\(s\) \[4\]"):
        policy.prompt([good, bad])
    ld = load_episode(spec, eps[1]); ld["actions"] = np.array(ld["actions"]); ld["actions"][3, 0] = np.inf
    with pytest.raises(InferenceError, match="prompt episode 0: 'actions' holds NaN/inf"): policy.prompt([ld])
    x = policy.inputs(load_episode(spec, eps[0])); x = {**x, "proprio": x["proprio"].clone()}; x["proprio"][0, 0] = float("nan")
    with pytest.raises(InferenceError, match="'proprio' holds NaN/inf"): policy.prompt([x])
    # nothing reached the context: prompting the good demo now acts like a fresh policy
    obs = _observation(spec, good, 0)
    policy.prompt([good]); a = policy.act(obs)
    policy.reset(); policy.prompt([good]); np.testing.assert_array_equal(policy.act(obs), a)
    policy.reset()


def test_act_bad_shapes_and_types_name_the_key(policy, assets):
    spec = load_dataset_config(assets.dataset_json)
    ep = raw_episode(spec, sorted(spec.epi_len)[0])
    policy.reset()
    def refused(obs, match, ex=None):
        with pytest.raises(InferenceError, match=match) as e: policy.act(obs, ex)
        assert "\n" not in str(e.value)
    refused({**_observation(spec, ep, 0), "observation/gripper_position": np.array([0.1, 0.9])},
            "'observation/gripper_position': a gripper must be 1 number, got 2")
    refused({**_observation(spec, ep, 0), "observation/cartesian_position": "0 0 0 0 0 0"},
            "'observation/cartesian_position' must be numbers")
    refused({**_observation(spec, ep, 0), spec.image_keys[0]: np.zeros((0, 0, 3), np.uint8)},
            f"camera '{spec.image_keys[0]}': empty frame")
    refused(_observation(spec, ep, 0), "'executed_action': must be a pose", ex=np.zeros(9))
    assert policy.t == 0


def test_from_run_errors_name_arguments_not_cli_flags(run_dir, tmp_path):
    bad = tmp_path / "bad"; bad.mkdir(); (bad / "run.yaml").write_text("a: [1")
    for call in (lambda: ICRTPolicy.from_run(bad), lambda: ICRTPolicy.from_run(run_dir, checkpoint=tmp_path / "x.pth"),
                 lambda: ICRTPolicy.from_run(tmp_path / "empty_run")):
        with pytest.raises(InferenceError) as e: call()
        assert "--load-config" not in str(e.value) and "--checkpoint" not in str(e.value), e.value
    junk = tmp_path / "junk.pth"; junk.write_bytes(b"not a checkpoint")
    from icrt.config import ICRTError
    with pytest.raises(ICRTError) as e: ICRTPolicy.from_run(run_dir, checkpoint=junk)
    assert "--checkpoint" not in str(e.value) and "checkpoint" in str(e.value)


def test_reset_keeps_the_prompt(policy, assets):
    """reset() rolls back to the end of the prompt without re-encoding it: the next episode's actions are bit-identical
    to those after a fresh prompt; a second prompt replaces the first; reset(keep_prompt=False) forgets it."""
    spec = load_dataset_config(assets.dataset_json)
    eps = sorted(spec.epi_len)
    demo, other, run = raw_episode(spec, eps[0]), raw_episode(spec, eps[1]), raw_episode(spec, eps[2])
    obs = [_observation(spec, run, t) for t in range(6)]
    episode = lambda: np.stack([policy.act(o) for o in obs])
    policy.reset(max_len=1024); policy.prompt([demo]); first = episode(); n = policy.model._prompt_len
    calls = []
    orig = policy.model.state_tokens
    policy.model.state_tokens = lambda *a, **k: (calls.append(a[0].shape[1]), orig(*a, **k))[1]
    try:
        policy.reset(); assert policy.model.pos == n; again = episode()
    finally: policy.model.state_tokens = orig
    assert calls == [1] * len(obs), calls  # only the episode's own steps were encoded
    np.testing.assert_array_equal(again, first)
    policy.prompt([other]); assert policy.model._prompt_len != n or not np.array_equal(episode(), first)
    policy.prompt([demo]); np.testing.assert_array_equal(episode(), first)
    policy.reset(keep_prompt=False); assert policy.model.pos == 0
    policy.reset()


def test_finetune_from_a_pretrained_transformer_restores_its_frozen_base(assets, tmp_path):
    """Phase pretrain on the Llama folder trains the whole transformer; a phase-finetune run started from it
    (--model-cfg.policy-cfg.pretrained-path) saves only LoRA, biases and norms. from_run must rebuild the frozen base
    from the pretrain checkpoint, as training did, not from the Llama folder."""
    flags = lambda *extra: scale_down(recipe_flags("finetune_llama2_7b"), assets, tmp_path, FAST + list(extra))
    pre = train(parse_args(flags("--model-cfg.policy-cfg.phase", "pretrain", "--logging-cfg.log-name", "pre")))
    pre_ck = sorted(pre.glob("checkpoint-*.pth"))[-1]
    ft = train(parse_args(flags("--model-cfg.policy-cfg.pretrained-path", str(pre_ck), "--logging-cfg.log-name", "ft")))
    saved = torch.load(sorted(ft.glob("checkpoint-*.pth"))[-1], weights_only=True)["model"]
    key = "transformer.layers.0.attention.wq.weight"
    assert key not in saved and "transformer.layers.0.attention.wq.base_layer.weight" not in saved  # the base is not in it
    base = torch.load(pre_ck, weights_only=True)["model"][key]
    got = ICRTPolicy.from_run(ft).model.transformer.state_dict()["layers.0.attention.wq.base_layer.weight"]
    torch.testing.assert_close(got, base, atol=0, rtol=0)
