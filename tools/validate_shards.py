"""Check shards against their manifest: ``python tools/validate_shards.py ...`` is ``latentdiff validate-shards ...``.

The code lives in latentdiff/cli/validate_shards.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("validate-shards"))
