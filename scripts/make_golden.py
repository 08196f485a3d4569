#!/usr/bin/env python
"""Regenerate tests/golden/bundled.json: seeded outputs of the bundled model (run only when the model changes)."""

from __future__ import annotations

import json
from pathlib import Path

from dgemma.generate import Pipeline

CASES = [
    {"prompt": "In the beginning", "seed": 0, "max_new_tokens": 32},
    {"prompt": "Jesus answered them,", "seed": 1, "max_new_tokens": 64, "steps": 24},
]


def main() -> None:
    pipe = Pipeline.load(device="cpu", dtype="float32")
    out = []
    for case in CASES:
        knobs = {k: v for k, v in case.items() if k != "prompt"}
        r = pipe.generate(case["prompt"], **knobs)
        out.append({**case, "token_ids": r.token_ids, "text": r.text, "steps_per_canvas": r.steps_per_canvas})
    path = Path(__file__).resolve().parents[1] / "tests" / "golden" / "bundled.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
