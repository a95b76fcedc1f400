"""`icrt.train.main` for tests/test_multinode.py, run as `torchrun ... -m multinode_worker FLAGS` with tests/ on PYTHONPATH.

Two test hooks, both on the training sampler (the one that shuffles):
- ICRT_TEST_INDICES=FOLDER: each rank writes the indices it handed out in epoch E to FOLDER/rank<R>-epoch<E>.json;
- ICRT_TEST_KILL_AT=E:S: the worker SIGKILLs itself when epoch E asks for its sample S, on the first attempt only
  (TORCHELASTIC_RESTART_COUNT 0), as a crashed node would.
"""
import json
import os
import signal
from pathlib import Path

from icrt.data.dataset import DistributedSubEpochSampler
from icrt.train import main

_indices_of_epoch = DistributedSubEpochSampler.__iter__


def _kill_point():
    "(epoch, sample) at which to die, or None."
    at = os.environ.get("ICRT_TEST_KILL_AT")
    if not at or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0": return None
    e, s = at.split(":")
    return int(e), int(s)


def _recording_iter(self):
    "The sampler's own indices, handed out one by one and written down at the end of the epoch."
    idx = list(_indices_of_epoch(self))
    if not self.shuffle:  # the validation sampler
        yield from idx; return
    kill, seen = _kill_point(), []
    for i in idx:
        if kill == (self.epoch, len(seen)): os.kill(os.getpid(), signal.SIGKILL)
        seen.append(i); yield i
    folder = os.environ.get("ICRT_TEST_INDICES")
    if folder:
        rec = {"rank": self.rank, "epoch": self.epoch, "dataset_len": len(self.dataset), "indices": seen}
        (Path(folder) / f"rank{self.rank}-epoch{self.epoch}.json").write_text(json.dumps(rec))


DistributedSubEpochSampler.__iter__ = _recording_iter

if __name__ == "__main__": main()
