"""Shared helpers for the benchmark scripts: JSON output, and the RESULTS.md log when asked (``--record``).

Run the scripts from the repository root with the package installed (``pip install -e .``); the data
comes from :func:`xnnq.data.data_root` (``$XNNQ_DATA``, default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict[str, Any]:
    """torch version, threads, CPU count and Python version of this run."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def add_record_arg(ap: argparse.ArgumentParser) -> None:
    """``--record``: append the result to benchmarks/RESULTS.md (without it the script prints JSON only)."""
    ap.add_argument(
        "--record",
        action="store_true",
        help="append the table and the JSON to benchmarks/RESULTS.md (default: print the JSON only)",
    )


def emit(name: str, result: dict[str, Any], table_md: str, *, record: bool) -> dict[str, Any]:
    """Print ``result`` (with date and machine) as JSON; with ``record`` also append ``table_md`` and the
    JSON under a dated heading to RESULTS.md. Returns the printed dict."""
    result = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **result,
        "machine": machine(),
    }
    print(json.dumps(result, indent=2, default=str))
    if record:
        with RESULTS.open("a") as f:
            f.write(
                f"\n### {name} — {result['date']}\n\n{table_md.rstrip()}\n\n"
                f"<details><summary>JSON</summary>\n\n```json\n"
                f"{json.dumps(result, indent=1, default=str)}\n```\n"
                "</details>\n"
            )
    return result
