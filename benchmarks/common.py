"""Shared helpers for the benchmark scripts: JSON output and the RESULTS.md log."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def emit(name: str, result: dict, table_md: str) -> None:
    """Print ``result`` as JSON and append ``table_md`` under a dated heading to RESULTS.md."""
    result = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"), **result,
              "machine": machine()}
    print(json.dumps(result, indent=2))
    with RESULTS.open("a") as f:
        f.write(f"\n### {name} — {result['date']}\n\n{table_md.rstrip()}\n\n"
                f"<details><summary>JSON</summary>\n\n```json\n{json.dumps(result, indent=1)}\n```\n</details>\n")
