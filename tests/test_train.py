"End-to-end training: the guide's five commands scaled down, torchrun DDP parity, exact resume after SIGKILL, bad inputs and faults."
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import FAST
from icrt.config import parse_args
from icrt.launch import free_port
from icrt.tiny import recipe_flags, scale_down

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(flags, nproc=0, check=True, **kw):
    "python -m icrt.train (nproc=0), or torchrun with nproc processes."
    cmd = [sys.executable, "-m", "icrt.train"] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m", "icrt.train"]
    p = subprocess.run(cmd + [str(f) for f in flags], capture_output=True, text=True, env=ENV, **kw)
    if check: assert p.returncode == 0, p.stderr[-3000:]
    return p


def logs(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "log.txt").read_text().splitlines()]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_guide_commands_end_to_end(assets, tmp_path):
    out = tmp_path / "runs"
    # 1-2: the single-GPU command, and the DDP one under torchrun (2 CPU processes instead of 8 GPUs)
    run(scale_down(recipe_flags("train"), assets, out))
    run(scale_down(recipe_flags("train_ddp"), assets, out, ["--logging-cfg.log-name", "ddp"]), nproc=2)
    assert len(logs(out / "log_name")) == 2 and len(logs(out / "ddp")) == 2
    # 3: pre-training keeps its 4 epochs and save-every 1, so checkpoint-3.pth exists as the finetune command expects
    run(scale_down(recipe_flags("pretrain_droid"), assets, out, ["--trainer-cfg.epochs", "4"]))
    assert (out / "pretrain_droid" / "checkpoint-3.pth").is_file()
    # 4: finetune from it (weights only: it starts at epoch 0 with the pre-trained weights)
    p = run(scale_down(recipe_flags("finetune_icrt_mt"), assets, out))
    assert "loaded" in p.stderr and "checkpoint-3.pth" in p.stderr
    pre, ft0 = weights(out / "pretrain_droid" / "checkpoint-3.pth"), logs(out / "finetune_icrt_mt")[0]
    scratch0 = logs(out / "log_name")[0]
    assert ft0["train_loss"] < scratch0["train_loss"], "finetuning must start from the pre-trained weights"
    # 5: LoRA finetune of a (tiny) Meta-format Llama: only LoRA, biases, norms, adapters and heads are saved
    run(scale_down(recipe_flags("finetune_llama2_7b"), assets, out))
    sd = weights(out / "finetune_icrt_llama2_7b" / "checkpoint-1.pth")
    tf = [k for k in sd if ".layers." in k or k.startswith("transformer.")]
    assert tf and all("lora_" in k or "norm" in k or k.endswith(".bias") for k in tf), tf[:5]
    assert any("lora_" in k for k in tf)
    assert set(pre) - set(sd), "the LoRA checkpoint must not hold the frozen transformer weights"


def test_ddp_matches_single_process(assets, tmp_path):
    "2 processes x batch 1 see the same pairs of samples as 1 process x batch 2: same per-epoch losses."
    common = ["--dataset-cfg.no-vision-aug", "--dataset-cfg.proprio-noise", "0", "--trainer-cfg.accum-iter", "1",
              "--trainer-cfg.epochs", "2"]
    one = scale_down(recipe_flags("train"), assets, tmp_path, common + ["--shared-cfg.batch-size", "2", "--logging-cfg.log-name", "one"])
    two = scale_down(recipe_flags("train"), assets, tmp_path, common + ["--shared-cfg.batch-size", "1", "--logging-cfg.log-name", "two"])
    run(one); run(two, nproc=2)
    a, b = logs(tmp_path / "one"), logs(tmp_path / "two")
    for x, y in zip(a, b):  # tolerance: float32 reduction order differs between one batch of 2 and an all-reduce of 2
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=2e-3), (x, y)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=2e-3), (x, y)


def test_sigkill_and_resume_gives_same_weights(assets, tmp_path):
    flags = lambda name, extra=(): scale_down(recipe_flags("train"), assets, tmp_path,
                                              ["--trainer-cfg.epochs", "3", "--shared-cfg.save-every", "1",
                                               "--logging-cfg.log-name", name, *extra])
    run(flags("straight"))
    cmd = [sys.executable, "-m", "icrt.train", *map(str, flags("killed"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    first = tmp_path / "killed" / "checkpoint-0.pth"
    t0 = time.time()
    while not first.exists() and proc.poll() is None and time.time() - t0 < 300: time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (tmp_path / "killed" / "checkpoint-2.pth").exists()
    last = max((tmp_path / "killed").glob("checkpoint-*.pth"), key=lambda p: int(p.stem.split("-")[1]))
    run(flags("killed", ["--shared-cfg.resume", str(last)]))
    a, b = weights(tmp_path / "straight" / "checkpoint-2.pth"), weights(tmp_path / "killed" / "checkpoint-2.pth")
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


def _error(p, *needles):
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("icrt_train: error:"), p.stderr[-2000:]
    for n in needles: assert n in line, line


def test_bad_inputs(assets, tmp_path):
    base = lambda *extra: scale_down(recipe_flags("train"), assets, tmp_path / "runs", list(extra))
    _error(run(base("--dataset-cfg.dataset-json", str(tmp_path / "nope.json")), check=False), "--dataset-cfg.dataset-json", "nope.json")
    _error(run(base("--model-cfg.policy-cfg.pretrained-path", str(tmp_path / "ck.pth")), check=False), "--model-cfg.policy-cfg.pretrained-path")
    empty = tmp_path / "llama-empty"; empty.mkdir()
    (empty / "params.json").write_text((assets.llama_dir / "params.json").read_text())
    _error(run(scale_down(recipe_flags("finetune_llama2_7b"), assets, tmp_path / "runs",
                          ["--model-cfg.policy-cfg.llama-ckpt-dir", str(empty)]), check=False), "no weight files")
    afile = tmp_path / "a_file"; afile.write_text("keep me")
    _error(run(base("--logging-cfg.output-dir", str(afile)), check=False), "is a file")
    assert afile.read_text() == "keep me"
    if importlib.util.find_spec("wandb") is None:  # asked-for W&B logging without the package: a clear message
        _error(run(base("--logging-cfg.wandb-project", "icrt"), check=False), "pip install wandb")


def test_non_finite_loss_stops_and_keeps_checkpoints(assets, tmp_path):
    flags = scale_down(recipe_flags("train"), assets, tmp_path, ["--trainer-cfg.epochs", "1", "--logging-cfg.log-name", "r"])
    run(flags)
    before = (tmp_path / "r" / "checkpoint-0.pth").read_bytes()
    # poison every action of a copy of the data with NaN, then continue the run on it
    data = tmp_path / "poisoned"; data.mkdir()
    src = assets.dataset_json.parent
    for f in src.iterdir(): (data / f.name).write_bytes(f.read_bytes())
    with h5py.File(data / "synthetic.hdf5", "a") as h:
        for ep in h: h[ep]["action/cartesian_position"][...] = np.nan
    p = run(flags + ["--dataset-cfg.dataset-json", str(data / "dataset_config.json"), "--trainer-cfg.epochs", "2",
                     "--shared-cfg.resume", str(tmp_path / "r" / "checkpoint-0.pth")], check=False)
    _error(p, "non-finite loss")
    assert (tmp_path / "r" / "checkpoint-0.pth").read_bytes() == before
    assert not (tmp_path / "r" / "checkpoint-1.pth").exists()


def test_help_lists_flags():
    p = subprocess.run([sys.executable, "-m", "icrt.train", "-h"], capture_output=True, text=True, env={**ENV, "COLUMNS": "200"})
    assert p.returncode == 0 and "--model-cfg.policy-cfg.scratch-llama-config" in p.stdout


def _tree(folder):
    "Every file under `folder` with its bytes: to check that a refused run changed nothing."
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _main_error(flags, capsys):
    "Run icrt.train.main in this process; return its one error line (exit status 1, no traceback)."
    from icrt.train import main
    with pytest.raises(SystemExit) as e: main([str(f) for f in flags])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("icrt_train: error:"), err[-2000:]
    return line


def test_checkpoint_that_does_not_fit_is_one_line(assets, run_dir, tmp_path):
    "Another head size (num-pred-steps 8): refused as pretrained weights and as a resume, nothing written."
    ck, data = run_dir / "checkpoint-0.pth", _tree(assets.dataset_json.parent)
    before = ck.read_bytes()
    for flag, name in [("--model-cfg.policy-cfg.pretrained-path", "ft"), ("--shared-cfg.resume", "re")]:
        p = run(scale_down(recipe_flags("train"), assets, tmp_path, FAST + [
            "--shared-cfg.num-pred-steps", "8", "--trainer-cfg.epochs", "3", flag, str(ck), "--logging-cfg.log-name", name]), check=False)
        _error(p, flag, str(ck), "does not fit")
        assert not (tmp_path / name).exists(), "a refused run leaves no run folder"
    assert ck.read_bytes() == before and _tree(assets.dataset_json.parent) == data


def test_num_cameras_must_match_the_dataset(assets, tmp_path):
    data = _tree(assets.dataset_json.parent)
    for n in ("3", "1"):
        p = run(scale_down(recipe_flags("train"), assets, tmp_path / "runs", ["--shared-cfg.num-cameras", n]), check=False)
        _error(p, f"--shared-cfg.num-cameras {n}", "has 2 camera(s)", "--shared-cfg.num-cameras 2")
    assert not (tmp_path / "runs").exists() and _tree(assets.dataset_json.parent) == data


def test_resume_with_nothing_left_to_train_is_refused(assets, run_dir, tmp_path):
    ck = run_dir / "checkpoint-0.pth"; before = _tree(run_dir)  # the run ended at epoch 0 of 1
    p = run(scale_down(recipe_flags("train"), assets, tmp_path, FAST + ["--shared-cfg.resume", str(ck)]), check=False)
    _error(p, "--shared-cfg.resume", "ends at epoch 0", "nothing to train", "--trainer-cfg.epochs 2")
    assert _tree(run_dir) == before and not (tmp_path / "log_name").exists()


def test_read_only_output_folder_is_one_line(assets, run_dir, tmp_path, capsys, monkeypatch, one_thread):
    "A new run in a read-only folder, and a resume into a read-only run folder."
    ro = tmp_path / "ro"; shutil.copytree(run_dir, ro / "old")
    before = _tree(ro)
    if os.geteuid() == 0:  # root may write anywhere: make the folder read-only for the trainer's check
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p).startswith(str(ro)) else real(p, mode, *a, **k))
    for p in (ro / "old", ro): p.chmod(0o555)
    try:
        base = lambda *extra: scale_down(recipe_flags("train"), assets, ro, FAST + list(extra))
        assert "cannot write to" in _main_error(base("--logging-cfg.log-name", "new"), capsys)
        line = _main_error(base("--logging-cfg.log-name", "old", "--trainer-cfg.epochs", "2",
                                "--shared-cfg.resume", str(ro / "old" / "checkpoint-0.pth")), capsys)
        assert "cannot write to" in line and str(ro / "old") in line, line
    finally:
        for p in (ro, ro / "old"): p.chmod(0o755)
    assert _tree(ro) == before


def test_disk_full_while_saving_stops_cleanly(assets, tmp_path, capsys, monkeypatch, one_thread):
    "The second checkpoint's write fails: one line, the first checkpoint untouched, no temporary file left."
    save, seen = torch.save, {}
    def full_after_first(obj, f, *a, **k):
        if "first" in seen:
            seen["bytes"] = (tmp_path / "log_name" / "checkpoint-0.pth").read_bytes()
            raise OSError(28, "No space left on device")
        seen["first"] = True; return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_first)
    line = _main_error(scale_down(recipe_flags("train"), assets, tmp_path, FAST + ["--trainer-cfg.epochs", "2",
                                                                                   "--shared-cfg.save-every", "1"]), capsys)
    assert "no space left on device for checkpoint" in line and "checkpoint-1.pth" in line, line
    out = tmp_path / "log_name"
    assert (out / "checkpoint-0.pth").read_bytes() == seen["bytes"]
    assert not (out / "checkpoint-1.pth").exists() and not list(out.glob(".checkpoint-*"))


def test_stale_temporaries_are_removed_at_start(assets, run_dir, tmp_path, one_thread):
    "What a SIGKILL during a checkpoint write leaves is cleaned when the run is continued."
    from icrt.train import train
    old = tmp_path / "old"; shutil.copytree(run_dir, old)
    (old / ".checkpoint-1.pth.tmp4242").write_bytes(b"")
    before = (old / "checkpoint-0.pth").read_bytes()
    train(parse_args(scale_down(recipe_flags("train"), assets, tmp_path, FAST + [
        "--logging-cfg.log-name", "old", "--trainer-cfg.epochs", "2", "--shared-cfg.resume", str(old / "checkpoint-0.pth"),
        "--no-train"])))
    assert not (old / ".checkpoint-1.pth.tmp4242").exists() and (old / "checkpoint-0.pth").read_bytes() == before
