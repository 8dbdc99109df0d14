"""The preference demo's data (examples/preference_demo/), made from the `make demo` task's rows.

The flaw: a chatty annotator ended 60% of the supervised answers with a pleasantry ("NAME=...; CITY=... - Happy to
help!"). Supervised tuning learns what most answers do, so the tuned model ends (greedily) every answer with it and
its exact match collapses. Pairs then say which answer is better: the plain one (chosen) over the same answer with
the pleasantry (rejected); DPO on top of the supervised model removes the habit without touching the format.

- sft.jsonl         the demo's first 160 training rows, 60% of answers with a pleasantry (instruction format)
- pairs.jsonl       the other 160 training rows as pairs: chosen = the plain answer, rejected = it with a pleasantry
- test_pairs.jsonl  the demo's 40 held-out rows as pairs the same way (held-out preference accuracy)
The held-out exact match is measured on examples/demo/test.jsonl itself (the plain answers).

    python scripts/make_preference_demo_data.py     # rewrites examples/preference_demo/ (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO, OUT = ROOT / "examples" / "demo", ROOT / "examples" / "preference_demo"
PLEASANTRIES = (" - Happy to help!", " - Hope this helps!", " - Let me know if you need anything else!")
SFT_ROWS, FLAWED_SHARE, SEED = 160, 0.6, 7


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def pair(row: dict, rng: random.Random) -> dict:
    """The instruction row as a pair with the same prompt text the instruction format renders."""
    prompt = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return {"prompt": prompt, "chosen": row["output"], "rejected": row["output"] + rng.choice(PLEASANTRIES)}


def main() -> None:
    rng = random.Random(SEED)
    train, test = read(DEMO / "train.jsonl"), read(DEMO / "test.jsonl")
    sft = [dict(row, output=row["output"] + rng.choice(PLEASANTRIES)) if rng.random() < FLAWED_SHARE else row
           for row in train[:SFT_ROWS]]
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT / "sft.jsonl", sft)
    write(OUT / "pairs.jsonl", [pair(row, rng) for row in train[SFT_ROWS:]])
    write(OUT / "test_pairs.jsonl", [pair(row, rng) for row in test])


if __name__ == "__main__":
    main()
