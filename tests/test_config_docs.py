"""docs/config.md lists every training config key with the dataclass's default."""

import dataclasses
import json
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _fields(cls, prefix=""):
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING  # set by every recipe (name, model)
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", default


def _documented_default(cell: str):
    cell = cell.strip()
    if cell == "null":
        return None
    if cell in ("true", "false"):
        return cell == "true"
    if cell.startswith("["):
        return json.loads(cell)
    try:
        return float(cell)
    except ValueError:
        return cell


def test_every_config_key_is_documented_with_its_default():
    from acemath_mcore.recipes.config import TrainConfig

    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| (`[^|]+`) \| ([^|]+) \|", line)
        if match:
            keys = re.findall(r"`([\w.]+)`", match.group(1))
            defaults = [part for part in match.group(2).split(",")] if len(keys) > 1 else [match.group(2)]
            rows.update(zip(keys, defaults))
    fields = dict(_fields(TrainConfig))
    assert sorted(set(fields) - set(rows)) == [], "keys missing from docs/config.md"
    assert sorted(set(rows) - set(fields)) == [], "docs/config.md lists keys TrainConfig does not have"
    for key, default in fields.items():
        if default is dataclasses.MISSING:
            assert rows[key].strip() == "(recipe)", key
        else:
            assert _documented_default(rows[key]) == default, (key, rows[key], default)
