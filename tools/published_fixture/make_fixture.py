"""Make the published-format ICRT fixture (tests/fixtures/published) with the published code itself.

usage: PYTHONPATH=/path/to/loralib python tools/published_fixture/make_fixture.py PUBLISHED_CHECKOUT OUT_DIR

PUBLISHED_CHECKOUT is a checkout of github.com/Max-Fu/icrt (its `icrt/`, `config/` folders). This script is run by
hand, never by CI, and nothing of the published code is imported by this project's package. See README.md here.

For each phase (pretrain: scratch transformer + MLP head; finetune: a Meta-format Llama folder + LoRA and biases)
it builds the published ICRT with tiny random weights (fixed seeds), writes the run exactly as the published trainer
does (run.yaml = yaml.dump of the config object; checkpoint-<epoch>.pth = {model, optimizer, epoch, scaler, args}),
and records normalised inputs and the outputs the published code computes on them (io.pt).

Only four things are patched so the published code runs on a CPU with today's torch:
- `torch.set_default_tensor_type` is a no-op (its `torch.cuda.HalfTensor` call while building the transformer), so
  every weight is float32;
- `torch.Tensor.cuda` returns the tensor (the KV cache it allocates with `.cuda()` stays on the CPU);
- timm gets one registered tiny ViT name, `vit_icrt_fixture` (random weights, see VIT);
- TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, so its `misc.load_model` (a plain `torch.load`) reads the pretrain checkpoint
  this script has just written, as torch < 2.6 did.
Its `autocast('cuda', bfloat16)` is inactive without CUDA, so all numbers are fp32.
"""
import json, os, sys, types
from pathlib import Path

import torch
import yaml

TINY_LLAMA = {"dim": 48, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
B, T, P, N, K, S = 1, 8, 4, 2, 4, 32  # batch, steps, prompt steps, cameras, chunk length, image side
VIT = dict(img_size=S, patch_size=16, embed_dim=48, depth=2, num_heads=1)  # 1 head: what a state dict of width 48 implies here


def import_published(checkout:Path):
    "Import the published `icrt` package from `checkout` (it has no top-level __init__.py)."
    for k in [k for k in sys.modules if k == "icrt" or k.startswith("icrt.")]: del sys.modules[k]
    pkg = types.ModuleType("icrt"); pkg.__path__ = [str(checkout / "icrt")]; sys.modules["icrt"] = pkg
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer
    @register_model
    def vit_icrt_fixture(pretrained=False, **kw):
        kw.pop("pretrained_cfg", None); kw.pop("pretrained_cfg_overlay", None); kw.pop("cache_dir", None)
        return VisionTransformer(**{**VIT, **kw})
    torch.set_default_tensor_type = lambda *a, **k: None   # keep float32 on the CPU
    torch.Tensor.cuda = lambda self, *a, **k: self         # KV cache stays on the CPU
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # its misc.load_model predates torch's weights_only default
    import icrt.util.args as args_mod, icrt.util.misc as misc, icrt.util.model_constructor as mc
    from icrt.data import utils as data_utils
    return args_mod, misc, mc, data_utils


def make_args(A, out:Path, phase:str, llama_dir:Path):
    "The published ExperimentConfig of a tiny run."
    pol = A.PolicyConfig(llama_ckpt_dir=str(llama_dir), adapter_num_heads=4, camera_pos_emb=True, modality_pos_emb=True,
                         separate_camera_adapter=True, lora_rank=4, phase=phase, pred_action_only=True,
                         load_llama=phase == "finetune",
                         scratch_llama_config=str(out / "tiny_transformer.json") if phase == "pretrain" else None,
                         pretrained_path=str(out / "pretrain" / "checkpoint-3.pth") if phase == "finetune" else None)
    vis = A.VisionEncoderConfig(vision_encoder="vit_icrt_fixture", vision_nonpretrained=True)
    return A.ExperimentConfig(
        dataset_cfg=A.DatasetConfig(dataset_json="/data/icrt/dataset_config.json", task_names=("pour", "stack")),
        model_cfg=A.ModelConfig(policy_cfg=pol, vision_encoder_cfg=vis),
        optimizer_cfg=A.OptimizerConfig(), shared_cfg=A.SharedConfig(
            seq_length=16, num_cameras=N, num_pred_steps=K, use_delta_action=True, rot_6d=True,
            scale_action=str(out / "action_statistics.json")),
        logging_cfg=A.LoggingConfig(output_dir=str(out / phase)), trainer_cfg=A.TrainerConfig(epochs=4), device="cpu")


def write_side_files(out:Path, g:torch.Generator):
    "The scratch transformer JSON, action statistics, and a Meta-format Llama folder (random weights)."
    (out / "tiny_transformer.json").write_text(json.dumps(TINY_LLAMA))
    stats = {"mean": (torch.randn(10, generator=g) * 0.05).tolist(), "std": (0.5 + torch.rand(10, generator=g)).tolist()}
    stats["min"] = [m - 3 * s for m, s in zip(stats["mean"], stats["std"])]
    stats["max"] = [m + 3 * s for m, s in zip(stats["mean"], stats["std"])]
    (out / "action_statistics.json").write_text(json.dumps(stats))
    d = out / "llama"; d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(TINY_LLAMA))
    return d


def randomize(model, g:torch.Generator):
    "Move every tensor the published checkpoint saves away from its initial value (so biases and LoRA count)."
    with torch.no_grad():
        for k, v in model.state_dict().items(): v.add_(0.1 * torch.randn(v.shape, generator=g))


def inputs(g:torch.Generator, stats:dict, data_utils):
    "Normalised images, proprio (xyz + rot6d rows + gripper) and delta actions in model space."
    from scipy.spatial.transform import Rotation
    obs = torch.randn(B, T, N, 3, S, S, generator=g)
    rot = Rotation.from_rotvec((torch.randn(T, 3, generator=g) * 0.5).numpy()).as_matrix()[:, :2].reshape(T, 6)
    proprio = torch.cat([torch.randn(T, 3, generator=g) * 0.1, torch.tensor(rot, dtype=torch.float32),
                         torch.rand(T, 1, generator=g)], -1)[None]
    action = torch.randn(B, T, 10, generator=g) * torch.tensor(stats["std"]) + torch.tensor(stats["mean"])
    return obs, proprio, action


def teacher_forced(model, obs, proprio, action, data_utils):
    "Published tokenisers + transformer + head over the whole sequence: (B, T, K, 10) network and model space."
    with torch.no_grad():
        f_sa = model.preprocessing(obs, proprio, action)             # (B, 2T, dim)
        out = model.llama(f_sa).view(B, T, 2, -1)                      # (B, T, 2, dim)
        net = model.icrt_action_decoder.pred(out[:, :, 0].reshape(B * T, -1)).view(B, T, K, 10)
        stats = {k: v.clone() for k, v in model.scale_action.items()}
        return net, data_utils.unscale_action(net.clone(), stats)


def cached_steps(model, obs, proprio, action):
    "Published cached path: prompt() with P steps, then forward_inference step by step, teacher-forced actions."
    model.reset(1)
    model.prompt({"observation": obs[:, :P], "proprio": proprio[:, :P], "action": action[:, :P]})
    outs, pos = [], model.start_pos
    for t in range(P, T):
        if t == P: seq = {"observation": obs[:, t:t + 1], "proprio": proprio[:, t:t + 1]}
        else: seq = {"observation": obs[:, t - 1:t + 1], "proprio": proprio[:, t - 1:t + 1], "action": action[:, t - 1:t]}
        a, _ = model.forward_inference(seq, pos)                      # (B, K, 10) model space, rot6d rows orthonormal
        outs.append(a)
        if t > P: pos += 2
    return torch.stack(outs, 1)                                       # (B, T-P, K, 10)


def build_phase(A, misc, mc, data_utils, out:Path, phase:str, llama_dir:Path, seed:int):
    "Build, randomise, save and evaluate one phase's published model."
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    args = make_args(A, out, phase, llama_dir)
    run = Path(args.logging_cfg.output_dir); run.mkdir(parents=True, exist_ok=True)
    with open(run / "run.yaml", "w") as f: yaml.dump(args, f)        # as scripts/train.py does
    torch.manual_seed(0)                                               # the same (frozen) vision encoder in both phases
    model = mc.model_constructor(args.model_cfg, args.shared_cfg, train=True)
    if args.model_cfg.policy_cfg.pretrained_path is not None:          # as scripts/train.py does before training
        misc.load_model(model, args.model_cfg.policy_cfg.pretrained_path)
    randomize(model, g)
    opt = torch.optim.AdamW(misc.add_weight_decay(model, args.optimizer_cfg.weight_decay), lr=0.0, betas=(0.9, 0.95))
    scaler = misc.NativeScalerWithGradNormCount()
    obs, proprio, action = inputs(g, json.loads(Path(args.shared_cfg.scale_action).read_text()), data_utils)
    batch = {"observation": obs, "proprio": proprio[:, :, None].expand(B, T, K, 10).clone(),
             "action": torch.cat([action, torch.zeros(B, T, 1)], -1)[:, :, None].expand(B, T, K, 11).clone(),
             "prompt_mask": torch.ones(B, T), "weight_mask": torch.ones(B, T)}
    with torch.no_grad(): loss, _ = model(batch)                      # its training loss (backward: see README)
    for grp in opt.param_groups:
        for p in grp["params"]: p.grad = torch.zeros_like(p)
    opt.step()                                                         # lr 0, zero grads: optimizer state, same weights
    epoch = 3
    misc.save_model(args, epoch, model, model, opt, scaler)           # writes checkpoint-3.pth into output_dir
    vit = {k: v for k, v in model.vision_encoder.model.state_dict().items() if not k.startswith("norm.")}
    torch.save(vit, out / "vision_encoder.pth")                      # the frozen encoder, without its final norm
    model.eval()
    net, tf = teacher_forced(model, obs, proprio, action, data_utils)
    cached = cached_steps(model, obs, proprio, action)
    torch.save({"loss": loss.detach(), "observation": obs, "proprio": proprio, "action": action, "prompt_steps": P,
                "teacher_forced_net": net, "teacher_forced": tf, "cached": cached}, run / "io.pt")
    return model


def main(checkout:str, out_dir:str):
    checkout, out = Path(checkout).resolve(), Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    A, misc, mc, data_utils = import_published(checkout)
    g = torch.Generator().manual_seed(0)
    llama_dir = write_side_files(out, g)
    torch.manual_seed(1)
    from icrt.models.policy.llama import Transformer, ModelArgs
    base = Transformer(ModelArgs(max_seq_len=32, max_batch_size=1, w_bias=False, w_lora=False, **TINY_LLAMA))
    with torch.no_grad():
        for v in base.state_dict().values(): v.normal_(0.0, 0.1) if v.ndim > 1 else v.fill_(1.0)
    torch.save(base.state_dict(), llama_dir / "consolidated.00.pth")
    build_phase(A, misc, mc, data_utils, out, "pretrain", llama_dir, seed=2)
    build_phase(A, misc, mc, data_utils, out, "finetune", llama_dir, seed=3)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) != 3: sys.exit(__doc__.splitlines()[2])
    main(*sys.argv[1:])
