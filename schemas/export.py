"""Write the JSON Schema of every message next to this module.

Run ``python -m schemas.export`` after changing a model; ``tests/test_schemas.py`` fails
while the committed files and the models disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.messages import (
    ChangeMessage,
    IngestEvent,
    RejectedMessage,
    UnprocessableMessage,
)

HERE = Path(__file__).parent

MESSAGES: dict[str, type[BaseModel]] = {
    "ingest": IngestEvent,
    "changes": ChangeMessage,
    "rejected": RejectedMessage,
    # The state topic holds the processor's private binary format (service/statecodec.py).
    # Also on the rejected topic: records the processor could not judge or not write.
    "unprocessable": UnprocessableMessage,
}


def schema_text(model: type[BaseModel]) -> str:
    schema: dict[str, Any] = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def path_for(name: str) -> Path:
    return HERE / f"{name}.schema.json"


def main() -> None:
    for name, model in MESSAGES.items():
        path_for(name).write_text(schema_text(model), encoding="utf-8")
        print(f"wrote {path_for(name).relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
