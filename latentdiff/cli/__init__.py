"""The ``latentdiff`` command: one subcommand per module of this package (``latentdiff txt2img`` is
:mod:`latentdiff.cli.txt2img`), each with ``build_parser(prog)`` and ``main(argv, prog) -> exit status``.

``latentdiff <command> ...``, ``python -m latentdiff <command> ...`` and, from a clone,
``python tools/<command>.py ...`` (underscores for dashes) run the same code. See :mod:`latentdiff.cli.main`.
"""
