"""Frechet Inception Distance between two image sources: ``python tools/fid.py ...`` is ``latentdiff fid ...``.

The code lives in latentdiff/cli/fid.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("fid"))
