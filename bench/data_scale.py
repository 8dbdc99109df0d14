"""`tuneforge data check` at scale: 1,000,000 generated instruction rows (~200 MB of JSON Lines).

    .venv/bin/python bench/data_scale.py                  # the full run (a few minutes of 2 CPU cores)
    .venv/bin/python bench/data_scale.py --rows 50000     # a quick look

Generates varied Alpaca-style rows (templated instructions over a Zipf-distributed vocabulary, optional inputs,
answers of 3 to 50 words, a skewed `category`) with planted exact duplicates (case and spacing changed),
near-duplicates (one word changed, clauses swapped, punctuation changed) and broken lines, into a temporary
directory. Then runs the real CLI, `tuneforge data check FILE --by category --json` (validation, exact and
near-duplicate detection, token lengths with the embedded model's tokenizer, balance), as a child process, and
reports its wall time, rows/s, CPU time and peak RSS (the kernel's high-water mark for the child,
`getrusage(RUSAGE_CHILDREN)`), and what it found against what was planted. Timings are never asserted in tests;
on a shared machine the CPU seconds and the RSS are the stable figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS, TARGET_RSS_MB = 300, 2048  # the bounds for 1,000,000 rows on a 2-core CPU

COMMON = ("the a of to and in is it for on with as by at this that be are was from or an have not can your more "
          "what which when how why who use make write give list explain describe name find show help each other "
          "first one two three many some most very also than then about into over after before between under "
          "good new old small large long short simple clear main best key common important different").split()
SYLLABLES = ("ka ri to ne sa mu lo pe vi da ga ru mi zo te fa li no be ha ju ky wo xe qu".split())
TEMPLATES = (
    "Explain {t} to a beginner.", "Write a short paragraph about {t}.", "List three facts about {t}.",
    "Summarise the following text about {t}.", "What is the difference between {t} and {u}?",
    "Give an example of {t} in everyday life.", "Translate this sentence about {t} into French.",
    "Why does {t} matter for {u}?", "Describe how {t} works, step by step.", "Name two uses of {t}.",
    "Classify the following item: {t}.", "Rewrite this sentence about {t} more formally.",
)
CATEGORIES = ("general", "science", "writing", "coding", "maths", "history", "translation", "classification")
CATEGORY_WEIGHTS = np.array([30, 18, 15, 12, 10, 7, 5, 3], dtype=float) / 100


class RowMaker:
    """Varied rows, fast: words are drawn in bulk from a Zipf-like distribution over common words and 20,000
    made-up topic words, so unrelated rows share common words (as real text does) but are far from duplicates."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        made_up = set()
        while len(made_up) < 20_000:
            made_up.add("".join(self.rng.choices(SYLLABLES, k=self.rng.randint(2, 4))))
        self.vocab = np.array(COMMON + sorted(made_up), dtype=object)
        weights = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.05
        self.cumulative = np.cumsum(weights / weights.sum())
        self._pool = np.empty(0, dtype=np.int64)

    def words(self, n: int) -> list[str]:
        if len(self._pool) < n:
            self._pool = np.searchsorted(self.cumulative, self.np_rng.random(1_000_000))
        picked, self._pool = self._pool[:n], self._pool[n:]
        return self.vocab[picked].tolist()

    def row(self) -> dict:
        rng = self.rng
        topic, other = " ".join(self.words(rng.randint(1, 3))), " ".join(self.words(rng.randint(1, 2)))
        row = {"instruction": rng.choice(TEMPLATES).format(t=topic, u=other)}
        if rng.random() < 0.3:
            row["input"] = _sentence(self.words(rng.randint(5, 25)))
        row["output"] = _sentence(self.words(int(rng.choice((3, 6, 10, 15, 22, 35)) * rng.uniform(0.7, 1.3))))
        row["category"] = CATEGORIES[int(np.searchsorted(np.cumsum(CATEGORY_WEIGHTS), rng.random()))]
        return row


def _sentence(words: list[str]) -> str:
    return " ".join(words).capitalize() + "."


def paraphrase(row: dict, rng: random.Random, maker: RowMaker) -> dict:
    """A near-duplicate: one word of the answer changed, its two halves swapped, punctuation and case changed."""
    words = row["output"].rstrip(".").split()
    words[rng.randrange(len(words))] = maker.words(1)[0]
    cut = len(words) // 2
    words = words[cut:] + words[:cut]
    out = dict(row)
    out["output"] = " ".join(words).capitalize() + "!"
    out["instruction"] = row["instruction"].rstrip(".?") + ", please."
    return out


def respaced(row: dict) -> dict:
    """An exact duplicate as `data check` defines it: the same text up to case and whitespace."""
    return {k: ("  ".join(v.upper().split()) if k != "category" else v) for k, v in row.items()}


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, set[int]]:
    """Write `rows` lines; about 1% exact duplicates, 1% near-duplicates and 0.05% broken lines are planted.
    Returns the line numbers of each kind of planted line."""
    maker, rng = RowMaker(seed), random.Random(seed + 1)
    recent: list[dict] = []  # originals a later duplicate copies (spread through the file, not only adjacent)
    planted: dict[str, set[int]] = {"exact": set(), "near": set(), "broken": set()}
    with path.open("w", encoding="utf-8") as fh:
        for number in range(1, rows + 1):
            draw = rng.random()
            if draw < 0.01 and recent:
                line, kind = json.dumps(respaced(recent.pop(rng.randrange(len(recent))))), "exact"
            elif draw < 0.02 and recent:
                line, kind = json.dumps(paraphrase(recent.pop(rng.randrange(len(recent))), rng, maker)), "near"
            elif draw < 0.0205:
                line, kind = json.dumps(maker.row())[: -rng.randint(2, 20)], "broken"
            else:
                row = maker.row()
                if len(row["output"].split()) >= 12 and rng.random() < 0.05 and len(recent) < 50_000:
                    recent.append(row)  # only answers long enough that one changed word stays above 0.85
                fh.write(json.dumps(row) + "\n")
                continue
            planted[kind].add(number)
            fh.write(line + "\n")
    return planted


def run_check(path: Path, max_length: int) -> tuple[dict, float, float, float]:
    """The CLI in a child process: (its JSON report, wall seconds, CPU seconds, peak RSS in MB)."""
    command = [sys.executable, "-m", "tuneforge", "data", "check", str(path), "--by", "category", "--json",
               "--max-length", str(max_length)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 1):
        sys.exit(f"data check failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(result.stdout), wall, cpu, after.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--keep", metavar="DIR", help="write the generated file here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tuneforge-data-scale-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scale.jsonl"
        started = time.perf_counter()
        planted = generate(path, args.rows)
        size_mb = path.stat().st_size / 1e6
        print(f"generated {args.rows:,} rows, {size_mb:,.0f} MB in {time.perf_counter() - started:.0f} s "
              f"(planted: {len(planted['exact']):,} exact, {len(planted['near']):,} near duplicates, "
              f"{len(planted['broken']):,} broken lines)", flush=True)
        report, wall, cpu, rss_mb = run_check(path, args.max_length)

    exact = sum(len(g) - 1 for g in report["exact_duplicates"])
    near = sum(len(g["rows"]) - 1 for g in report["near_duplicates"]["groups"])
    lengths = report["lengths"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"data check: {report['rows']:,} rows in {wall:.0f} s wall = {report['rows'] / wall:,.0f} rows/s "
          f"(CPU {cpu:.0f} s), peak RSS {rss_mb:,.0f} MB")
    print(f"found: {report['bad_rows']:,} bad rows, {exact:,} exact and {near:,} near duplicates; token lengths "
          f"p50 {lengths['p50']} p99 {lengths['p99']} max {lengths['max']}, {lengths['over_max_length']:,} over "
          f"{args.max_length}")
    line = lambda where: int(where.rsplit(":", 1)[1])  # noqa: E731
    in_exact = {line(w) for g in report["exact_duplicates"] for w in g[1:]}
    in_near = {line(w) for g in report["near_duplicates"]["groups"] for w in g["rows"]}
    bad = {line(p["where"]) for p in report["problems"]}
    recall = {"exact": len(planted["exact"] & in_exact), "near": len(planted["near"] & in_near),
              "broken": len(planted["broken"] & bad)}
    print("planted lines found: " + ", ".join(f"{kind} {recall[kind]:,} of {len(planted[kind]):,}"
                                               for kind in ("exact", "near", "broken"))
          + " (the rest of the duplicates found are chance duplicates among the generator's short rows)")
    scale = 1_000_000 / report["rows"]
    verdict_time = "meets" if wall * scale < TARGET_SECONDS else "MISSES"
    verdict_rss = "meets" if rss_mb < TARGET_RSS_MB else "MISSES"
    print(f"targets for 1,000,000 rows: < {TARGET_SECONDS} s ({verdict_time}{'' if scale == 1 else ', scaled'}), "
          f"< {TARGET_RSS_MB} MB RSS ({verdict_rss})")


if __name__ == "__main__":
    main()
