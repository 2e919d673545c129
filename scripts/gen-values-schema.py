#!/usr/bin/env python3
"""Copy the experiment config's JSON schema into the chart's values.schema.json.

The chart's `config` value is the experiment config verbatim, so its schema is generated
from the pydantic models in distill.config (the single source of truth) and stored under
`$defs` (Config and the models it uses). Other `$defs` entries are hand-written and kept.
Run after changing distill/config.py; tests/test_chart_schema.py fails until the file matches.

Usage: python scripts/gen-values-schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.config import Config

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "distill" / "values.schema.json"


def config_definitions() -> dict:
    """Return the `$defs` entries for the experiment config, with Config itself as one of them."""
    schema = Config.model_json_schema()
    definitions = schema.pop("$defs")
    definitions["Config"] = schema
    return definitions


def render_schema(current: dict) -> dict:
    updated = dict(current)
    updated["$defs"] = {**current.get("$defs", {}), **config_definitions()}
    updated["properties"] = {**current["properties"], "config": {"$ref": "#/$defs/Config"}}
    return updated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date instead of writing it")
    args = parser.parse_args()

    current = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    updated = render_schema(current)
    if args.check:
        if updated != current:
            print(f"{SCHEMA_PATH} is out of date; run: python scripts/gen-values-schema.py", file=sys.stderr)
            return 1
        return 0

    SCHEMA_PATH.write_text(json.dumps(updated, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
