"Behaviour of the ICRT policy: cache vs full forward, overfitting per head, phases, checkpoints, scale_action, errors, benchmark CLI."
import json
import subprocess
import sys

import pytest
from conftest import one_line_error
import torch

from icrt.config import REPO_CONFIGS, ConfigError, ICRTError, ModelConfig, PolicyConfig, SharedConfig, VisionEncoderConfig
from icrt.geometry import absolute_to_delta, delta_to_absolute, pose_to_pos_rot6d
from icrt.models.policy import ICRT
from icrt.geometry import to_pose7
from icrt.tiny import tiny_batch, tiny_encoder, tiny_model

HEADS = ["mlp", "gmm", "diffusion"]
STATS_JSON = REPO_CONFIGS / "data_config" / "icrt_mt" / "action_statistics.json"


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models run fastest on one thread (and do not fight other processes for cores)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_batch(**kw):
    "One episode of random targets of unit scale, with more end flags than the notebook's batch."
    return tiny_batch(**{"B": 1, "act_std": 1.0, "end_p": 0.3, **kw})


def names(m, trainable=True):
    return {n for n, p in m.named_parameters() if p.requires_grad == trainable}


# ---------------------------------------------------------------- cache == full forward
@pytest.mark.parametrize("head", HEADS)
def test_cached_steps_match_full_forward(head):
    m = tiny_model(decoder_pred_head=head, multikv_attn_pool=True, modality_pos_emb=True).eval()
    m.set_action_stats({"mean": torch.linspace(-.1, .1, 10), "std": torch.linspace(.5, 2., 10)})
    b = make_batch(T=8, seed=3)
    with torch.no_grad(): full = m.encode(b)[0]                               # (T, dim)
    obs, pro, act = b["observation"][0], b["proprio"][0, :, 0], b["action"][0, :, 0, :10]
    m.reset()
    m.prompt([{"observation": obs[:2], "proprio": pro[:2], "action": act[:2]},   # two demonstrations
              {"observation": obs[2:4], "proprio": pro[2:4], "action": act[2:4]}])
    for t in range(4, 8):
        m.get_action(obs[t], pro[t], prev_action=act[t - 1] if t > 4 else None)
        torch.testing.assert_close(m.last_hidden, full[t], atol=1e-4, rtol=0)
        if head != "diffusion":  # deterministic heads: the whole chunk matches too
            with torch.no_grad(): want = m.denormalize_action(m.head.predict(full[t][None]))[0]
            torch.testing.assert_close(m.last_chunk, want, atol=1e-4, rtol=1e-4)
    assert m.pos == 2 * 8 - 1


@pytest.mark.parametrize("variant", [dict(separate_camera_adapter=False), dict(separate_camera_adapter=False, multikv_attn_pool=True),
                                     dict(remove_proprio=True), dict(camera_pos_emb=True, phase="finetune")])
def test_adapter_variants_cache_and_proprio(variant):
    m = tiny_model(**variant).eval()
    b = make_batch(T=5, seed=8)
    with torch.no_grad(): full = m.encode(b)[0]
    obs, pro, act = b["observation"][0], b["proprio"][0, :, 0], b["action"][0, :, 0, :10]
    m.reset(); m.prompt([{"observation": obs[:3], "proprio": pro[:3], "action": act[:3]}])
    m.get_action(obs[3], pro[3]); m.get_action(obs[4], pro[4], prev_action=act[3])
    torch.testing.assert_close(m.last_hidden, full[4], atol=1e-4, rtol=0)
    b2 = {**b, "proprio": b["proprio"] + 1.}          # the proprio token matters unless remove_proprio
    with torch.no_grad(): changed = (m.encode(b2)[0] - full).abs().max().item() > 1e-4
    assert changed != variant.get("remove_proprio", False)


def test_default_prev_action_is_the_executed_one():
    "Without prev_action, the model-space action it returned last is fed: same context as passing it explicitly."
    m = tiny_model().eval()
    b = make_batch(T=4, seed=4)
    obs = b["observation"][0]
    pro = torch.cat([pose_to_pos_rot6d(torch.tensor([.3, .1, .2, .1, -.2, .3])), torch.tensor([.5])])
    m.reset(); m.get_action(obs[0], pro); c0 = m.last_chunk[0].clone(); m.get_action(obs[1], pro); h_auto = m.last_hidden
    # the executed action is the chunk's first pose (rotation re-orthonormalised), expressed relative to the proprio
    a0 = torch.cat([absolute_to_delta(pro[:9], delta_to_absolute(pro[:9], c0[:9])), c0[9:]])
    m.reset(); m.get_action(obs[0], pro); m.get_action(obs[1], pro, prev_action=a0); h_expl = m.last_hidden
    torch.testing.assert_close(h_auto, h_expl, atol=1e-5, rtol=0)


def test_delta_to_absolute_output():
    m = tiny_model().eval()
    pro = torch.cat([pose_to_pos_rot6d(torch.tensor([.3, .1, .2, .1, -.2, .3])), torch.tensor([.5])])
    m.reset(); chunk = m.get_action(make_batch(seed=5)["observation"][0, 0], pro)
    assert chunk.shape == (4, 7)
    want = to_pose7(torch.cat([delta_to_absolute(pro[:9].expand(4, 9), m.last_chunk[:, :9]), m.last_chunk[:, 9:]], -1))
    torch.testing.assert_close(chunk, want, atol=1e-5, rtol=0)
    m.reset(action_exec_horizon=2)
    outs = [m.get_action(make_batch(seed=5)["observation"][0, t], pro) for t in range(3)]
    assert all(o.shape == (7,) for o in outs) and m.pos == 2 * 3 - 1


# ---------------------------------------------------------------- overfitting
def _overfit(m, b, steps, lr):
    m.train(); opt = torch.optim.AdamW(m.param_groups(0.0), lr=lr)
    tgt = b["action"][..., :10].reshape(-1, 4, 10)
    def err():
        m.eval()
        with torch.no_grad():
            h = m.encode(b).reshape(-1, m.dim)
            p = m.denormalize_action(m.head.predict(h, generator=torch.Generator().manual_seed(0)))
        m.train(); return (p - tgt).abs().mean().item()
    e0, losses = err(), []
    for _ in range(steps):
        loss, _ = m(b); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    return losses[0], sum(losses[-5:]) / 5, e0, err()


@pytest.mark.parametrize("head,steps", [("mlp", 150), ("gmm", 200), ("diffusion", 300)])
def test_overfit_one_batch(head, steps):
    "Loss (mlp, diffusion) and prediction error (all heads; gmm's NLL goes negative) drop 10x on one batch."
    m = tiny_model(decoder_pred_head=head)
    b = make_batch(T=2, seed=1)
    l0, l1, e0, e1 = _overfit(m, b, steps, lr=2e-3)
    assert e1 < e0 / 10, (head, e0, e1)
    if head == "gmm": assert l1 < l0 - 1.0, (l0, l1)
    else: assert l1 < l0 / 10, (head, l0, l1)


# ---------------------------------------------------------------- phases & checkpoints
OURS = ("vision_norm.", "proprio_mlp.", "adapters.", "action_mlp.", "head.")


def test_finetune_trains_lora_biases_norms_only():
    m = tiny_model(phase="finetune", lora_rank=3, lora_layer_idxs=[1])
    t_tr = {n for n in names(m) if n.startswith("transformer.")}
    assert t_tr and all("lora_" in n or "norm" in n or n.endswith(".bias") for n in t_tr)
    lora = [n for n in t_tr if "lora_" in n]
    assert lora and all("layers.1." in n for n in lora)
    assert m.transformer.layers[1].attention.wq.lora_A["default"].weight.shape[0] == 3
    frozen_t = {n for n in names(m, False) if n.startswith("transformer.")}
    assert any("feed_forward" in n for n in frozen_t) and any("attention.wq" in n for n in frozen_t)
    assert all(any(n.startswith(p) for n in names(m)) for p in OURS)


def test_finetune_checkpoint_roundtrip_without_frozen_weights(tmp_path):
    m = tiny_model(phase="finetune", lora_rank=2).eval()
    m.set_action_stats(json.loads(STATS_JSON.read_text()))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad: p.add_(0.01 * torch.randn_like(p))   # make trained tensors differ from a fresh model
    sd = m.trainable_state_dict()
    assert not set(sd) & names(m, False)
    assert not any(k.startswith("vision.") for k in sd)
    assert {"action_mean", "action_std", "action_min", "action_max"} <= set(sd)
    torch.save({"model": sd}, tmp_path / "ck.pth")
    fresh = tiny_model(phase="finetune", lora_rank=2).eval()
    missing, unexpected = fresh.load_trainable_state_dict(torch.load(tmp_path / "ck.pth")["model"])
    assert (missing, unexpected) == ([], [])
    b = make_batch(seed=7)
    with torch.no_grad(): torch.testing.assert_close(fresh.encode(b), m.encode(b))
    torch.testing.assert_close(fresh.action_std, m.action_std)
    with pytest.raises(ValueError, match="does not fit"): fresh.load_trainable_state_dict({**sd, "bogus.weight": torch.zeros(1)})


def test_pretrain_checkpoint_loads_into_finetune_model():
    pre = tiny_model()
    with torch.no_grad(): pre.transformer.layers[0].attention.wq.weight.add_(1.)
    fin = tiny_model(phase="finetune")
    missing, unexpected = fin.load_trainable_state_dict(pre.trainable_state_dict(), strict=False)
    assert unexpected == [] and missing and all("lora_" in k for k in missing)
    torch.testing.assert_close(fin.transformer.layers[0].attention.wq.base_layer.weight, pre.transformer.layers[0].attention.wq.weight)


# ---------------------------------------------------------------- scale_action
def test_scale_action_normalises_the_targets_the_head_sees():
    m = tiny_model(scale_action=str(STATS_JSON))
    st = json.loads(STATS_JSON.read_text())
    mean, std = torch.tensor(st["mean"], dtype=torch.float32), torch.tensor(st["std"], dtype=torch.float32)
    torch.testing.assert_close(m.action_mean, mean); torch.testing.assert_close(m.action_std, std)
    seen = {}
    orig = m.head.loss
    m.head.loss = lambda h, target: seen.setdefault("t", target) is not None and orig(h, target)
    b = make_batch(seed=2, act_std=0.02)
    m(b)
    want = ((b["action"][..., :10] - mean) / std).reshape(-1, 4, 10)
    torch.testing.assert_close(seen["t"], want)
    a = torch.randn(3, 10)
    torch.testing.assert_close(m.denormalize_action(m.normalize_action(a)), a, atol=1e-5, rtol=1e-5)


def test_scale_action_undone_at_inference():
    m = tiny_model().eval()
    m.set_action_stats({"mean": torch.full((10,), .5), "std": torch.full((10,), 3.)})
    m.reset(); m.get_action(make_batch(seed=6)["observation"][0, 0], torch.randn(10))
    with torch.no_grad(): raw = m.head.predict(m.last_hidden[None])[0]
    torch.testing.assert_close(m.last_chunk, raw * 3. + .5)


def test_icrt_does_not_read_the_scale_action_file():
    "Statistics are set by whoever reads the file (trainer) or come from a checkpoint; building never reads it."
    pc = PolicyConfig(scratch_llama_config="custom_transformer_tiny", adapter_num_heads=4)
    m = ICRT(ModelConfig(VisionEncoderConfig(vision_nonpretrained=True), pc),
             SharedConfig(num_pred_steps=4, scale_action="/nonexistent/action_statistics.json"), vision_encoder=tiny_encoder())
    assert not m.has_action_stats


# ---------------------------------------------------------------- errors
def test_clear_errors(tmp_path):
    m = tiny_model()
    b = make_batch()
    with pytest.raises(ValueError, match="num-cameras 2"): m({**b, "observation": b["observation"][:, :, :1]})
    with pytest.raises(ValueError, match="num-pred-steps 4"): m({**b, "action": b["action"][:, :, :3]})
    with pytest.raises(KeyError, match="prompt_mask"):
        tiny_model(no_prompt_loss=True)({k: v for k, v in b.items() if k != "prompt_mask"})
    with pytest.raises(ConfigError, match="decoder-pred-head gmm"): tiny_model(kl_div_loss=True)
    with pytest.raises(ConfigError, match="no such file"): tiny_model(scale_action=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"mean": [0.] * 10}))
    with pytest.raises(ConfigError, match="missing key 'std'"): tiny_model(scale_action=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="action_exec_horizon"): m.reset(action_exec_horizon=2, temporal_ensemble=True)
    m.reset(max_len=3)
    with pytest.raises(RuntimeError, match="context full"):
        x = make_batch(T=2)
        m.prompt([{"observation": x["observation"][0], "proprio": x["proprio"][0, :, 0], "action": x["action"][0, :, 0, :10]}])


@pytest.mark.parametrize("cams", [1, 3])
def test_other_number_of_cameras_is_a_config_error(cams):
    "A batch or an observation with another camera count than --shared-cfg.num-cameras: one ConfigError line."
    m = tiny_model().eval()
    b = make_batch(N=cams)
    with pytest.raises(ConfigError) as e: m(b)
    one_line_error(e, f"has {cams} camera(s)", "--shared-cfg.num-cameras 2")
    m.reset()
    with pytest.raises(ConfigError) as e: m.get_action(b["observation"][0, 0], b["proprio"][0, 0, 0])
    one_line_error(e, "--shared-cfg.num-cameras 2")


def _params(tmp_path, **kw):
    "A scratch transformer params JSON: the tiny one with `kw` changed."
    p = tmp_path / ("params_" + "_".join(f"{k}{v}" for k, v in kw.items()) + ".json")
    p.write_text(json.dumps({**json.loads((REPO_CONFIGS / "model_config" / "custom_transformer_tiny.json").read_text()), **kw}))
    return str(p)


@pytest.mark.parametrize("other", ["dim", "layers", "head"])
def test_checkpoint_of_another_model_is_one_config_error(tmp_path, other):
    "A checkpoint of another width, layer count or head: ConfigError (an ICRTError) in one line, naming the first key."
    kw = {"dim": dict(scratch_llama_config=_params(tmp_path, dim=32)),
          "layers": dict(scratch_llama_config=_params(tmp_path, n_layers=3)),
          "head": dict(decoder_pred_head="gmm")}[other]
    sd = tiny_model(**kw).trainable_state_dict()
    with pytest.raises(ICRTError) as e: tiny_model().load_trainable_state_dict(sd)
    assert isinstance(e.value, ConfigError)
    want = {"dim": ["tensor 'transformer.layers.0.attention.wq.weight' has shape (32, 32), the model's has (64, 64) (+", "(dim, layers, head)"],
            "layers": ["0 missing", "unexpected (e.g. ['transformer.layers.2."],
            "head": ["tensor 'head.net.2.weight' has shape (252, 64), the model's has (40, 64)"]}[other]
    one_line_error(e, "checkpoint does not fit the model", *want)


# ---------------------------------------------------------------- benchmark CLI
def test_bench_cli_tiny(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "icrt.bench.inference", "--config", "tiny", "--device", "cpu",
                        "--contexts", "50", "500", "2000", "--reps", "15", "--uncached-reps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert [row["context"] for row in res["rows"]] == [50, 500, 2000]
    assert all(row["cached_ms"] > 0 and row["uncached_ms"] > 0 and row["kv_cache_mb"] > 0 for row in res["rows"])
    assert res["vision_ms"] > 0 and "cached-step check" in r.stdout
    # the promise of the cache: a cached step at 2000 tokens costs at most 1.3x the step at 50 tokens
    assert res["cached_ratio"] <= 1.3 and r.returncode == 0, r.stdout + r.stderr


def test_bench_cli_bad_args():
    r = subprocess.run([sys.executable, "-m", "icrt.bench.inference", "--config", "huge"], capture_output=True, text=True)
    assert r.returncode != 0 and "invalid choice" in r.stderr


@pytest.mark.slow
def test_compiled_step_with_inductor_equals_eager():
    "compile_step() with torch.compile's default backend (a C++ compiler; about a minute on 2 cores): the same actions."
    from icrt.geometry import pose_to_pos_rot6d
    b = tiny_batch(B=1, T=3, seed=4)
    demo = {"observation": b["observation"][0], "proprio": b["proprio"][0, :, 0], "action": b["action"][0, :, 0, :10]}
    pv = torch.cat([pose_to_pos_rot6d(torch.tensor([0.3, 0.1, 0.2, 0.1, -0.2, 0.3])), torch.tensor([0.5])])
    def episode(m):
        m.reset(max_len=64); m.prompt([demo])
        return torch.stack([m.get_action(b["observation"][0, t % 3], pv) for t in range(6)])
    m = tiny_model().eval()
    ref = episode(m)
    out = episode(m.compile_step())
    assert m._step_compiled
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
