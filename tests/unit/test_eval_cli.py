"""`tuneforge eval` end to end on tiny models: base vs tuned side by side with deltas, every metric equal to its
reference library on the saved outputs, the forgetting check, multiple choice and the judge, files in --out."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from tests.conftest import ROOT, write_jsonl
from tests.unit.test_eval_judge import judge_server  # noqa: F401 (fixture)
from tuneforge.cli import main
from tuneforge.data.formats import load_examples
from tuneforge.eval.perplexity import answer_perplexity
from tuneforge.model.trained import load_for_inference
from tuneforge.run_dir import META_FILE

GENERAL = str(ROOT / "tests" / "fixtures" / "eval" / "general.txt")
MC = str(ROOT / "tests" / "fixtures" / "eval" / "mmlu_sample.jsonl")
ROWS = [
    {"instruction": "Extract the city.", "input": "Ana moved to Lisbon last May.", "output": "Lisbon"},
    {"instruction": "Say hello in French.", "output": "Bonjour !"},
    {"instruction": "Count to five.", "output": "one, two, three, four, five"},
    {"instruction": "Greet me.", "output": "Hello there."},
]


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir, tokenizer, tmp_path_factory):
    """A 'full' run directory whose weights differ from the tiny base, with the base named in tuneforge.json."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    (run / META_FILE).write_text(json.dumps({"method": "full", "base_model": str(tiny_model_dir)}))
    return run


def test_compare_writes_side_by_side_scores_equal_to_the_reference_libraries(
        tuned_run, tiny_model_dir, tmp_path, capsys, judge_server):  # noqa: F811
    url, _ = judge_server
    data = write_jsonl(tmp_path / "test.jsonl", ROWS)
    out = tmp_path / "eval"
    rc = main(["eval", str(tuned_run), "--data", str(data), "--compare", str(tiny_model_dir), "--out", str(out),
               "--general", GENERAL, "--mc", MC, "--max-new-tokens", "8", "--batch-size", "3",
               "--judge-url", url, "--judge-model", "fair"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-500:]
    printed = captured.out
    summary = json.loads((out / "summary.json").read_text())
    tuned, base = summary["models"]["tuned"]["scores"], summary["models"]["base"]["scores"]
    for scores in (tuned, base):
        assert {"perplexity", "rouge1", "rouge2", "rougeL", "bleu", "exact_match", "exact_match_normalised",
                "general_perplexity", "mc_acc", "judge_score"} <= set(scores)
    assert summary["deltas"]["perplexity"] == pytest.approx(tuned["perplexity"] - base["perplexity"])
    assert tuned["perplexity"] != base["perplexity"]  # two different models really were evaluated
    assert summary["judge"]["judge_win_rate"] == 0.5  # neither answer says GOOD: the fair stub calls every pair a tie

    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["Lisbon", "Bonjour !", "one, two, three, four, five", "Hello there."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for label, scores in (("tuned", tuned), ("base", base)):
        outputs = [r["outputs"][label] for r in rows]
        refs = [r["reference"] for r in rows]
        assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [refs]).score, abs=1e-9)
        for key in ("rouge1", "rouge2", "rougeL"):
            expected = sum(scorer.score(r, o)[key].fmeasure for o, r in zip(outputs, refs)) / len(refs)
            assert scores[key] == pytest.approx(expected, abs=1e-12)
        assert scores["exact_match"] == sum(o == r for o, r in zip(outputs, refs)) / len(refs)
    # Perplexity on answer tokens is the library's, on the same rows.
    model, tokenizer = load_for_inference(str(tuned_run))
    assert tuned["perplexity"] == pytest.approx(answer_perplexity(model, tokenizer, load_examples(str(data))).perplexity,
                                                rel=1e-5)
    table = (out / "table.txt").read_text()
    assert "delta" in table and "better" in table and "forgetting check: general-text perplexity" in table
    assert table.strip() in printed and (out / "mc_tuned.jsonl").is_file()


def test_general_without_compare_uses_the_runs_own_base(tuned_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(tuned_run), "--general", GENERAL, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["base"]["name"] == str(tiny_model_dir)
    base, tuned = summary["models"]["base"]["scores"], summary["models"]["tuned"]["scores"]
    assert set(base) == set(tuned) == {"general_perplexity"}
    assert "forgetting check" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--data", "x.jsonl", "--metrics", "rouge,accuracy"], "--metrics: unknown accuracy (available: perplexity,"),
    ([], "nothing to evaluate: give --data"),
    (["--general", GENERAL], "is not a run directory, so its base model is unknown; give it with --compare"),
    (["--data", "x.jsonl", "--judge-url", "http://x"], "--judge-url: also give --judge-model"),
    (["--humaneval", "--k", "1,0"], "--k: expected numbers of at least 1"),
])
def test_user_errors_are_one_line_with_exit_code_2(tiny_model_dir, args, message, capsys):
    assert main(["eval", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("tuneforge: error:")
