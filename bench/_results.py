"""Where a benchmark's figures go: one JSON file in bench/results/ per run, named by what it
measured and the day, beside the command and the machine each script records in it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(result: dict, stem: str, out: Path | None = None) -> Path:
    """Write `result` to `out`, by default bench/results/<stem>-<today>.json; says where."""
    path = Path(out) if out is not None else RESULTS / f"{stem}-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return path
