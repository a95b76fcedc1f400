"""Several machines, simulated on this one: two torchrun "nodes" of one process each, joined by a c10d rendezvous on
loopback (127.0.0.1). Same weights as one process with the same effective batch, disjoint sampler shares that cover
each epoch, a restart from the last checkpoint after a node's worker is killed, refused ranks with different flags,
and the multi-node commands of icrt.launch. No GLOO_SOCKET_IFNAME is needed on loopback."""
import json
import os
import shlex
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import one_line_error
from icrt.config import ConfigError, parse_args
from icrt.data.dataset import DistributedSubEpochSampler
from icrt.launch import free_port, launch, torchrun_command
from icrt.tiny import recipe_flags, scale_down
from test_train import ENV, logs, run, weights

TESTS = Path(__file__).parent
# a fresh rendezvous store for every attempt, as icrt.launch sets it: restarts fail to connect without it (see 13_launch)
NODE_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}
# as test_ddp_matches_single_process: no random augmentation, so 2 x batch 1 and 1 x batch 2 see the same samples
COMMON = ["--dataset-cfg.no-vision-aug", "--dataset-cfg.proprio-noise", "0", "--trainer-cfg.accum-iter", "1",
          "--trainer-cfg.epochs", "2", "--shared-cfg.save-every", "1"]


def flags(assets, out, name, batch=1):
    return scale_down(recipe_flags("train"), assets, out, COMMON + ["--shared-cfg.batch-size", str(batch), "--logging-cfg.log-name", name])


def nodes(flag_lists, logs_dir, max_restarts=0, node_env=None, timeout=300):
    "Start one torchrun per flag list (a 'node' of one process) on one rendezvous; return each one's (exit status, output)."
    port, logs_dir = free_port(), Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, fl in enumerate(flag_lists):
        cmd = torchrun_command(fl, 1, module="multinode_worker", nnodes=len(flag_lists), rdzv_endpoint=f"127.0.0.1:{port}",
                               rdzv_id=f"test-{port}", max_restarts=max_restarts)
        with open(logs_dir / f"node{i}.log", "w") as f:
            env = {**NODE_ENV, **((node_env or {}).get(i, {}))}
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    try:
        for p in procs: p.wait(timeout=timeout)
    finally:  # a hung node: end its torchrun and its workers (one process group each)
        for p in procs:
            if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    return [(p.returncode, (logs_dir / f"node{i}.log").read_text()) for i, p in enumerate(procs)]


@pytest.fixture(scope="module")
def two_nodes(assets, tmp_path_factory):
    "An uninterrupted two-node run (batch 1 per rank, 2 epochs) with every rank's sampler indices recorded."
    tmp = tmp_path_factory.mktemp("two_nodes")
    (tmp / "indices").mkdir()
    fl = flags(assets, tmp / "runs", "two")
    out = nodes([fl, fl], tmp / "logs", node_env={i: {"ICRT_TEST_INDICES": str(tmp / "indices")} for i in (0, 1)})
    for rc, text in out: assert rc == 0, text[-3000:]
    return SimpleNamespace(tmp=tmp, run_dir=tmp / "runs" / "two", indices=tmp / "indices", flags=fl)


def test_two_nodes_match_one_process(assets, two_nodes, tmp_path):
    "2 nodes x batch 1 and 1 process x batch 2: the same per-epoch losses and final weights."
    run(flags(assets, tmp_path, "one", batch=2))
    a, b = logs(tmp_path / "one"), logs(two_nodes.run_dir)
    assert [x["epoch"] for x in b] == [0, 1]
    for x, y in zip(a, b):  # tolerance of test_ddp_matches_single_process: float32 reduction order differs
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=2e-3), (x, y)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=2e-3), (x, y)
    w1, w2 = weights(tmp_path / "one" / "checkpoint-1.pth"), weights(two_nodes.run_dir / "checkpoint-1.pth")
    assert w1.keys() == w2.keys()
    for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=2e-3, atol=1e-5, msg=k)


def test_ranks_split_each_epoch(two_nodes):
    "In every epoch the two ranks' indices are disjoint and together are the epoch, less the remainder num_samples drops."
    seed = parse_args(two_nodes.flags).shared_cfg.seed
    for epoch in (0, 1):
        recs = [json.loads((two_nodes.indices / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        a, b, n = recs[0]["indices"], recs[1]["indices"], recs[0]["dataset_len"]
        assert len(a) == len(b) == n // 2 and not set(a) & set(b), (a, b)
        whole = DistributedSubEpochSampler(range(n), 1, 0, 1, seed); whole.set_epoch(epoch)
        assert set(a) | set(b) == set(whole.indices()[:2 * (n // 2)]), (a, b)  # n odd here: one sample dropped
    assert n % 2 == 1


def test_killed_worker_restarts_from_last_checkpoint(assets, two_nodes, tmp_path):
    "--max-restarts 1: node 1's worker dies in epoch 1; both nodes restart, resume from checkpoint-0 and finish."
    fl = flags(assets, tmp_path / "runs", "two")  # the fixture's run, in another folder
    out = nodes([fl, fl], tmp_path / "logs", max_restarts=1, node_env={1: {"ICRT_TEST_KILL_AT": "1:3"}})
    for rc, text in out: assert rc == 0, text[-3000:]
    text = "".join(t for _, t in out)
    run_dir = tmp_path / "runs" / "two"
    assert "exitcode: -9" in text or "Signals.SIGKILL" in text, text[-3000:]  # the kill happened
    assert f"restart 1 by torchrun: resuming from {run_dir / 'checkpoint-0.pth'}" in text, text[-3000:]
    assert [x["epoch"] for x in logs(run_dir)] == [0, 1]
    a, b = weights(two_nodes.run_dir / "checkpoint-1.pth"), weights(run_dir / "checkpoint-1.pth")
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k  # resume is exact


def test_ranks_with_different_flags_are_refused(assets, tmp_path):
    "Node 1 has another batch size: every rank stops at start with one line naming the field; no run folder."
    out = nodes([flags(assets, tmp_path / "runs", "mismatch"), flags(assets, tmp_path / "runs", "mismatch", batch=4)], tmp_path / "logs")
    for rc, text in out:
        assert rc != 0, text[-3000:]
        errs = [l for l in text.splitlines() if l.startswith("icrt_train: error:")]
        assert len(errs) == 1, text[-3000:]
        for needle in ("rank 1's config", "differs from rank 0's", "shared_cfg.batch_size (--shared-cfg.batch-size) is",
                       "launch every node with the same flags"):
            assert needle in errs[0], errs[0]
        assert "Traceback" not in text.split("icrt_train: error:")[0], text[-3000:]  # no trainer traceback before it
    assert not (tmp_path / "runs").exists()


def test_launch_multinode_flags_and_bad_values(capsys, monkeypatch):
    fl = ["--dataset-cfg.dataset-json", "d.json"]
    cmd = torchrun_command(fl, 8, nnodes=2, rdzv_endpoint="node001:29500", rdzv_id="77", max_restarts=3)
    assert cmd[3:19] == ["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node001:29500",
                         "--rdzv-id", "77", "--max-restarts", "3", "-m", "icrt.train", *fl]
    assert torchrun_command(fl, 2, master_port=2450)[3:5] == ["--nproc_per_node=2", "--master_port=2450"]  # one node: as before
    static = torchrun_command(fl, 8, nnodes=2, node_rank=1, rdzv_backend="static", rdzv_endpoint="node001:29500")
    assert static[static.index("--node-rank") + 1] == "1"
    launch(fl, 8, dry_run=True, nnodes=2, rdzv_endpoint="node001:29500", rdzv_id="77")
    assert capsys.readouterr().out.startswith("$ torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node001:29500")
    one = torchrun_command(fl, 2, master_port=2450, max_restarts=1)  # one node, restartable: c10d on this machine
    assert one[3:13] == ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:2450",
                         "--max-restarts", "1"]
    seen = {}
    monkeypatch.setattr("icrt.launch.run_streaming", lambda cmd, env=None, cwd=None: seen.update(env) or 0)
    launch(fl, 1, max_restarts=1)
    assert seen["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    for kw, needles in [(dict(nnodes=0), ["nnodes must be >= 1, got 0"]),
                        (dict(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), ["node_rank 2 is not in [0, 2)"]),
                        (dict(nnodes=2, node_rank=-1, rdzv_endpoint="h:1"), ["node_rank -1"]),
                        (dict(nnodes=2, rdzv_endpoint="node001"), ["rdzv_endpoint 'node001' is not host:port"]),
                        (dict(nnodes=2, rdzv_endpoint="node001:port"), ["is not host:port"]),
                        (dict(max_restarts=-1), ["max_restarts must be >= 0, got -1"]),
                        (dict(nnodes=2, master_port=2450, rdzv_endpoint="h:1"), ["master_port 2450", "drop master_port"]),
                        (dict(nnodes=2), ["nnodes 2 needs rdzv_endpoint"]),
                        (dict(nnodes=2, rdzv_endpoint="h:1", rdzv_backend="etcd"), ["rdzv_backend 'etcd'"]),
                        (dict(nnodes=2, rdzv_endpoint="h:1", rdzv_backend="static"), ["needs node_rank"])]:
        with pytest.raises(ConfigError) as e: torchrun_command(fl, **kw)
        one_line_error(e, *needles)
        with pytest.raises(ConfigError) as e: launch(fl, dry_run=True, **kw)
        one_line_error(e, *needles)


def test_sbatch_example_runs_the_guides_finetune():
    "configs/slurm/multinode.sbatch: launch's multi-node flags, then the training guide's finetune command."
    text = (TESTS.parent / "configs" / "slurm" / "multinode.sbatch").read_text()
    words = shlex.split(text[text.index("\nsrun ") + 1:].replace("\\\n", " "), comments=True)
    sub = {"$SLURM_NNODES": "2", "$head_node:$port": "node001:29500", "$SLURM_JOB_ID": "4242"}
    words = [sub.get(w, w.replace("$OUTPUT", "/path/to/output_dir")) for w in words]
    start, train = words.index("torch.distributed.run") + 1, words.index("icrt.train") + 1
    assert words[start:train] == torchrun_command([], 8, nnodes=2, rdzv_endpoint="node001:29500", rdzv_id="4242", max_restarts=3)[3:]
    assert words[train:] == recipe_flags("finetune_icrt_mt")
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
