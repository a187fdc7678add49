"""Writes the JSON Schema files in schemas/json/ that non-Python emitters validate against."""

import json
from pathlib import Path

from schemas.events import ALL_SCHEMAS

JSON_DIR = Path(__file__).parent / "json"


def export_json_schemas(out_dir: Path = JSON_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in ALL_SCHEMAS.items():
        path = out_dir / f"{name}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in export_json_schemas():
        print(p)
