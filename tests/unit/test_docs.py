"""Every setting is documented in docs/configuration.md with its environment name and its real default."""

import json
import re
from pathlib import Path

from pydantic import BaseModel

from services.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def settings_and_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    for name, field in model.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel) and not prefix:
            found |= settings_and_defaults(group, f"{name}.")
        else:
            found[prefix + name] = field.default
    return found


def test_every_setting_has_a_row_in_the_configuration_page_with_its_default():
    """A page that says `join_batch` 5000 while the code has 2000 misleads whoever tunes it."""
    text = DOC.read_text()
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| (.*?) \|", text, re.M)}
    wrong = []
    for name, default in settings_and_defaults(Settings).items():
        env, cell = rows.get(name, (None, None))
        shown = json.dumps(default) if isinstance(default, list) else str(default)
        if env != f"RANKLOOP_{name.upper().replace('.', '__')}" or (not isinstance(default, BaseModel) and cell != f"`{shown}`"):
            wrong.append((name, cell, shown))
    assert wrong == []
