"Llama transformer: KV cache, Meta/HF checkpoints, LoRA phases, bad inputs (icrt.models.llama)."
import json

import pytest
from conftest import one_line_error
import torch

from icrt.config import ConfigError, PolicyConfig
from icrt.models.llama import (LORA_TARGETS, KVCache, LlamaArgs, Transformer, apply_lora, build_transformer, load_llama,
                               merge_lora, save_llama_checkpoint, set_trainable)

GQA = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)
MHA = LlamaArgs(dim=48, n_layers=3, n_heads=3, multiple_of=16)




@pytest.fixture(autouse=True)
def seed(): torch.manual_seed(0)


@pytest.mark.parametrize("args", [GQA, MHA], ids=["gqa", "mha"])
def test_incremental_equals_full_every_step(args):
    m = Transformer(args).eval()
    h = torch.randn(3, 30, args.dim)
    with torch.no_grad():
        full = m(h)
        cache = m.new_cache(batch=3, max_len=40)
        for t in range(30):  # one token at a time
            torch.testing.assert_close(m(h[:, t:t + 1], start_pos=t, cache=cache), full[:, t:t + 1], atol=1e-4, rtol=0)
        cache.reset()
        outs, pos = [], 0
        for n in (7, 1, 2, 11, 9):  # uneven blocks, appended with start_pos=None
            outs.append(m(h[:, pos:pos + n], start_pos=None, cache=cache)); pos += n
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=0)
        assert cache.length == 30


def test_cache_is_preallocated_and_reused():
    m = Transformer(GQA).eval()
    cache = m.new_cache(batch=2, max_len=16)
    assert cache.k.shape == (2, 2, 2, 16, 16) and cache.max_len == 16
    ptr = cache.k.data_ptr()
    with torch.no_grad():
        m(torch.randn(1, 10, 64), cache=cache)  # smaller batch than allocated is fine
        m(torch.randn(1, 6, 64), start_pos=10, cache=cache)
    assert cache.k.data_ptr() == ptr and cache.length == 16
    with pytest.raises(ValueError, match="do not fit a KV cache"): m(torch.randn(1, 1, 64), start_pos=16, cache=cache)
    with pytest.raises(ValueError, match="not allocated"): m(torch.randn(1, 1, 64), cache=KVCache(2, 2, 16))
    with pytest.raises(ValueError, match=r"expected inputs \(B, L, 64\)"): m(torch.randn(1, 3, 32))


def test_causal_and_trainable_forward():
    m = Transformer(MHA)
    h = torch.randn(2, 12, 48, requires_grad=True)
    out = m(h)
    out[:, 5].sum().backward()
    assert h.grad[:, 6:].abs().max() == 0 and h.grad[:, :6].abs().max() > 0
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_meta_checkpoint_shards_roundtrip(tmp_path, shards):
    src = Transformer(GQA).eval()
    save_llama_checkpoint(src, tmp_path, num_shards=shards)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == shards
    if shards == 2:  # Meta's model-parallel layout
        s = torch.load(tmp_path / "consolidated.00.pth")
        assert s["layers.0.attention.wq.weight"].shape == (32, 64) and s["layers.0.feed_forward.w2.weight"].shape == (64, s["layers.0.feed_forward.w1.weight"].shape[0])
    got = load_llama(tmp_path).eval()
    h = torch.randn(2, 9, 64)
    with torch.no_grad(): torch.testing.assert_close(got(h), src(h), atol=0, rtol=0)
    assert all(p.requires_grad for p in got.parameters())


def test_meta_bf16_with_embeddings_is_converted_and_ignored(tmp_path):
    src = Transformer(MHA)
    save_llama_checkpoint(src, tmp_path, num_shards=3)
    for i in range(3):  # add what a real release holds: bf16, token embedding, output layer, rope table
        f = tmp_path / f"consolidated.{i:02d}.pth"
        sd = {k: v.bfloat16() for k, v in torch.load(f).items()}
        sd.update({"tok_embeddings.weight": torch.zeros(10, 16), "output.weight": torch.zeros(4, 48), "rope.freqs": torch.zeros(8)})
        torch.save(sd, f)
    m = load_llama(tmp_path)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    torch.testing.assert_close(m.state_dict()["layers.2.feed_forward.w2.weight"], src.state_dict()["layers.2.feed_forward.w2.weight"].bfloat16().float())
    assert {p.dtype for p in load_llama(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def _hf_permute(w, n_heads):
    "What Hugging Face's Llama conversion script does to q/k rows (Meta pair layout -> half-split layout)."
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_to_hf_state_dict(sd, args):
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {"model.norm.weight": sd["norm.weight"]}
    for k, v in sd.items():
        if not k.startswith("layers."): continue
        _, i, *mid, _ = k.split(".")
        mid = ".".join(mid)
        if mid == "attention.wq": v = _hf_permute(v, args.n_heads)
        if mid == "attention.wk": v = _hf_permute(v, args.kv_heads)
        out[f"model.layers.{i}.{names[mid]}.weight"] = v
    return out


def test_meta_and_hf_from_same_weights_agree_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = Transformer(GQA).eval()
    with torch.no_grad():
        for p in src.parameters(): p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms and larger weights
    save_llama_checkpoint(src, tmp_path / "meta", num_shards=2)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=GQA.hidden_dim, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=16, rms_norm_eps=GQA.norm_eps, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(_meta_to_hf_state_dict(src.state_dict(), GQA), strict=False)
    assert not unexpected and set(missing) <= {"model.embed_tokens.weight", "lm_head.weight"}
    hf.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "hf_sharded").glob("*.safetensors"))) > 1
    meta_m, hf_m = load_llama(tmp_path / "meta").eval(), load_llama(tmp_path / "hf").eval()
    sharded = load_llama(tmp_path / "hf_sharded")
    for k, v in hf_m.state_dict().items(): assert torch.equal(sharded.state_dict()[k], v), k
    h = torch.randn(2, 17, 64)
    with torch.no_grad():
        ref = hf.model(inputs_embeds=h).last_hidden_state
        torch.testing.assert_close(hf_m(h), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(meta_m(h), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(meta_m(h), src(h), atol=0, rtol=0)
    assert hf_m.args.hidden_dim == GQA.hidden_dim and hf_m.args.kv_heads == 2


def test_load_llama_false_gives_random_weights_of_the_same_shape(tmp_path):
    src = Transformer(MHA)
    save_llama_checkpoint(src, tmp_path)
    m = build_transformer(PolicyConfig(llama_ckpt_dir=str(tmp_path), load_llama=False))
    assert m.args.dim == 48 and m.args.n_layers == 3
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in src.state_dict().items()}
    assert not torch.equal(m.layers[0].attention.wq.weight, src.layers[0].attention.wq.weight)


def test_build_from_scratch_config_names():
    for name in ("custom_transformer_tiny", "config/model_config/custom_transformer_tiny.json"):
        m = build_transformer(PolicyConfig(scratch_llama_config=name))
        assert (m.args.dim, m.args.n_layers, m.args.n_heads) == (64, 2, 4)
    with pytest.raises(ConfigError) as e: build_transformer(PolicyConfig(scratch_llama_config="no_such_transformer"))
    one_line_error(e, "scratch-llama-config")
    with pytest.raises(ConfigError) as e: build_transformer(PolicyConfig())
    one_line_error(e, "llama-ckpt-dir")


def test_bad_checkpoint_dirs(tmp_path):
    with pytest.raises(ConfigError) as e: load_llama(tmp_path / "missing")
    one_line_error(e, "no such folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e: load_llama(tmp_path / "empty")
    one_line_error(e, "params.json", "config.json")
    (tmp_path / "meta").mkdir(); (tmp_path / "meta/params.json").write_text(json.dumps(dict(dim=64, n_layers=2, n_heads=4)))
    with pytest.raises(ConfigError) as e: load_llama(tmp_path / "meta")
    one_line_error(e, "no weight files", "--model-cfg.policy-cfg.no-load-llama")
    assert load_llama(tmp_path / "meta", load_weights=False).args.dim == 64  # --no-load-llama: the config is enough
    (tmp_path / "hf").mkdir(); (tmp_path / "hf/config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)))
    with pytest.raises(ConfigError) as e: load_llama(tmp_path / "hf")
    one_line_error(e, "no weight files")
    (tmp_path / "p").mkdir(); (tmp_path / "p/params.json").write_text(json.dumps(dict(dim=64, n_heads=4)))
    with pytest.raises(ConfigError) as e: load_llama(tmp_path / "p")
    one_line_error(e, "missing key", "n_layers")


def test_checkpoint_that_does_not_match_its_params(tmp_path):
    save_llama_checkpoint(Transformer(MHA), tmp_path)
    p = json.loads((tmp_path / "params.json").read_text()); p["n_layers"] = 4
    (tmp_path / "params.json").write_text(json.dumps(p))
    with pytest.raises(ConfigError) as e: load_llama(tmp_path)
    one_line_error(e, "missing layers.3.")


def test_lora_phases_by_name():
    m = Transformer(MHA)
    all_names = {k for k, _ in m.named_parameters()}
    apply_lora(m, rank=2)
    assert all(p.requires_grad for k, p in m.named_parameters())  # apply_lora leaves trainability to set_trainable
    ft = set(set_trainable(m, "finetune"))
    lora = {f"layers.{i}.attention.{w}.lora_{ab}.default.weight" for i in range(3) for w in LORA_TARGETS for ab in "AB"}
    norms = {f"layers.{i}.{n}.weight" for i in range(3) for n in ("attention_norm", "ffn_norm")} | {"norm.weight"}
    assert ft == lora | norms
    assert {k for k, p in m.named_parameters() if p.requires_grad} == ft
    pt = set(set_trainable(m, "pretrain"))
    assert pt == {k for k, _ in m.named_parameters()} and len(pt) == len(all_names) + len(lora)
    assert m.layers[0].attention.wq.lora_A.default.weight.shape == (2, 48)
    with pytest.raises(ConfigError) as e: set_trainable(m, "both")
    one_line_error(e, "pretrain or finetune")


def test_lora_layer_subset_and_merge():
    m = Transformer(GQA).eval()
    h = torch.randn(1, 8, 64)
    with torch.no_grad(): base = m(h)
    apply_lora(m, rank=3, layer_idxs=[0])
    names = set(set_trainable(m, "finetune"))
    assert {k for k in names if "lora" in k} == {f"layers.0.attention.{w}.lora_{ab}.default.weight" for w in LORA_TARGETS for ab in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(m(h), base)  # B starts at zero
        for k, p in m.named_parameters():
            if "lora_B" in k: p.normal_(std=0.2)
        adapted = m(h)
        assert (adapted - base).abs().max() > 1e-3
        merge_lora(m)
        assert not any("lora" in k or "base_layer" in k for k in m.state_dict())
        torch.testing.assert_close(m(h), adapted, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError) as e: apply_lora(Transformer(GQA), 2, layer_idxs=[2])
    one_line_error(e, "lora-layer-idxs")
    with pytest.raises(ConfigError): apply_lora(Transformer(GQA), 0)


def test_lora_trains_only_adapters_in_finetune():
    m = Transformer(GQA)
    apply_lora(m, rank=2)
    set_trainable(m, "finetune")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad(); m(torch.randn(2, 6, 64)).pow(2).mean().backward(); opt.step()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or "norm" in k for k in changed)
