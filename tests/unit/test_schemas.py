import json

import pytest
from pydantic import ValidationError

from schemas import ALL_SCHEMAS, InteractionEvent
from schemas.export import JSON_DIR


def test_interaction_rejects_unknown_type_missing_ids_and_extra_fields():
    ok = {"event_id": "e1", "request_id": "r1", "doc_id": "d1", "type": "click"}
    assert InteractionEvent.model_validate(ok).type.value == "click"
    for bad in (
        {**ok, "type": "teleport"},
        {k: v for k, v in ok.items() if k != "event_id"},
        {**ok, "event_id": ""},
        {**ok, "colour": "red"},
        {**ok, "schema_version": 99},
    ):
        with pytest.raises(ValidationError):
            InteractionEvent.model_validate(bad)


def test_return_type_uses_its_wire_name():
    ev = InteractionEvent(event_id="e", request_id="r", doc_id="d", type="return")
    assert json.loads(ev.model_dump_json())["type"] == "return"


@pytest.mark.parametrize("name", sorted(ALL_SCHEMAS))
def test_exported_json_schemas_are_up_to_date(name):
    on_disk = json.loads((JSON_DIR / f"{name}.schema.json").read_text())
    assert on_disk == ALL_SCHEMAS[name].model_json_schema(), "run `rankloop export-schemas`"
