"""Rewrite the bundled manifests' provenance without the training machine's absolute paths (issue 14).

The bundles were written before manifests recorded paths with :func:`bdlens.configs.portable_path`:
their ``config_file``, ``data_path``, ``backbone_checkpoint``, … hold absolute paths of the machine
that trained them. This rewrites, in every ``bdlens/assets/models/*/{manifest,calibration}.json`` and
in ``evaluation/results/*.json``, each string under ``--training-repo`` as a path relative to the
repository and each string under ``--training-cache`` as ``$BDLENS_CACHE_DIR/…``, as portable_path
writes them now. It also drops the spurious ``level`` dimension that ``evaluation/deterministic_skill.py``
gave the MSLP persistence and climatology rows (one identical value per level, checked), so the stored
tables read as the fixed script writes them. Idempotent; nothing else changes.

    python scripts/portable_provenance.py --training-repo /work/main --training-cache /root/.cache/bdlens
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bdlens.configs import CACHE, REPOSITORY


def portable(value: Any, repo: str, cache: str) -> Any:
    """``value`` (any JSON) with every string under ``repo`` or ``cache`` made relative."""
    if isinstance(value, dict):
        return {k: portable(v, repo, cache) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, repo, cache) for v in value]
    if isinstance(value, str):
        for root, prefix in ((cache, CACHE + "/"), (repo, "")):
            if value.startswith(root + "/"):
                return prefix + value.removeprefix(root + "/")
    return value


def without_level(rows: list) -> list:
    """Per-lead values from per-lead rows that repeat one value over levels (a scalar field broadcast to levels)."""
    if not rows or not isinstance(rows[0], list):
        return rows
    if any(len(set(row)) != 1 for row in rows):
        raise SystemExit("an MSLP row differs between levels: it is not a broadcast scalar field; not rewriting")
    return [row[0] for row in rows]


def fixed(data: dict, repo: str, cache: str) -> dict:
    """The whole JSON document with portable paths and MSLP rows without a level dimension."""
    data = portable(data, repo, cache)
    for table in (data.get("test_scores", {}).get("rmse", {}), data.get("rmse", {})):
        if isinstance(table.get("mslp"), dict):
            table["mslp"] = {series: without_level(rows) for series, rows in table["mslp"].items()}
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training-repo", required=True, help="repository root on the training machine, e.g. /work/main")
    parser.add_argument("--training-cache", required=True, help="bdlens cache on the training machine, e.g. /root/.cache/bdlens")
    args = parser.parse_args(argv)
    repo, cache = args.training_repo.rstrip("/"), args.training_cache.rstrip("/")
    files = sorted(REPOSITORY.glob("bdlens/assets/models/*/manifest.json")) + sorted(REPOSITORY.glob("bdlens/assets/models/*/calibration.json"))
    files += sorted(REPOSITORY.glob("evaluation/results/*.json"))
    for path in files:
        text = path.read_text()
        new = json.dumps(fixed(json.loads(text), repo, cache), indent=1) + ("\n" if text.endswith("\n") else "")
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(REPOSITORY)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
