"`icrt_compress` whose every shard takes at least ICRT_TEST_SHARD_S seconds more, so a test can interrupt it mid-run without racing it."
import os
import time

import icrt.data.compress as compress_module

_real = compress_module._write_shard


def _slow_shard(job):
    "The real shard writer, then a pause (the shard is finished and renamed before it)."
    out = _real(job)
    time.sleep(float(os.environ.get("ICRT_TEST_SHARD_S", "0.5")))
    return out


compress_module._write_shard = _slow_shard  # also in spawned workers, which import this module as __mp_main__

if __name__ == "__main__": compress_module.compress_cli()
