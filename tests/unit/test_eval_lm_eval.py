"""The lm-evaluation-harness bridge, on a local custom task (YAML over a local JSONL; no hub access)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, write_jsonl
from tuneforge.errors import UserError
from tuneforge.eval.multiple_choice import evaluate_multiple_choice

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")

from tuneforge.eval.lm_eval_bridge import run_lm_eval  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "eval" / "mmlu_sample.jsonl"
TASK_YAML = """\
task: tuneforge_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture()
def local_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    letters = "ABCD"
    rows = []
    for line in FIXTURE.read_text().splitlines():
        row = json.loads(line)
        if isinstance(row["answer"], str):
            row["answer"] = letters.index(row["answer"].upper())
        rows.append(row)
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_mc.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return tasks, data


def test_local_task_runs_and_agrees_with_our_text_scoring(tiny_model, tokenizer, local_task):
    tasks, data = local_task
    scores = run_lm_eval(tiny_model, tokenizer, ["tuneforge_local_mc"], include_path=str(tasks), batch_size=4)
    assert set(scores) == {"tuneforge_local_mc/acc"}
    # Same prompt ("Question: ...\nAnswer:"), same " choice" continuations: the harness and our scorer agree.
    ours, _ = evaluate_multiple_choice(tiny_model, tokenizer, str(data), style="text")
    assert scores["tuneforge_local_mc/acc"] == pytest.approx(ours["mc_acc"])


def test_unknown_task_is_one_line_error(tiny_model, tokenizer, local_task):
    tasks, _ = local_task
    with pytest.raises(UserError, match="--lm-eval: unknown task no_such_task"):
        run_lm_eval(tiny_model, tokenizer, ["no_such_task"], include_path=str(tasks))
