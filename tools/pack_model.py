"""Pack a trained model file for shipping: ``python tools/pack_model.py ...`` is ``latentdiff pack-model ...``.

The code lives in latentdiff/cli/pack_model.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("pack-model"))
