"""The ``xnnq`` command line: ``demo``, ``quantize``, ``eval``, ``analyze`` (``xnnq <command> --help``).

``commands`` holds the parser and the commands, ``loading`` the model and data loading, ``steps`` the
steps the commands chain (PTQ, export, onnxruntime check, analysis); QAT is :func:`xnnq.recipes.qat_finetune`.
"""

from .commands import build_parser, main
from .errors import CliError

__all__ = ["main", "build_parser", "CliError"]
