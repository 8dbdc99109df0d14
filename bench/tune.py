"""What `tuneforge tune` buys over the tables: held-out exact match of the guide's defaults, of `recommend`'s run file and
of the best trial of a `tune --budget` search, on two tasks.

    .venv/bin/python bench/tune.py                    # both tasks, 30-minute searches (about 1.5 h; run it alone)
    .venv/bin/python bench/tune.py --budget 10m --tasks demo
    .venv/bin/python bench/tune.py --tasks demo --runs tune+range --add   # (d): is the lr range test worth it?

Tasks (the embedded SmolLM2-135M-Instruct, LoRA):
  demo    `make demo`'s task: name and city out of a sentence, answered as `NAME=...; CITY=...`
  harder  the same sentences, a harder rule: `SURNAME, I. @ CITY` (surname first, the first name's initial, the city
          in capitals), which the model must learn to reorder and transform, not only to copy

For each task:
  (a) defaults     the run file names only the model, LoRA and the data (every other value: tuneforge's defaults)
  (b) recommend    `tuneforge recommend --data TRAIN --device cpu --gpu-mem <free RAM>`'s run file
  (c) tune         `tuneforge tune --unseen-answers` on (b)'s run file for --budget, metric exact_match; its best
                   trial. The test rows name people and cities the training rows never name, so the search's
                   validation rows are held out by answer word the same way (tune --unseen-answers)
  (c0) tune-random the same search on a random validation split (tune's default; not run by default)
  (d) tune+range   (c) with --lr-range-test (not run by default)
(a) and (b) train on the training rows (validation split as their run files say) and are scored on the held-out
test rows once; (c) searches on a validation split of the training rows and its best trial is scored on the same
test rows once, at the end (tune --test). Timings are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench.train_speed import write_report  # noqa: E402

TUNEFORGE = [sys.executable, "-m", "tuneforge"]
DEMO = ROOT / "examples" / "demo"


def harder_task(directory: Path) -> tuple[Path, Path]:
    """`make demo`'s sentences with the harder answer rule, train/test split as the demo's (unseen names in test)."""
    import make_demo_data as demo

    def rows(firsts, lasts, cities, count, rng):
        out = []
        for _ in range(count):
            first, last, city = rng.choice(firsts), rng.choice(lasts), rng.choice(cities)
            sentence = rng.choice(demo.TEMPLATES).format(name=f"{first} {last}", city=city)
            out.append({"instruction": demo.INSTRUCTION, "input": sentence,
                        "output": f"{last.upper()}, {first[0]}. @ {city.upper()}"})
        return out

    rng = random.Random(11)
    directory.mkdir(parents=True, exist_ok=True)
    files = directory / "train.jsonl", directory / "test.jsonl"
    parts = rows(demo.FIRST[:46], demo.LAST[:40], demo.CITIES[:48], 320, rng), \
        rows(demo.FIRST[46:], demo.LAST[40:], demo.CITIES[48:], 40, rng)
    for path, part in zip(files, parts):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return files


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}:\n"
                         f"{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def exact_match(run_dir: Path, test: Path, work: Path) -> float:
    out = work / f"eval-{run_dir.name}"
    run(TUNEFORGE + ["eval", str(run_dir), "--data", str(test), "--metrics", "exact_match", "--out", str(out)],
        work / f"eval-{run_dir.name}.log")
    models = json.loads((out / "summary.json").read_text())["models"]
    return float((models.get("tuned") or models.get("model"))["scores"]["exact_match"])


def free_ram_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def one_task(name: str, train: Path, test: Path, work: Path, budget: str, runs: list[str], result: dict,
             save, out: Path) -> None:
    """Fills result[run] for each of `runs` ("defaults", "recommend", "tune", "tune+range"), saving after each; each
    study's report (every trial's values, metric, state and time) is kept as out/tune-TASK-VARIANT.md."""
    work.mkdir(parents=True, exist_ok=True)
    if "defaults" in runs:
        defaults = work / "defaults.yaml"
        defaults.write_text(yaml.safe_dump({"model": "smollm2-135m-instruct", "method": "lora",
                                            "output_dir": str(work / "defaults"),
                                            "data": {"train": str(train), "val_split": 0.1}}))
        seconds = run(TUNEFORGE + ["train", str(defaults), "--quiet"], work / "defaults.log")
        result["defaults"] = {"exact_match": exact_match(work / "defaults", test, work), "seconds": seconds}
        save(f"[{name}] (a) defaults: {result['defaults']}")

    recommended = work / "recommend.yaml"
    run(TUNEFORGE + ["recommend", "--data", str(train), "--device", "cpu", "--gpu-mem", f"{free_ram_gib():.0f}",
                     "-o", str(recommended)], work / "recommend-plan.log")
    config = yaml.safe_load(recommended.read_text())
    config["output_dir"] = str(work / "recommend")
    config.setdefault("data", {})["val_split"] = 0.1
    recommended.write_text(yaml.safe_dump(config))
    if "recommend" in runs:
        seconds = run(TUNEFORGE + ["train", str(recommended), "--quiet"], work / "recommend.log")
        result["recommend"] = {"exact_match": exact_match(work / "recommend", test, work), "seconds": seconds,
                               "config": {k: config["train"].get(k) for k in ("lr", "epochs", "batch_size",
                                                                              "grad_accum")}
                               | {"lora.r": config.get("lora", {}).get("r")}}
        save(f"[{name}] (b) recommend: {result['recommend']}")

    for variant in ("tune", "tune-random", "tune+range"):
        if variant not in runs:
            continue
        study = work / f"study-{variant}"
        extra = {"tune": ["--unseen-answers"], "tune-random": [],
                 "tune+range": ["--unseen-answers", "--lr-range-test"]}[variant]
        seconds = run(TUNEFORGE + ["tune", str(recommended), "--budget", budget, "--metric", "exact_match", "--test",
                                   str(test), "--study-dir", str(study), "-o", str(work / f"best-{variant}.yaml"),
                                   *extra], work / f"{variant}.log")
        state = json.loads((study / "tune.json").read_text())
        out.mkdir(parents=True, exist_ok=True)
        (out / f"tune-{name}-{variant}.md").write_text((study / "report.md").read_text(), encoding="utf-8")
        best = yaml.safe_load((work / f"best-{variant}.yaml").read_text())
        trials = sum(1 for _ in (study / "trials").glob("*.yaml"))
        result[variant] = {"exact_match": state["test_score"], "seconds": seconds, "trials": trials,
                           "validation": state["best_value"], "lr_range": state.get("lr_range"),
                           "config": {k: best["train"].get(k) for k in ("lr", "epochs", "warmup_ratio")}
                           | {"lora.r": best.get("lora", {}).get("r")}}
        save(f"[{name}] {variant}: {result[variant]}")


COLUMNS = (("defaults", "(a) defaults"), ("recommend", "(b) recommend"),
           ("tune-random", "(c0) tune {budget}, random validation split"),
           ("tune", "(c) tune {budget} --unseen-answers (best trial)"),
           ("tune+range", "(d) (c) with --lr-range-test"))
STUDIES = ("tune", "tune-random", "tune+range")


def table(results: dict, budget: str) -> str:
    shown = [(key, title.format(budget=budget)) for key, title in COLUMNS
             if any(key in r for r in results.values())]
    lines = ["| task | " + " | ".join(title for _, title in shown) + " | (c) - (b) | tune's trials | tune's choice |",
             "|---" * (len(shown) + 4) + "|"]
    for task, r in results.items():
        cells = [f"{r[key]['exact_match']:.3f}" if key in r else "-" for key, _ in shown]
        gain = f"{100 * (r['tune']['exact_match'] - r['recommend']['exact_match']):+.1f} points" \
            if "tune" in r and "recommend" in r else "-"
        studies = [k for k, _ in shown if k in STUDIES and k in r]
        trials = " / ".join(str(r[k]["trials"]) for k in studies) or "-"
        choice = "; ".join(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in r[key]["config"].items())
                           for key in studies) or "-"
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {gain} | {trials} | {choice} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="30m")
    parser.add_argument("--tasks", default="demo,harder")
    parser.add_argument("--runs", default="defaults,recommend,tune",
                        help="which of defaults, recommend, tune (--unseen-answers), tune-random (a random split), "
                             "tune+range (tune with --lr-range-test) to run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--add", action="store_true", help="add these runs to the results already in --out")
    args = parser.parse_args()
    saved = args.out / "tune.json"
    results: dict[str, dict] = json.loads(saved.read_text())["results"] if args.add and saved.is_file() else {}
    runs = args.runs.split(",")

    def save(line: str) -> None:  # after every run: a long benchmark cut short keeps what it measured
        print(line, flush=True)
        write_report(args.out, "tune", table(results, args.budget),
                     {"results": results, "budget": args.budget})

    with tempfile.TemporaryDirectory(prefix="tuneforge-tune-bench-") as tmp:
        tmp = Path(tmp)
        for task in args.tasks.split(","):
            train, test = (DEMO / "train.jsonl", DEMO / "test.jsonl") if task == "demo" else \
                harder_task(tmp / "harder-data")
            results.setdefault(task, {})
            one_task(task, train, test, tmp / task, args.budget, runs, results[task], save, args.out)


if __name__ == "__main__":
    main()
