"""Pack images into webdataset shards: ``python tools/make_shards.py ...`` is ``latentdiff make-shards ...``.

The code lives in latentdiff/cli/make_shards.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("make-shards"))
