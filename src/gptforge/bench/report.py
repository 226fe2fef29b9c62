"""``python -m gptforge.bench.report NAME=FILE.json ...``: one table of `bench --single/--sweep` JSON files (the
sweep's winner), as scripts/gpu_check.sh prints it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptforge.bench.device import format_table


def row_of(name: str, path: str) -> dict:
    d = json.loads(Path(path).read_text())
    row = d.get("result") or d.get("best")
    if row is None:
        raise SystemExit(f"{path}: not a bench --single or --sweep result")
    return row | {"name": name}


def main(argv: list[str]) -> int:
    rows = [row_of(*(a.split("=", 1) if "=" in a else (Path(a).stem, a))) for a in argv]
    print(f"device: {rows[0].get('device') if rows else '-'}")
    print(format_table(rows))
    for r in rows:
        print(f"{r['name']}: {r['command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
