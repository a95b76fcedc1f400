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
    "A finetune checkpoint given with the pretrain run.yaml: the first key the pretrain model lacks is named."
    with pytest.raises(PublishedError, match=r"key 'llama\.layers\.0\.attention\.wq\.bias' does not exist .*same run\?") as e:
        import_published(FIX / "pretrain" / "run.yaml", FIX / "finetune" / "checkpoint-3.pth", tmp_path / "out",
                         **{k[2:].replace("-", "_"): v for k, v in zip(FILES[::2], FILES[1::2])})
    _one_line(e)
    assert not (tmp_path / "out").exists()


def test_missing_vision_encoder_named(tmp_path):
    "The fixture's encoder was random and not saved: the importer asks for --vision-encoder before any heavy work."
    with pytest.raises(PublishedError, match="give the vision encoder file with --vision-encoder"):
        import_published(FIX / "pretrain" / "run.yaml", FIX / "pretrain" / "checkpoint-3.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_fixture_stops_at_missing_model_options(tmp_path, phase, capsys):
    """Today this project's ICRT lacks the published tokeniser, pooling, head (and finetune LoRA/bias) variants: the
    import stops at the strict mapping, names them, and writes nothing. When the model options exist, this test
    becomes the exactness check against the fixture's outputs (io.pt, 1e-4 in fp32)."""
    rc = import_published_cli(["--run-yaml", str(FIX / phase / "run.yaml"), "--checkpoint", str(FIX / phase / "checkpoint-3.pth"),
                               "--out", str(tmp_path / "out"), *FILES])
    err = capsys.readouterr().err
    assert rc == 1 and "needs options for" in err and "published attention pooling" in err, err
    if phase == "finetune": assert "finetune layout" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


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
