"Shared pytest setup: the `slow` marker, tiny assets and a tiny trained run shared by the test files."
import contextlib
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from icrt.config import parse_args
from icrt.tiny import make_tiny_assets, recipe_flags, scale_down

# a one-epoch run on 16-step windows: enough to exercise every inference/eval path in seconds
FAST = ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "16", "--dataset-cfg.non-overlapping", "48"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (set ICRT_SLOW=1 to run)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ICRT_SLOW") == "1": return
    skip = pytest.mark.skip(reason="slow: set ICRT_SLOW=1 to run")
    for it in items:
        if "slow" in it.keywords: it.add_marker(skip)


def one_line_error(exc_info, *needles):
    "Assert an exception's message is one line containing every needle."
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles: assert n in msg, msg


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models run much faster on one thread of a shared 2-core machine."
    n = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(n)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    "Synthetic dataset (3 tasks x 5 episodes), tiny vision checkpoint and tiny Meta-format Llama."
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), num_tasks=3, episodes_per_task=5)


@pytest.fixture(scope="session")
def run_dir(assets, tmp_path_factory):
    "A tiny trained run folder (run.yaml, splits, checkpoint-0.pth)."
    from icrt.train import train
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: return train(parse_args(scale_down(recipe_flags("train"), assets, tmp_path_factory.mktemp("runs"), FAST)))
    finally: torch.set_num_threads(n)


@contextlib.contextmanager
def serve_process(run_dir, folder, *args):
    "`icrt_serve RUN_DIR ARGS` on a free loopback port (one torch thread), up and answering /healthz; yields (port, log path)."
    from icrt.launch import free_port
    port, log_path = free_port(), folder / "log.txt"
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "icrt.serve", str(run_dir), "--port", str(port), "--device", "cpu",
                              "--threads", "1", *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for _ in range(600):
                try: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1); break
                except OSError:
                    if p.poll() is not None: break
                    time.sleep(0.2)
            else: pytest.fail("icrt_serve did not come up")
            if p.poll() is not None: pytest.fail(f"icrt_serve exited: {log_path.read_text()[-2000:]}")
            yield port, log_path
        finally: p.terminate(); p.wait(20)
