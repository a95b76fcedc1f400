"The training guide's commands parse with the meaning they state (the finetune command: in the notebook); -h lists every field; bad values fail."
import dataclasses
import subprocess
import sys
import typing

import pytest

from icrt.config import ConfigError, ExperimentConfig, load_config, parse_args
from icrt.tiny import recipe_flags

# the training guide's five commands, verbatim (the one copy lives in icrt.tiny)
PRETRAIN_1GPU, DDP, PRETRAIN_DROID, LLAMA = (recipe_flags(n) for n in ("train", "train_ddp", "pretrain_droid", "finetune_llama2_7b"))


def parse(flags): return parse_args(list(flags))


@pytest.mark.parametrize("flags", [PRETRAIN_1GPU, DDP], ids=["train", "train_ddp"])
def test_example_commands(flags):
    c = parse(flags)
    assert c.dataset_cfg.non_overlapping == 32 and type(c.dataset_cfg.non_overlapping) is int
    assert c.optimizer_cfg.warmup_epochs == 1.25 and c.trainer_cfg.epochs == 125
    assert c.shared_cfg.batch_size == 2
    assert c.trainer_cfg.accum_iter == (32 if flags is PRETRAIN_1GPU else 4)
    assert c.model_cfg.vision_encoder_cfg.vision_encoder == "/path/to/vision/encoder.pth"
    assert c.model_cfg.policy_cfg.scratch_llama_config == "config/model_config/custom_transformer.json"
    assert str(c.run_dir) == "/path/to/output_dir/log_name"


def test_pretrain_droid():
    c = parse(PRETRAIN_DROID)
    assert c.dataset_cfg.non_overlapping == 50 and c.optimizer_cfg.lr == 1e-3 and c.optimizer_cfg.warmup_epochs == 0.5
    assert c.trainer_cfg.epochs == 4 and c.shared_cfg.save_every == 1 and c.model_cfg.policy_cfg.phase == "pretrain"
    # what the command leaves out keeps the seed's defaults
    assert c.trainer_cfg.accum_iter == 8 and c.shared_cfg.batch_size == 1 and c.shared_cfg.seq_length == 512


def test_llama_finetune():
    c = parse(LLAMA)
    p = c.model_cfg.policy_cfg
    assert p.phase == "finetune" and p.lora_rank == 32 and p.llama_ckpt_dir == "/path/to/llama-2/llama-2-7b"
    assert p.scratch_llama_config is None and c.dataset_cfg.rebalance_tasks is True


def test_boolean_negation_and_union():
    c = parse_args(["--dataset-cfg.dataset-json", "d.json", "--dataset-cfg.no-vision-aug", "--dataset-cfg.non-overlapping",
                    "True", "--no-train"])
    assert c.dataset_cfg.vision_aug is False and c.dataset_cfg.non_overlapping is True and c.train is False


def _flags(cls, prefix=""):
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        name = prefix + f.name.replace("_", "-")
        if dataclasses.is_dataclass(t): yield from _flags(t, name + ".")
        else: yield "--" + name


def test_help_lists_every_field():
    out = subprocess.run([sys.executable, "-c", "from icrt.config import parse_args; parse_args()", "-h"],
                         capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0
    missing = [f for f in _flags(ExperimentConfig) if f not in out.stdout]
    assert not missing, missing


@pytest.mark.parametrize("flag,value,msg", [
    ("--trainer-cfg.epochs", "0", "--trainer-cfg.epochs"),
    ("--shared-cfg.batch-size", "-1", "--shared-cfg.batch-size"),
    ("--shared-cfg.num-pred-steps", "0", "--shared-cfg.num-pred-steps"),
    ("--optimizer-cfg.lr", "0", "--optimizer-cfg.lr"),
    ("--dataset-cfg.non-overlapping", "-3", "--dataset-cfg.non-overlapping"),
])
def test_impossible_values(flag, value, msg):
    with pytest.raises(ConfigError, match=msg): parse_args(["--dataset-cfg.dataset-json", "d.json", flag, value])


@pytest.mark.parametrize("flag,value", [("--model-cfg.policy-cfg.decoder-pred-head", "transformer"),
                                        ("--model-cfg.policy-cfg.phase", "warmup")])
def test_unknown_choice_rejected(flag, value):
    with pytest.raises(SystemExit): parse_args(["--dataset-cfg.dataset-json", "d.json", flag, value])


def test_yaml_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "run.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError): load_config(tmp_path / "run.yaml")
    assert not marker.exists()
