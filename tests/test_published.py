"""Bad inputs of the published-run importer (icrt.published): nothing in a file runs, every error is one line."""
import pickle
from pathlib import Path

import pytest
import torch

from icrt.published import PublishedError, read_published_checkpoint, read_published_yaml

FIX = Path(__file__).parent / "fixtures" / "published"


class _Evil:
    "Unpickling this calls os.system(cmd)."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self):
        import os
        return (os.system, (self.cmd,))


def _one_line(e): assert "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {m}']", "!!python/object/new:os.system ['touch {m}']",
                                 "!!python/name:os.system", "!!python/module:os", "!!python/object:subprocess.Popen {{args: 'touch {m}'}}"])
def test_yaml_dangerous_tag_refused_nothing_runs(tmp_path, tag):
    marker = tmp_path / "ran"
    text = (FIX / "pretrain" / "run.yaml").read_text().replace("train: true", "train: " + tag.format(m=marker))
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(PublishedError, match="refused YAML tag 'tag:yaml.org,2002:python/") as e: read_published_yaml(tmp_path / "run.yaml")
    _one_line(e)
    assert str(tmp_path / "run.yaml") in str(e.value)
    assert not marker.exists()


def test_yaml_not_published(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset_cfg: {dataset_json: x}\n")
    with pytest.raises(PublishedError, match="not a published run.yaml"): read_published_yaml(tmp_path / "run.yaml")


@pytest.mark.parametrize("form", ["torch", "pickle"])
def test_checkpoint_malicious_pickle_refused_nothing_runs(tmp_path, form):
    marker = tmp_path / "ran"
    ck = {"args": _Evil(f"touch {marker}"), "model": {"w": torch.zeros(2)}, "epoch": 1}
    path = tmp_path / "checkpoint-1.pth"
    if form == "torch": torch.save(ck, path)
    else: path.write_bytes(pickle.dumps(ck))
    with pytest.raises(PublishedError, match=r"refused pickled global '(posix|os)\.system'; nothing in it was run") as e:
        read_published_checkpoint(path)
    _one_line(e)
    assert not marker.exists()


def test_bare_pickle_tensor_refused(tmp_path):
    "A tensor pickled outside torch.save is rebuilt by torch.load(weights_only=False) inside torch: refused too."
    (tmp_path / "c.pth").write_bytes(pickle.dumps({"model": {"w": torch.zeros(2)}}))
    with pytest.raises(PublishedError, match="refused pickled global 'torch.storage._load_from_bytes'"):
        read_published_checkpoint(tmp_path / "c.pth")


def test_checkpoint_truncated(tmp_path):
    data = (FIX / "pretrain" / "checkpoint-3.pth").read_bytes()
    (tmp_path / "checkpoint-3.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PublishedError, match="truncated or not a torch file") as e: read_published_checkpoint(tmp_path / "checkpoint-3.pth")
    _one_line(e)


def test_checkpoint_not_published(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(PublishedError, match="not a published ICRT checkpoint"): read_published_checkpoint(tmp_path / "x.pth")
    with pytest.raises(PublishedError, match="no such file"): read_published_checkpoint(tmp_path / "missing.pth")


# --- icrt_import_published ---------------------------------------------------------------------------------------
import subprocess, sys

from icrt.published import import_published, import_published_cli

FILES = ["--vision-encoder", str(FIX / "vision_encoder.pth"), "--scratch-llama-config", str(FIX / "tiny_transformer.json"),
         "--llama-dir", str(FIX / "llama"), "--scale-action", str(FIX / "action_statistics.json"),
         "--pretrained-path", str(FIX / "pretrain" / "checkpoint-3.pth")]


def _cli(*args):
    "Run the console entry point in a fresh process; (exit code, stderr)."
    r = subprocess.run([sys.executable, "-c", "from icrt.published import import_published_cli as m; raise SystemExit(m())", *args],
                       capture_output=True, text=True)
    return r.returncode, r.stderr


def test_cli_out_holding_a_run_refused(tmp_path):
    out = tmp_path / "run"; out.mkdir(); (out / "run.yaml").write_text("x: 1\n")
    rc, err = _cli("--run-yaml", str(FIX / "pretrain" / "run.yaml"), "--checkpoint", str(FIX / "pretrain" / "checkpoint-3.pth"),
                   "--out", str(out), *FILES)
    assert rc == 1 and "already holds a run" in err and str(out) in err, err
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["run.yaml"]


def test_wrong_run_yaml_names_first_key(tmp_path):
    """A finetune checkpoint without its pickled args given with the pretrain run.yaml: the first key the pretrain model
    lacks is named. (With its args the disagreeing config field is named first: test_yaml_and_args_disagree_refused.)"""
    torch.save({"model": read_published_checkpoint(FIX / "finetune" / "checkpoint-3.pth")["model"], "epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(PublishedError, match=r"key 'llama\.layers\.0\.attention\.wq\.bias' does not exist .*same run\?") as e:
        import_published(FIX / "pretrain" / "run.yaml", tmp_path / "c.pth", tmp_path / "out",
                         **{k[2:].replace("-", "_"): v for k, v in zip(FILES[::2], FILES[1::2])})
    _one_line(e)
    assert not (tmp_path / "out").exists()


def test_missing_vision_encoder_named(tmp_path):
    "The fixture's encoder was random and not saved: the importer asks for --vision-encoder before any heavy work."
    with pytest.raises(PublishedError, match="give the vision encoder file with --vision-encoder"):
        import_published(FIX / "pretrain" / "run.yaml", FIX / "pretrain" / "checkpoint-3.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    "Both fixture runs imported through the icrt_import_published entry point."
    root = tmp_path_factory.mktemp("imported")
    n = torch.get_num_threads(); torch.set_num_threads(1)
    for phase in ("pretrain", "finetune"):
        rc = import_published_cli(["--run-yaml", str(FIX / phase / "run.yaml"), "--checkpoint", str(FIX / phase / "checkpoint-3.pth"),
                                   "--out", str(root / phase), *FILES])
        assert rc == 0, phase
    yield root
    torch.set_num_threads(n)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_imported_run_computes_published_outputs(imported, phase):
    """The imported run, loaded as any run here, gives the published code's numbers (fp32, 1e-4): teacher-forced chunks
    (head output and unscaled), the training loss, and the KV-cache path after a 4-step prompt. Pretrain: scratch
    transformer, MLP head; finetune: Llama-format transformer with the published LoRA and biases, its frozen base from
    the pretrain checkpoint; both with delta actions and action scaling."""
    from icrt.inference import ICRTPolicy
    from icrt.published import imported_outputs
    io = torch.load(FIX / phase / "io.pt", weights_only=True)
    model = ICRTPolicy.from_run(imported / phase).model
    assert model.policy_cfg.published_layout and model.policy_cfg.phase == phase
    got = imported_outputs(model, io)
    for k in ("teacher_forced_net", "teacher_forced", "cached", "loss"):
        torch.testing.assert_close(got[k], io[k], atol=1e-4, rtol=0, msg=lambda m: f"{phase} {k}: {m}")
    assert sorted(p.name for p in (imported / phase).iterdir()) == [
        "action_statistics.json", "checkpoint-3.pth", "imported.txt", "run.yaml", "vision_encoder.pth"]


def test_icrt_eval_runs_on_imported_run(imported, tmp_path):
    from icrt.eval import eval_cli
    from icrt.tiny import toy_dataset
    dj = toy_dataset(tmp_path / "toy")
    eval_cli([str(imported / "pretrain"), "--dataset-json", str(dj), "--split", "all", "--episodes", "2",
              "--out", str(tmp_path / "eval"), "--max-figures", "1"])
    import json, math
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    tf = rep["teacher_forced"]
    assert rep["num_episodes"] == 2 and tf["steps"] > 0, rep
    assert all(math.isfinite(tf[k]) for k in ("trans_mm", "rot_deg", "gripper_acc")), tf
    assert (tmp_path / "eval" / "report.md").is_file()


def test_finetune_from_imported_run(imported, tmp_path):
    """The seed's finetune recipe on the released-model stand-in: --load-config the imported run.yaml, start from its
    checkpoint (--model-cfg.policy-cfg.pretrained-path); it starts from exactly the imported weights and its loss falls."""
    import json
    from icrt.config import parse_args
    from icrt.train import build_model, train
    from icrt.tiny import toy_dataset
    dj = toy_dataset(tmp_path / "toy")
    ck = imported / "pretrain" / "checkpoint-3.pth"
    flags = ["--load-config", str(imported / "pretrain" / "run.yaml"), "--dataset-cfg.dataset-json", str(dj),
             "--dataset-cfg.task-names", "reach", "push", "pick", "--model-cfg.policy-cfg.pretrained-path", str(ck),
             "--logging-cfg.output-dir", str(tmp_path), "--logging-cfg.log-name", "ft", "--trainer-cfg.epochs", "4",
             "--optimizer-cfg.warmup-epochs", "0", "--optimizer-cfg.lr", "1e-3", "--trainer-cfg.accum-iter", "1",
             "--trainer-cfg.num-workers", "0", "--dataset-cfg.non-overlapping", "16"]
    cfg = parse_args(flags)
    start = build_model(cfg, torch.device("cpu")).state_dict()
    for k, v in torch.load(ck, weights_only=True)["model"].items(): assert torch.equal(start[k], v), k
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: train(cfg)
    finally: torch.set_num_threads(n)
    log = [json.loads(l) for l in (tmp_path / "ft" / "log.txt").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["train_loss"] < 0.8 * log[0]["train_loss"], log


def _variant(**policy):
    "The fixture's pretrain run.yaml with other policy values (as a published config dict)."
    d = read_published_yaml(FIX / "pretrain" / "run.yaml")
    d["model_cfg"]["policy_cfg"].update(policy)
    return d


@pytest.mark.parametrize("policy,cameras", [({"separate_camera_adapter": False}, 2), ({"separate_camera_adapter": False, "multikv_attn_pool": True}, 2),
                                            ({"multikv_attn_pool": True}, 2), ({"remove_proprio": True}, 2), ({}, 1),
                                            ({"camera_pos_emb": False, "modality_pos_emb": False}, 2)])
def test_published_variants_fit_exactly(tmp_path, policy, cameras):
    """Configurations beyond the fixture's: a published checkpoint of that layout (random tensors of the shapes the
    published code makes) fills this project's published-layout model exactly: every tensor used, every trainable filled."""
    from icrt.published import _map_strict, _strip, localise, project_model, published_config, published_shapes
    d = _variant(**policy); d["shared_cfg"]["num_cameras"] = cameras
    cfg, _ = published_config(d)
    cfg = localise(cfg, tmp_path / "run", vision_encoder=str(FIX / "vision_encoder.pth"),
                   scratch_llama_config=str(FIX / "tiny_transformer.json"), scale_action=str(FIX / "action_statistics.json"))
    import json
    shapes = published_shapes(_strip(d, "ExperimentConfig", "run.yaml"), 48, json.loads((FIX / "tiny_transformer.json").read_text()))
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model = project_model(cfg)
    mapped = _map_strict(model, sd, "variant")
    assert len(mapped) == len(sd) - (1 if "icrt_pos_emb_state" in sd else 0)


def test_unreproducible_value_refused():
    from icrt.published import published_config
    d = read_published_yaml(FIX / "pretrain" / "run.yaml")
    d["model_cfg"]["policy_cfg"]["decoder_pred_head"] = "gmm"
    with pytest.raises(PublishedError, match=r"decoder_pred_head: 'gmm' cannot be reproduced") as e: published_config(d, "x.yaml")
    _one_line(e)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_published_reference_matches_fixture(phase):
    """The published forward pass as written out here reproduces the published code's outputs (fp32, 1e-4): whole
    sequence teacher-forced, and its KV-cache path after the prompt (which orthonormalises the rot6d rows)."""
    import json
    from icrt.config import VisionEncoderConfig
    from icrt.models.vision import build_vision_encoder
    from icrt.published import CLASS_KEY, _gram_schmidt, _strip, published_reference
    io = torch.load(FIX / phase / "io.pt", weights_only=True)
    ck = read_published_checkpoint(FIX / phase / "checkpoint-3.pth")
    base = {k: v for k, v in read_published_checkpoint(FIX / "pretrain" / "checkpoint-3.pth")["model"].items() if k.startswith("llama.")}
    enc = build_vision_encoder(VisionEncoderConfig(vision_encoder=str(FIX / "vision_encoder.pth")))
    with torch.no_grad():
        net, act = published_reference({**base, **ck["model"]}, _strip(ck["args"], "ExperimentConfig", "args"),
                                       json.loads((FIX / "tiny_transformer.json").read_text()), enc(io["observation"]),
                                       io["proprio"], io["action"], json.loads((FIX / "action_statistics.json").read_text()))
    torch.testing.assert_close(net, io["teacher_forced_net"], atol=1e-4, rtol=0)
    torch.testing.assert_close(act, io["teacher_forced"], atol=1e-4, rtol=0)
    torch.testing.assert_close(_gram_schmidt(act[:, io["prompt_steps"]:]), io["cached"], atol=1e-4, rtol=0)


def test_missing_llama_folder_named(tmp_path):
    "The finetune run names /tmp/fixture/llama, which does not exist here: --llama-dir is asked for, nothing written."
    with pytest.raises(PublishedError, match=r"model_cfg\.policy_cfg\.llama_ckpt_dir '/tmp/fixture/llama' does not exist here: give .* --llama-dir") as e:
        import_published(FIX / "finetune" / "run.yaml", FIX / "finetune" / "checkpoint-3.pth", tmp_path / "out",
                         vision_encoder=str(FIX / "vision_encoder.pth"))
    _one_line(e)
    assert not (tmp_path / "out").exists()


def test_pretrain_on_a_llama_folder_keeps_it_frozen(tmp_path):
    """A published pretrain run on a Llama folder (not a scratch transformer) trains only icrt_*: its checkpoint holds
    no llama.* tensor, the import takes the transformer from --llama-dir and writes none of it (a 7B base stays out of
    the run's checkpoint), and the imported model trains what the published one trained."""
    import json
    from icrt.inference import ICRTPolicy
    from icrt.models.llama import load_meta_state_dict
    from icrt.published import _strip, published_shapes
    text = (FIX / "pretrain" / "run.yaml").read_text().replace("scratch_llama_config: /tmp/fixture/tiny_transformer.json",
                                                                 "scratch_llama_config: null").replace("load_llama: false", "load_llama: true")
    (tmp_path / "run.yaml").write_text(text)
    shapes = published_shapes(_strip(read_published_yaml(tmp_path / "run.yaml"), "ExperimentConfig", "run.yaml"), 48,
                              json.loads((FIX / "llama" / "params.json").read_text()))
    assert not any(k.startswith("llama.") for k in shapes)
    g = torch.Generator().manual_seed(0)
    torch.save({"model": {k: torch.randn(s, generator=g) for k, s in shapes.items()}, "epoch": 1}, tmp_path / "checkpoint-1.pth")
    rc = import_published_cli(["--run-yaml", str(tmp_path / "run.yaml"), "--checkpoint", str(tmp_path / "checkpoint-1.pth"),
                               "--out", str(tmp_path / "out"), "--vision-encoder", str(FIX / "vision_encoder.pth"),
                               "--llama-dir", str(FIX / "llama"), "--scale-action", str(FIX / "action_statistics.json")])
    assert rc == 0
    saved = torch.load(tmp_path / "out" / "checkpoint-1.pth", weights_only=True)["model"]
    assert not any(k.startswith("transformer.") for k in saved)
    model = ICRTPolicy.from_run(tmp_path / "out").model
    assert not any(p.requires_grad for p in model.transformer.parameters())
    base = load_meta_state_dict(FIX / "llama")
    for k, v in base.items(): assert torch.equal(model.transformer.state_dict()[k], v), k



# --- a run.yaml with a field missing (issue 28) ----------------------------------------------------------------------
def _yaml_without(phase:str, field:str, dest:Path)->Path:
    """The fixture's run.yaml of `phase` without `field` (a field name, or a top-level group such as `shared_cfg`,
    dropped with its whole block)."""
    lines, out, skip = (FIX / phase / "run.yaml").read_text().splitlines(keepends=True), [], False
    for l in lines:
        if skip and l.startswith(" "): continue
        skip = l.startswith(field + ":")
        if skip or l.strip().startswith(field + ":"): continue
        out.append(l)
    assert len(out) < len(lines), field
    dest.write_text("".join(out))
    return dest


def _flags(**kw): return {**{k[2:].replace("-", "_"): v for k, v in zip(FILES[::2], FILES[1::2])}, **kw}


@pytest.mark.parametrize("phase,field", [("pretrain", "adapter_num_heads"), ("pretrain", "camera_pos_emb"),
                                         ("finetune", "modality_pos_emb"), ("finetune", "lora_rank"),
                                         ("pretrain", "num_pred_steps"), ("finetune", "phase"),
                                         ("pretrain", "shared_cfg"), ("finetune", "shared_cfg")])
def test_missing_yaml_field_taken_from_checkpoint_args(tmp_path, phase, field, one_thread):
    """A run.yaml without a field that changes the model: the import takes it from the checkpoint's pickled `args`
    (and says so in imported.txt); the imported run gives the published numbers. Before: a KeyError traceback, or
    (adapter_num_heads) a silent default of 8 heads and outputs off by up to 1.14."""
    from icrt.inference import ICRTPolicy
    from icrt.published import imported_outputs
    y = _yaml_without(phase, field, tmp_path / "run.yaml")
    run = import_published(y, FIX / phase / "checkpoint-3.pth", tmp_path / "out", **_flags())
    io = torch.load(FIX / phase / "io.pt", weights_only=True)
    got = imported_outputs(ICRTPolicy.from_run(run).model, io)
    for k in ("teacher_forced_net", "teacher_forced", "cached"):
        torch.testing.assert_close(got[k], io[k], atol=1e-4, rtol=0, msg=lambda m: f"{field} {k}: {m}")
    notes = (run / "imported.txt").read_text()
    assert field in notes and "checkpoint's args" in notes, notes


def test_missing_scale_action_from_args_is_used(tmp_path):
    """scale_action missing from the run.yaml and no --scale-action: the checkpoint's args name the statistics file,
    which is then asked for by its flag. Before: the import succeeded with scaling silently off (outputs off by 0.87)."""
    y = _yaml_without("pretrain", "scale_action", tmp_path / "run.yaml")
    kw = {k: v for k, v in _flags().items() if k != "scale_action"}
    with pytest.raises(PublishedError, match=r"shared_cfg\.scale_action '/tmp/fixture/action_statistics\.json' does not exist here: "
                                             r"give the action statistics JSON with --scale-action") as e:
        import_published(y, FIX / "pretrain" / "checkpoint-3.pth", tmp_path / "out", **kw)
    _one_line(e)


@pytest.mark.parametrize("field", ["adapter_num_heads", "camera_pos_emb", "shared_cfg", "scale_action"])
def test_missing_yaml_field_without_args_refused(tmp_path, field):
    """The same without pickled `args` in the checkpoint: refused in one line naming the field; nothing written (a
    missing scale_action could also come from --scale-action)."""
    ck = read_published_checkpoint(FIX / "pretrain" / "checkpoint-3.pth")
    torch.save({"model": ck["model"], "epoch": 3}, tmp_path / "checkpoint-3.pth")
    y = _yaml_without("pretrain", field, tmp_path / "run.yaml")
    kw = {k: v for k, v in _flags().items() if k != field}   # --scale-action would give the statistics file
    with pytest.raises(PublishedError, match=rf"{field}.* missing .*no pickled args") as e:
        import_published(y, tmp_path / "checkpoint-3.pth", tmp_path / "out", **kw)
    _one_line(e)
    assert str(y) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_yaml_and_args_disagree_refused(tmp_path):
    "A run.yaml whose adapter_num_heads is not the checkpoint's args' (8 vs 4): the shapes agree, so only this catches it."
    (tmp_path / "run.yaml").write_text((FIX / "pretrain" / "run.yaml").read_text().replace("adapter_num_heads: 4", "adapter_num_heads: 8"))
    with pytest.raises(PublishedError, match=r"model_cfg\.policy_cfg\.adapter_num_heads: the run\.yaml says 8, the checkpoint's args 4") as e:
        import_published(tmp_path / "run.yaml", FIX / "pretrain" / "checkpoint-3.pth", tmp_path / "out", **_flags())
    _one_line(e)
    assert not (tmp_path / "out").exists()


# --- a run whose vision encoder trained with the policy (issue 27) ---------------------------------------------------
def _published_vit(sd:dict, lora:dict=None):
    """The published `VisionEncoder` of the fixture (timm ViT, img 32, patch 16, width 48, 2 blocks, 1 head; final norm
    replaced by nn.Identity) with tensors `sd`; `lora` {block: (A, B)} adds loralib's `x A^T B^T * (1 / r)` to qkv."""
    import torch.nn as nn
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=1).eval()
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("norm.") for k in missing), (missing, unexpected)
    vit.norm = nn.Identity()
    for i, (A, B) in (lora or {}).items():
        vit.blocks[i].attn.qkv.register_forward_hook(lambda m, inp, out, A=A, B=B: out + inp[0] @ A.T @ B.T / A.shape[0])
    return vit


def _trained_encoder_run(tmp_path:Path, mode:str, encoder:str="vit_icrt_fixture"):
    """The pretrain fixture as the published code saves it when its encoder trains too: run.yaml with the mode's flag,
    checkpoint = the fixture's tensors + the `vision_encoder.model.*` tensors its get_trainable_params keeps (moved by
    0.1 N(0, 1) from the fixture's frozen encoder): every tensor (all), blocks[-i] for i < n, i.e. block 0 for n = 1
    (last_n), or the loralib factors of every qkv and every bias (lora, rank 4). Returns (run.yaml, checkpoint, encoder)."""
    base = torch.load(FIX / "vision_encoder.pth", weights_only=True)
    g = torch.Generator().manual_seed(11)
    move = lambda v: v + 0.1 * torch.randn(v.shape, generator=g)
    flag = {"all": "vision_unfreeze_all: false", "last_n": "vision_unfreeze_last_n: 0", "lora": "vision_lora: false"}[mode]
    text = (FIX / "pretrain" / "run.yaml").read_text().replace(flag, flag.replace("false", "true").replace(": 0", ": 1"))
    text = text.replace("vision_lora_rank: 8", "vision_lora_rank: 4").replace("vision_encoder: vit_icrt_fixture", f"vision_encoder: {encoder}")
    (tmp_path / "run.yaml").write_text(text)
    lora = {}
    if mode == "all": trained = {k: move(v) for k, v in base.items()}
    elif mode == "last_n": trained = {k: move(v) for k, v in base.items() if k.startswith("blocks.0.")}
    else:
        trained = {k: move(v) for k, v in base.items() if k.endswith("bias")}
        for i in range(2):
            lora[i] = (0.3 * torch.randn(4, 48, generator=g), 0.3 * torch.randn(144, 4, generator=g))
            trained |= {f"blocks.{i}.attn.qkv.lora_A": lora[i][0], f"blocks.{i}.attn.qkv.lora_B": lora[i][1]}
    ck = read_published_checkpoint(FIX / "pretrain" / "checkpoint-3.pth")
    sd = {**ck["model"], **{f"vision_encoder.model.{k}": v for k, v in trained.items()}}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "checkpoint-3.pth")
    return tmp_path / "run.yaml", tmp_path / "checkpoint-3.pth", _published_vit({**base, **{k: v for k, v in trained.items() if "lora_" not in k}}, lora)


def _published_numbers(run_ck:Path, vit)->tuple:
    "(head output, unscaled chunks) of the published forward pass on the pretrain fixture's inputs with encoder `vit`."
    import json
    from icrt.published import _strip, published_reference
    io = torch.load(FIX / "pretrain" / "io.pt", weights_only=True)
    sd = torch.load(run_ck, weights_only=True)["model"]
    p = _strip(read_published_yaml(FIX / "pretrain" / "run.yaml"), "ExperimentConfig", "run.yaml")
    with torch.no_grad():
        feats = vit.forward_features(io["observation"].flatten(0, 2)).unflatten(0, io["observation"].shape[:3])
        return published_reference(sd, p, json.loads((FIX / "tiny_transformer.json").read_text()), feats, io["proprio"],
                                   io["action"], json.loads((FIX / "action_statistics.json").read_text()))


@pytest.mark.parametrize("mode", ["all", "last_n", "lora"])
def test_trained_vision_encoder_imported_exactly(tmp_path, mode, one_thread):
    """A published run whose encoder trained with the policy (--vision-unfreeze-all; the last n blocks; LoRA) imports,
    and the imported run computes the published numbers with the trained encoder (fp32, 1e-4). The untrained part of a
    partly trained encoder comes from --vision-encoder. Before: refused ("was randomly initialised and is not in the
    checkpoint"), or for LoRA "cannot be reproduced"."""
    from icrt.inference import ICRTPolicy
    from icrt.published import _gram_schmidt, imported_outputs
    y, ck, vit = _trained_encoder_run(tmp_path, mode)
    kw = _flags() if mode != "all" else {k: v for k, v in _flags().items() if k != "vision_encoder"}  # all: nothing else needed
    run = import_published(y, ck, tmp_path / "out", **kw)
    net, act = _published_numbers(ck, vit)
    io = torch.load(FIX / "pretrain" / "io.pt", weights_only=True)
    got = imported_outputs(ICRTPolicy.from_run(run).model, io)
    torch.testing.assert_close(got["teacher_forced_net"], net, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["teacher_forced"], act, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["cached"], _gram_schmidt(act[:, io["prompt_steps"]:]), atol=1e-4, rtol=0)
    assert (got["teacher_forced_net"] - io["teacher_forced_net"]).abs().max() > 1e-2  # the trained encoder matters


def test_local_encoder_file_with_nonpretrained_is_loaded(tmp_path, one_thread):
    """A run.yaml naming a local CrossMAE file together with vision_nonpretrained: the published code loads the file
    (timm.models.load_checkpoint after building), so the import uses it without --vision-encoder, exactly. Before:
    refused ("was randomly initialised and is not in the checkpoint")."""
    import shutil
    from icrt.inference import ICRTPolicy
    from icrt.published import imported_outputs
    enc = tmp_path / "cross-mae-rtx-vitb.pth"; shutil.copy(FIX / "vision_encoder.pth", enc)
    (tmp_path / "run.yaml").write_text((FIX / "pretrain" / "run.yaml").read_text().replace("vision_encoder: vit_icrt_fixture", f"vision_encoder: {enc}"))
    run = import_published(tmp_path / "run.yaml", FIX / "pretrain" / "checkpoint-3.pth", tmp_path / "out",
                           **{k: v for k, v in _flags().items() if k != "vision_encoder"})
    io = torch.load(FIX / "pretrain" / "io.pt", weights_only=True)
    got = imported_outputs(ICRTPolicy.from_run(run).model, io)
    for k in ("teacher_forced_net", "teacher_forced", "cached", "loss"):
        torch.testing.assert_close(got[k], io[k], atol=1e-4, rtol=0, msg=lambda m: f"{k}: {m}")


def test_partly_trained_random_encoder_refused(tmp_path):
    """The last block trained, the rest randomly initialised (vision_nonpretrained, a timm name) and in no file: refused in
    one line naming what is missing and --vision-encoder; nothing written."""
    y, ck, _ = _trained_encoder_run(tmp_path, "last_n")
    with pytest.raises(PublishedError, match=r"vision encoder only \(vision_unfreeze_last_n 1: 12 tensors.*randomly initialised.*--vision-encoder") as e:
        import_published(y, ck, tmp_path / "out", **{k: v for k, v in _flags().items() if k != "vision_encoder"})
    _one_line(e)
    assert not (tmp_path / "out").exists()


def test_encoder_tensors_of_a_frozen_encoder_refused(tmp_path):
    "A checkpoint with trained encoder tensors given with a run.yaml whose encoder is frozen: refused as another run's."
    y, ck, _ = _trained_encoder_run(tmp_path, "all")
    with pytest.raises(PublishedError, match=r"vision_encoder\.model\.[^ ]+' .*frozen.*same run\?") as e:
        import_published(FIX / "pretrain" / "run.yaml", ck, tmp_path / "out", **_flags())
    _one_line(e)
