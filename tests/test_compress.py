"`icrt_compress` as a user runs it: in parallel, killed and resumed, interrupted, and training from its output."
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from icrt.config import parse_args
from icrt.data.compress import compress
from icrt.data.format import check_dataset, load_dataset_config, read_frames
from icrt.data.synthetic import make_synthetic_dataset
from icrt.tiny import recipe_flags, scale_down

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    "A raw synthetic dataset of 3 tasks x 8 episodes at 96x128."
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw"), num_tasks=3, episodes_per_task=8, height=96, width=128,
                                  min_len=30, max_len=40, progress=False)


def cli(*args, slow=False, **kw):
    "`icrt_compress ARGS` in its own process group; `slow`: every shard takes 0.5 s more (tests/slow_tool.py)."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = ["-m", "slow_tool", "compress"] if slow else ["-c", "from icrt.data.compress import compress_cli; compress_cli()"]
    # SIGINT back to its default: a job started in the background by a non-interactive shell (as CI may) inherits it ignored,
    # and Python then never raises KeyboardInterrupt
    return subprocess.Popen([sys.executable, *run, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def frames_of(cfg):
    "{(episode, key): encoded bytes of every frame} of a compressed dataset."
    spec, out = load_dataset_config(cfg), {}
    for path, names in zip(spec.dataset_path, spec.hdf5_keys):
        with h5py.File(path) as f:
            for e in names:
                for k in spec.image_keys: out[e, k] = [bytes(b) for b in f[e][k][()]]
    return out


def test_parallel_output_equals_serial(raw, tmp_path):
    one = compress(raw, tmp_path / "one", workers=1, shard_episodes=4, progress=False)
    two = compress(raw, tmp_path / "two", workers=2, shard_episodes=4, progress=False)
    assert (one["episodes"], two["episodes"], two["shards"]) == (24, 24, 6)
    assert frames_of(one["config"]) == frames_of(two["config"])    # JPEG encoding is deterministic, shards independent
    assert check_dataset(two["config"])[1] == []


def test_sigkill_then_resume_finishes(raw, tmp_path):
    out = tmp_path / "out"
    p = cli(raw, out, "--workers", "2", "--shard-episodes", "2", slow=True)
    part = out.with_name("out.partial")
    t0 = time.time()
    while not list(part.glob("part-*.hdf5")) and time.time() - t0 < 120: time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()                       # the CLI and its workers, mid-run
    done = sorted(x.name for x in part.glob("part-*.hdf5"))
    assert done and not out.exists(), "killed after the first shard: OUT must not exist yet"
    refused = cli(raw, out); _, err = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "pass --resume to finish it" in err and err.count("\n") == 1, err
    r = cli(raw, out, "--resume", "--workers", "2", "--shard-episodes", "2"); o, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert "kept from the interrupted run" in o and not part.exists()
    summary, problems = check_dataset(out / "dataset_config.json")
    assert problems == [] and summary["episodes"] == 24
    ref = compress(raw, tmp_path / "ref", shard_episodes=2, progress=False)
    assert frames_of(out / "dataset_config.json") == frames_of(ref["config"])


def test_ctrl_c_says_how_to_resume(raw, tmp_path):
    out = tmp_path / "out"
    p = cli(raw, out, "--workers", "1", "--shard-episodes", "1", slow=True)
    t0 = time.time()
    while not list(out.with_name("out.partial").glob("part-*.hdf5")) and time.time() - t0 < 120: time.sleep(0.05)
    p.send_signal(signal.SIGINT); _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "run again with --resume" in err, err
    r = cli(raw, out, "--resume", "--shard-episodes", "1"); _, err = r.communicate(timeout=300)
    assert r.returncode == 0 and check_dataset(out / "dataset_config.json")[1] == [], err


def test_bad_quality_and_self_overwrite_are_one_line(raw, tmp_path):
    for args, needle in [((raw, tmp_path / "q", "--quality", "101"), "JPEG quality 101 is outside 1-100"),
                         ((raw, Path(raw).parent), "output folder overlaps the input")]:
        p = cli(*args); _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_training_starts_from_a_compressed_dataset(assets, tmp_path, one_thread):
    "The tiny guide recipe trains one epoch on the compressed copy of the test assets (CPU loader path)."
    from icrt.train import train
    c = compress(assets.dataset_json, tmp_path / "jpeg", progress=False)
    flags = scale_down(recipe_flags("train"), replace(assets, dataset_json=Path(c["config"])), tmp_path / "runs",
                       ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "16", "--dataset-cfg.non-overlapping", "48"])
    run = train(parse_args(flags))
    assert (run / "checkpoint-0.pth").is_file()


def test_training_with_gpu_decode_runs_on_the_cpu(assets, tmp_path, one_thread):
    "--dataset-cfg.gpu-decode: the loader ships JPEG bytes and the trainer decodes them where the model runs (here the CPU)."
    from icrt.train import train
    c = compress(assets.dataset_json, tmp_path / "jpeg", progress=False)
    flags = scale_down(recipe_flags("train"), replace(assets, dataset_json=Path(c["config"])), tmp_path / "runs",
                       ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "16", "--dataset-cfg.non-overlapping", "48",
                        "--dataset-cfg.gpu-preprocess", "--dataset-cfg.gpu-decode", "--trainer-cfg.num-workers", "1"])
    run = train(parse_args(flags))
    assert (run / "checkpoint-0.pth").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tests/gpu/run_gpu_checks.sh)")
def test_cuda_decode_matches_cpu(raw, tmp_path):
    "nvJPEG on the GPU decodes the stored frames as libjpeg-turbo does, to within a few levels (IDCTs differ)."
    from icrt.config import DatasetConfig, SharedConfig
    from icrt.data.dataset import SequenceDataset
    from icrt.data.image import decode_jpeg_batch
    c = compress(raw, tmp_path / "jpeg", progress=False)
    ds = SequenceDataset(DatasetConfig(dataset_json=c["config"], gpu_preprocess=True, gpu_decode=True), SharedConfig(seq_length=16))
    b = ds.collate_fn([ds[0], ds[1]])
    hw = tuple(b["jpeg_hw"][0].tolist())
    cpu, gpu = (decode_jpeg_batch(b["jpeg"], b["jpeg_sizes"], hw, d) for d in ("cpu", "cuda"))
    assert gpu.shape == cpu.shape and (gpu.cpu().int() - cpu.int()).abs().float().mean() < 1.0


@pytest.mark.slow
def test_compressed_frames_learn_as_well(tmp_path):
    "The demo recipe on JPEG frames keeps its closed-loop success and in-context gap within the raw runs' spread (4 runs, ~30 min)."
    from icrt.bench.compress import bench_learning, learning_verdict
    v = learning_verdict(bench_learning(tmp_path, seeds=(0, 1), minutes=10.0))
    assert v["success"]["within"] and v["gap"]["within"], v
