"""The CLI under torchrun, for tests/test_distributed.py; optionally one rank dies mid-profile.

``python -m torch.distributed.run --nproc-per-node 2 tests/dist_entry.py [--die-rank R] ARGS...``
runs ``moa-compress ARGS...``; with ``--die-rank R`` rank R exits abruptly (``os._exit``) when it
starts its second sample, as a killed process would.
"""

import os
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--die-rank"]:
        die_rank, args = int(args[1]), args[2:]
        if int(os.environ.get("RANK", "0")) == die_rank:
            from moa_compress import profile

            done = []
            original = profile._profile_one

            def profile_then_die(*a, **kw):
                if done:
                    os._exit(9)
                done.append(1)
                return original(*a, **kw)

            profile._profile_one = profile_then_die
    from moa_compress.cli import app

    sys.argv = ["moa-compress", *args]
    app()
