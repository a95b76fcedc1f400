"Vision encoder: checkpoints by path alone, inferred architectures, trainability, offline errors (icrt.models.vision)."
import argparse
import time

import pytest
from conftest import one_line_error
import timm
import torch

from icrt.config import ConfigError, VisionEncoderConfig
from icrt.models.vision import build_vision_encoder, infer_vit_kwargs, read_vision_checkpoint, save_vision_encoder
from icrt.tiny import tiny_vit




@pytest.fixture(autouse=True)
def seed(): torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny(): return tiny_vit().eval()


def cfg(path, **kw): return VisionEncoderConfig(vision_encoder=str(path), **kw)


def trainable(enc): return {n for n, p in enc.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_self_describing_checkpoint_by_path_alone(tmp_path, tiny, suffix):
    f = save_vision_encoder(tiny, tmp_path / f"enc{suffix}")
    ck = read_vision_checkpoint(f)
    assert ck["arch"].startswith("vit_tiny_patch16_224") and ck["arch_kwargs"]["depth"] == 2
    enc = build_vision_encoder(cfg(f))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), tiny.forward_features(x))
    assert (enc.num_tokens, enc.embed_dim, enc.num_prefix_tokens) == (5, 192, 1)
    assert tuple(enc.data_config["input_size"]) == (3, 32, 32)
    assert enc.data_config["mean"] == tiny.pretrained_cfg["mean"]


def test_custom_heads_survive_only_in_self_describing_form(tmp_path):
    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=96, depth=3,
                          num_heads=2, reg_tokens=4, num_classes=0).eval()
    enc = build_vision_encoder(cfg(save_vision_encoder(m, tmp_path / "s.pth")))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(enc(x), m.forward_features(x))
    assert enc.num_tokens == 1 + 4 + 64 and enc.num_prefix_tokens == 5
    kw = infer_vit_kwargs(m.state_dict())
    assert (kw["img_size"], kw["patch_size"], kw["reg_tokens"], kw["depth"], kw["embed_dim"]) == ((64, 64), (8, 8), 4, 3, 96)


@pytest.mark.parametrize("wrap", ["plain", "model", "mae"])
def test_plain_state_dict_infers_architecture(tmp_path, wrap):
    m = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=48, embed_dim=128, depth=3, num_heads=2,
                          num_classes=0).eval()  # 128 wide -> 2 heads by the D/64 rule
    sd = m.state_dict()
    if wrap == "model": obj = {"model": sd, "epoch": 3}
    elif wrap == "mae":
        obj = {"model": {**{"module." + k: v for k, v in sd.items()}, "mask_token": torch.zeros(1, 1, 64),
                         "decoder_embed.weight": torch.zeros(64, 128), "decoder_blocks.0.attn.qkv.weight": torch.zeros(192, 64)},
               "args": argparse.Namespace(model="mae_vit_base_patch16", lr=1e-3)}
    else: obj = sd
    torch.save(obj, tmp_path / "plain.pth")
    enc = build_vision_encoder(cfg(tmp_path / "plain.pth"))
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(enc(x), m.forward_features(x))
    assert enc.num_tokens == 10 and enc.embed_dim == 128
    dc = enc.data_config  # no data config saved: ViT-B/16 MAE's normalisation, at the inferred size
    assert tuple(dc["input_size"]) == (3, 48, 48) and tuple(dc["mean"]) == (0.485, 0.456, 0.406) and dc["crop_pct"] == 0.9


def test_legacy_torch_format(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    enc = build_vision_encoder(cfg(tmp_path / "old.pth"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc(x), tiny.forward_features(x))


def test_bad_checkpoints(tmp_path, tiny):
    f = save_vision_encoder(tiny, tmp_path / "ok.pth")
    ck = torch.load(f)
    ck["model"] = {k: v for k, v in ck["model"].items() if not k.startswith("blocks.1.attn")}
    torch.save(ck, tmp_path / "missing.pth")
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg(tmp_path / "missing.pth"))
    one_line_error(e, "missing.pth", "does not match", "blocks.1.attn.qkv.weight")
    ck = torch.load(f); ck["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3); ck["model"]["extra.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "shape.pth")
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg(tmp_path / "shape.pth"))
    one_line_error(e, "shape mismatch", "unexpected extra.weight")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "cnn.pth")
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg(tmp_path / "cnn.pth"))
    one_line_error(e, "vit_base_patch16_224.mae", "missing")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg(tmp_path / "junk.pth"))
    one_line_error(e, "cannot read")
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg(tmp_path / "nope.safetensors"))
    one_line_error(e, "no such checkpoint file")
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg("vit_does_not_exist_224"))
    one_line_error(e, "neither a local checkpoint")


def test_missing_pretrained_weights_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t = time.time()
    with pytest.raises(ConfigError) as e: build_vision_encoder(VisionEncoderConfig(vision_encoder="vit_tiny_patch16_224.augreg_in21k"))
    assert time.time() - t < 10
    one_line_error(e, "vit_tiny_patch16_224.augreg_in21k", "--model-cfg.vision-encoder-cfg.vision-encoder",
                   "--model-cfg.vision-encoder-cfg.vision-nonpretrained")


def test_pretrained_weights_from_local_hub_cache(tmp_path, monkeypatch):
    "A cached pretrained file is used without the network (HF cache layout: refs/main -> snapshots/<rev>/file)."
    from safetensors.torch import save_file
    name = "vit_tiny_patch16_224.augreg_in21k"
    ref = timm.create_model(name, pretrained=False).eval()
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    (repo / "refs").mkdir(parents=True); (repo / "refs/main").write_text("abc123")
    (repo / "snapshots/abc123").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(repo / "snapshots/abc123/model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = build_vision_encoder(VisionEncoderConfig(vision_encoder=name))
    torch.testing.assert_close(enc.model.blocks[5].attn.qkv.weight, ref.blocks[5].attn.qkv.weight)
    assert enc.num_tokens == 197


def test_unfreeze_last_n_and_all(tmp_path, tiny):
    f = save_vision_encoder(tiny, tmp_path / "t.pth")
    enc = build_vision_encoder(cfg(f, vision_unfreeze_last_n=1))
    names = trainable(enc)
    assert names == {n for n, _ in enc.named_parameters() if n.startswith("model.blocks.1.")}
    enc.train(); assert enc.model.training
    out = enc(torch.randn(2, 3, 32, 32)); out.sum().backward()
    assert enc.model.blocks[1].mlp.fc2.weight.grad is not None and enc.model.blocks[0].mlp.fc2.weight.grad is None
    enc = build_vision_encoder(cfg(f, vision_unfreeze_all=True))
    assert trainable(enc) == {n for n, _ in enc.named_parameters()}
    with pytest.raises(ConfigError) as e: build_vision_encoder(cfg(f, vision_unfreeze_last_n=3))
    one_line_error(e, "vision-unfreeze-last-n", "only 2 blocks")


def test_lora(tmp_path, tiny):
    f = save_vision_encoder(tiny, tmp_path / "t.pth")
    enc = build_vision_encoder(cfg(f, vision_lora=True, vision_lora_rank=4))
    names = trainable(enc)
    lora = {n for n in names if "lora_" in n}
    assert lora == {f"model.blocks.{i}.attn.{m}.lora_{ab}.default.weight" for i in range(2) for m in ("qkv", "proj") for ab in "AB"}
    assert all(n.endswith(".bias") for n in names - lora) and "model.blocks.0.attn.qkv.base_layer.weight" not in names
    assert enc.model.blocks[0].attn.qkv.lora_A.default.weight.shape == (4, 192)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.eval()(x), tiny.forward_features(x))  # identity update at init
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n: p.normal_(std=0.05)
    adapted = enc(x)
    merged = build_vision_encoder(cfg(save_vision_encoder(enc, tmp_path / "merged.safetensors")))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(global_pool="avg", num_classes=7), dict(class_token=False, global_pool="avg", num_classes=0),
                                dict(init_values=0.1, qkv_bias=False, num_classes=0)], ids=["fc_norm+head", "no_cls", "layerscale"])
def test_inferred_variants(tmp_path, kw):
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, **kw).eval()
    torch.save(m.state_dict(), tmp_path / "v.pth")
    enc = build_vision_encoder(cfg(tmp_path / "v.pth"))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc(x), m.forward_features(x))
    assert enc.num_tokens == m.forward_features(x).shape[1]
