"""What each export format costs in quality and gives in size and speed, on the merged demo model.

    .venv/bin/python bench/quant_quality.py            # trains the demo if runs/demo is missing (about 4 min)
    .venv/bin/python bench/quant_quality.py --run runs/demo --out bench/results

One command: the `make demo` run (trained first if absent) is merged, then written by `tuneforge export` as GGUF
f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 and as 4-bit GPTQ and AWQ (calibrated on the run's own training rows).
For each:

  size        the file (the directory, for GPTQ/AWQ)
  export      wall time of the `tuneforge export` process (loading, merging, quantizing, writing)
  perplexity  answer-token perplexity on the held-out demo rows (examples/demo/test.jsonl), in transformers on the
              weights the file holds (a GGUF is dequantized by gguf-py, as `model: FILE.gguf` loads it): the same
              numbers llama.cpp holds, computed in fp32
  exact match greedy answers to the 40 held-out demo prompts, in the runtime that serves the format: llama.cpp
              (node-llama-cpp's prebuilt CPU build, 2 threads) for GGUF, transformers for GPTQ/AWQ (and for a
              reference row of the merged fp32 model)
  tokens/s    generated tokens per second in that runtime, one prompt at a time

For the types llama.cpp's own quantizer writes (llama_model_quantize from the same library, on the f32 file), its
file is compared with ours byte for byte, and measured the same way when it differs. Timings are only reported;
run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_speed import write_report  # noqa: E402

TUNEFORGE = [sys.executable, "-m", "tuneforge"]
GGUF_TYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
LLAMA_QUANTIZER_TYPES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]  # what llama_model_quantize writes here too
COMPRESSED = ["gptq", "awq"]
TEST = ROOT / "examples" / "demo" / "test.jsonl"
MAX_TOKENS = 64
THREADS = 2

# Greedy answers in llama.cpp, stopping at end of generation, timed per prompt (generation only, not loading).
NODE_GREEDY = """
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";
const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const {getLlama} = await import(pathToFileURL(request.entry).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: request.model});
const context = await model.createContext({contextSize: 512, threads: request.threads});
const answers = [];
for (const ids of request.prompts) {
  const sequence = context.getSequence();
  const tokens = [];
  const start = process.hrtime.bigint();
  for await (const token of sequence.evaluate(ids, {temperature: 0, yieldEogToken: true})) {
    if (model.isEogToken(token)) break;
    tokens.push(token);
    if (tokens.length >= request.max_tokens) break;
  }
  answers.push({tokens, seconds: Number(process.hrtime.bigint() - start) / 1e9});
  sequence.dispose();
}
console.log(JSON.stringify(answers));
process.exit(0);
"""


def run(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def merged_demo(run_dir: Path, out: Path) -> Path:
    if not (run_dir / "adapter_model.safetensors").is_file():
        print(f"training the demo into {run_dir} (configs/demo.yaml)", flush=True)
        run(TUNEFORGE + ["train", "configs/demo.yaml", f"output_dir={run_dir}", "--resume", "--quiet"])
    merged = out / "merged"
    if not (merged / "model.safetensors").is_file():
        run(TUNEFORGE + ["merge", str(run_dir), "-o", str(merged)])
    return merged


def held_out(tokenizer) -> tuple[list, list[list[int]], list[str]]:
    from tuneforge.data.formats import load_examples
    from tuneforge.data.tokenize import render_prompt

    examples = load_examples(str(TEST))
    prompts = [tokenizer(render_prompt(tokenizer, list(ex.messages[:-1])), add_special_tokens=False)["input_ids"]
               for ex in examples]
    return examples, prompts, [ex.messages[-1]["content"] for ex in examples]


def llama_cpp_answers(gguf_file: Path, prompts: list[list[int]], tokenizer) -> tuple[list[str], float]:
    from tests.unit.test_export_gguf import NODE_LLAMA_CPP_ENTRY

    request = {"entry": str(NODE_LLAMA_CPP_ENTRY), "model": str(gguf_file), "threads": THREADS,
               "max_tokens": MAX_TOKENS, "prompts": prompts}
    with tempfile.TemporaryDirectory() as folder:
        script, request_file = Path(folder) / "greedy.mjs", Path(folder) / "request.json"
        script.write_text(NODE_GREEDY)
        request_file.write_text(json.dumps(request))
        result = subprocess.run(["node", str(script), str(request_file)], capture_output=True, text=True,
                                env={**os.environ, "NODE_NO_WARNINGS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"llama.cpp on {gguf_file} failed:\n{result.stderr[-3000:]}")
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    texts = [tokenizer.decode(a["tokens"], skip_special_tokens=True).strip() for a in answers]
    return texts, sum(len(a["tokens"]) for a in answers) / sum(a["seconds"] for a in answers)


def transformers_answers(model, tokenizer, prompts: list[list[int]]) -> tuple[list[str], float]:
    import torch

    texts, tokens, seconds = [], 0, 0.0
    with torch.no_grad():
        for ids in prompts:
            start = time.perf_counter()
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            seconds += time.perf_counter() - start
            new = out[0, len(ids):].tolist()
            new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts, tokens / seconds


def perplexity(path: Path, tokenizer, examples) -> float:
    from tuneforge.eval.perplexity import answer_perplexity
    from tuneforge.model.load import load_model

    # A GGUF file is converted to a cached safetensors model: cache it beside the exports, not in the user's cache.
    os.environ["TUNEFORGE_CACHE"] = str(path.parent / "cache")
    model = load_model(str(path)).eval()
    return answer_perplexity(model, tokenizer, examples).perplexity


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def same_content(ours: Path, theirs: Path) -> bool:
    """Every tensor equal in type and bytes, and every metadata value equal: the same model file in content
    (llama.cpp writes its keys and tensors in another order, so the files' bytes are not compared)."""
    import numpy as np

    from tuneforge.model.gguf_reader import open_gguf

    a, b = open_gguf(ours), open_gguf(theirs)
    tensors_a, tensors_b = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if tensors_a.keys() != tensors_b.keys() or a.fields.keys() != b.fields.keys():
        return False
    for name, tensor in tensors_a.items():
        other = tensors_b[name]
        if tensor.tensor_type != other.tensor_type or not np.array_equal(
                np.asarray(tensor.data).view(np.uint8), np.asarray(other.data).view(np.uint8)):
            return False
    return all(a.fields[key].contents() == b.fields[key].contents() for key in a.fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="the demo run (trained with configs/demo.yaml if missing)")
    parser.add_argument("--out", default="bench/results", help="where the table and raw figures go")
    parser.add_argument("--work", default="runs/quant-quality", help="where the exported files go")
    args = parser.parse_args()
    import torch

    from tuneforge.eval.metrics import exact_match
    from tuneforge.model.load import load_model, load_tokenizer

    torch.set_num_threads(THREADS)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    merged = merged_demo(ROOT / args.run, work)
    tokenizer = load_tokenizer(str(merged))
    examples, prompts, expected = held_out(tokenizer)
    rows = []
    # Each measured row is kept in WORK/rows.json: a rerun (after a crash, or to add a row) reuses the rows whose
    # file is still there instead of exporting and measuring them again (AWQ alone takes minutes).
    rows_file = work / "rows.json"
    done = json.loads(rows_file.read_text()) if rows_file.exists() else {}

    def measure(label, path, runtime, export_s=None, answers=None):
        if label in done and path.exists():
            rows.append(done[label])
            return done[label]
        answers = answers or (llama_cpp_answers(path, prompts, tokenizer) if runtime == "llama.cpp" else
                              transformers_answers(load_model(str(path)).eval(), tokenizer, prompts))
        texts, speed = answers
        row = {"format": label, "size_mb": round(size_mb(path), 1), "export_s": export_s,
               "perplexity": round(perplexity(path, tokenizer, examples), 4),
               "exact_match": exact_match(texts, expected)["exact_match"], "tokens_per_s": round(speed, 1),
               "runtime": runtime}
        print(json.dumps(row), flush=True)
        rows.append(row)
        done[label] = row
        rows_file.write_text(json.dumps(done, indent=2))
        return row

    measure("merged fp32 model", merged, "transformers")
    for quant in GGUF_TYPES:
        file = work / f"demo-{quant}.gguf"
        if quant not in done or not file.exists():
            seconds = run(TUNEFORGE + ["export", str(merged), "--quant", quant, "-o", str(file), "--force"])
        measure(quant, file, "llama.cpp", round(seconds, 1) if quant not in done else None)
    for fmt in COMPRESSED:
        directory, label = work / f"demo-{fmt}", f"{fmt.upper()} 4-bit"
        if label not in done or not directory.exists():
            # the run itself (not the merged copy) names the training rows to calibrate on: the same merged weights
            seconds = run(TUNEFORGE + ["export", str(ROOT / args.run), "--format", fmt, "-o", str(directory),
                                       "--force"])
        measure(label, directory, "transformers", round(seconds, 1) if label not in done else None)

    from tests.unit.test_export_gguf import llama_cpp_quantize

    reference = {}
    for quant in LLAMA_QUANTIZER_TYPES:
        theirs = work / f"demo-{quant}-llama-quantize.gguf"
        start = time.perf_counter()
        llama_cpp_quantize(work / "demo-f32.gguf", theirs, quant)
        seconds = round(time.perf_counter() - start, 1)
        same = same_content(work / f"demo-{quant}.gguf", theirs)
        ours = next(r for r in rows if r["format"] == quant)
        figures = dict(ours) if same else measure(f"{quant} (llama.cpp's quantizer)", theirs, "llama.cpp")
        reference[quant] = {"same_content": same, "quantize_s": seconds, "perplexity": figures["perplexity"],
                            "exact_match": figures["exact_match"]}
    if all(r["same_content"] for r in reference.values()):  # the same models: one row each is enough
        rows[:] = [r for r in rows if "llama.cpp's quantizer" not in r["format"]]
    report = table(rows, reference)
    write_report(ROOT / args.out, "quant_quality", report, {"rows": rows, "llama_cpp_quantizer": reference})


def table(rows: list[dict], reference: dict) -> str:
    f32 = next(r for r in rows if r["format"] == "f32")
    lines = ["| format | size | export | perplexity | exact match | tokens/s (runtime) | llama.cpp's quantizer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = reference.get(r["format"])
        theirs = "-" if ref is None else ("the same tensors and metadata" if ref["same_content"] else
                                          f"ppl {ref['perplexity']:.4f}, exact match {ref['exact_match']:.3f}")
        export = "-" if r["export_s"] is None else f"{r['export_s']:.0f} s"
        lines.append(f"| {r['format']} | {r['size_mb']:.0f} MB | {export} | {r['perplexity']:.4f} | "
                     f"{r['exact_match']:.3f} | {r['tokens_per_s']:.0f} ({r['runtime']}) | {theirs} |")
    lines.append("")
    lines.append(f"exact match against f32's {f32['exact_match']:.3f}: " + ", ".join(
        f"{r['format']} {100 * (r['exact_match'] - f32['exact_match']):+.1f} points" for r in rows
        if r["format"] in ("q4_k_m", "GPTQ 4-bit", "AWQ 4-bit")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
