"""Every setting is documented in docs/configuration.md with its environment name."""

from pathlib import Path

from pydantic import BaseModel

from services.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel) and not prefix:
            names += setting_names(group, f"{name}.")
        else:
            names.append(prefix + name)
    return names


def test_every_setting_has_a_row_in_the_configuration_page():
    text = DOC.read_text()
    missing = [n for n in setting_names(Settings) if f"| `{n}` | `RANKLOOP_{n.upper().replace('.', '__')}` |" not in text]
    assert missing == []
