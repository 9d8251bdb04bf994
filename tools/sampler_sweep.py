"""FID and class accuracy per sampler and step count:
``python tools/sampler_sweep.py ...`` is ``latentdiff sampler-sweep ...``.

The code lives in latentdiff/cli/sampler_sweep.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("sampler-sweep"))
