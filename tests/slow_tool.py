"""`python -m slow_tool compress|convert ARGS`: `icrt_compress` or `icrt_convert` whose every shard takes at least
ICRT_TEST_SHARD_S seconds more, so a test can interrupt it mid-run without racing it."""
import os
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


# also in spawned workers, which import this module as __mp_main__ and so patch the same names
_write_shard_slow = compress_module._write_shard = _slowed(compress_module._write_shard)
_convert_shard_slow = convert_module._convert_shard = _slowed(convert_module._convert_shard)

if __name__ == "__main__":
    tool = sys.argv.pop(1)
    (compress_module.compress_cli if tool == "compress" else convert_module.convert_cli)()
