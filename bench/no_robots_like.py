"""Write a small no_robots-shaped chat dataset (``messages`` of user/assistant turns, a ``category``) with
known contamination, for trying dedup, decontamination and the judge offline:

- train: 24 requests with a reply, plus 2 exact copies (case and spacing changed);
- test: 8 paraphrases of training requests (near duplicates), 2 training requests verbatim (exact
  prompt contamination), 1 row twice, and 8 requests found nowhere in train.

    python bench/no_robots_like.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decontamination import TRIPLES


def row(request: str, reply: str, category: str = "Open QA") -> dict[str, object]:
    return {
        "prompt": request,
        "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}],
        "category": category,
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = [row(r, f"Here is a careful answer to: {r.lower()}") for r, _, _ in TRIPLES]
    train += [row(TRIPLES[0][0].upper(), train[0]["messages"][1]["content"].upper())]  # type: ignore[index]
    train += [row("  " + TRIPLES[1][0].replace(" ", "  "), str(train[1]["messages"][1]["content"]))]  # type: ignore[index]
    test = [row(p, f"Reply to: {p}") for _, p, _ in TRIPLES[:8]]
    test += [row(TRIPLES[10][0], "A different reply"), row(TRIPLES[11][0], "Another reply")]
    test += [row(o, f"Reply to: {o}") for _, _, o in TRIPLES[12:20]]
    test += [test[-1]]
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}: {len(train)} train rows, {len(test)} test rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
