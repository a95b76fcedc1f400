"""`python -m slow_tool compress|convert ARGS`: `icrt_compress` or `icrt_convert` whose every shard takes at least
ICRT_TEST_SHARD_S seconds more (default 0.5), so a test can interrupt it mid-run without racing it.

Faults a test can ask for, by environment variable (so that the spawned workers get them too):
- `ICRT_TEST_KILL_AFTER=unlink:NAME` or `rename:NAME`: SIGKILL the process right after it removes (renames) a path
  called NAME, e.g. `unlink:state.json`: a kill at that exact point of a run.
- `ICRT_TEST_DISK=DIR:BYTES`: `shutil.disk_usage` of a path inside DIR reports a disk of BYTES bytes that holds what DIR
  holds: a full disk for a machine where a test cannot mount a small filesystem (nothing fails at the OS level)."""
import collections
import os
import signal
import shutil
import sys
import time

import icrt.data.compress as compress_module
import icrt.data.convert as convert_module


def _slowed(real):
    def slow(job):
        "The real shard writer, then a pause (the shard is finished and renamed before it)."
        out = real(job)
        time.sleep(float(os.environ.get("ICRT_TEST_SHARD_S", "0.5")))
        return out
    slow.__name__ = slow.__qualname__ = real.__name__ + "_slow"
    return slow


def _kill_after(op:str, real):
    "`real` (os.unlink, os.rename, ...), then SIGKILL when its first argument is called ICRT_TEST_KILL_AFTER's NAME."
    want = os.environ.get("ICRT_TEST_KILL_AFTER", "")
    def wrapped(path, *args, **kw):
        out = real(path, *args, **kw)
        if want == f"{op}:{os.path.basename(os.fsdecode(path))}": os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped


_Usage = collections.namedtuple("usage", "total used free")

def _fake_disk(real):
    "shutil.disk_usage, but a path inside ICRT_TEST_DISK's DIR is on a disk of BYTES bytes holding what DIR holds."
    root, size = os.environ["ICRT_TEST_DISK"].rsplit(":", 1); root, size = os.path.abspath(root), int(size)
    def usage(path):
        if not os.path.abspath(path).startswith(root): return real(path)
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
                   if os.path.isfile(os.path.join(d, f)))
        return _Usage(size, used, max(0, size - used))
    return usage


# also in spawned workers, which import this module as __mp_main__ and so patch the same names
_write_shard_slow = compress_module._write_shard = _slowed(compress_module._write_shard)
_convert_shard_slow = convert_module._convert_shard = _slowed(convert_module._convert_shard)
if os.environ.get("ICRT_TEST_KILL_AFTER"):
    for _op, _names in (("unlink", ("unlink", "remove")), ("rename", ("rename", "replace"))):
        for _n in _names: setattr(os, _n, _kill_after(_op, getattr(os, _n)))
if os.environ.get("ICRT_TEST_DISK"): shutil.disk_usage = _fake_disk(shutil.disk_usage)

if __name__ == "__main__":
    tool = sys.argv.pop(1)
    (compress_module.compress_cli if tool == "compress" else convert_module.convert_cli)()
