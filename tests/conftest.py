"""Shared fixtures: the embedded tokenizer and a tiny random Llama built in-process (no download)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "smollm2-135m-instruct"


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture(scope="session")
def tokenizer():
    from tuneforge.model.load import load_tokenizer

    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A complete local HF model directory (random tiny Llama + the embedded tokenizer) usable as `model:`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from tuneforge.model.load import load_model

    return load_model(str(tiny_model_dir))


def read_gguf(path):
    """gguf-py's GGUFReader, parsing in a tenth of the time (tuneforge.model.gguf_reader; the same fields and
    tensors, tests/unit/test_gguf_reader.py)."""
    from tuneforge.model.gguf_reader import open_gguf

    return open_gguf(path)


DEMO_STEPS = 12  # the shared demo run's optimizer steps (96 rows, 8 per step)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded SmolLM2-135M LoRA-tuned on the demo task once per session (`make demo`'s config, shortened to
    one epoch of 96 rows, 12 packed steps of 8, no validation): held-out exact match goes from 0 to about 0.85
    (measured: 0.80 after 8 steps, 0.85 after 10, 12 and 24, so 12 keeps a margin over the test's 0.7).
    Shared by the e2e, deploy and UI tests, which read it and write anywhere else (a test that needs to change a
    run copies it)."""
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    tmp = tmp_path_factory.mktemp("demo-run")
    rows = [json.loads(line) for line in (ROOT / "examples" / "demo" / "train.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp / "train.jsonl", rows[: 8 * DEMO_STEPS])
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.train={data}", f"output_dir={tmp / 'run'}",
                                                       "data.val_split=0", "train.epochs=1", "train.eval_every=0",
                                                       f"train.max_steps={DEMO_STEPS}"])
    return train(cfg, show_progress=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`tuneforge ARGS` run in this process (`tuneforge.cli.main`, what `python -m tuneforge` calls), with its exit
    code, stdout and stderr (our log lines included) captured as a subprocess's would be. In-process because a fresh
    interpreter pays ~4 s importing torch and transformers per call; the subprocess entry point itself is covered
    by the tests that must run one (serve, ui, torchrun, the fault driver)."""
    import contextlib
    import io
    import logging

    from tuneforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("tuneforge: %(message)s"))
    tuneforge_log, root = logging.getLogger("tuneforge"), logging.getLogger()
    root_handlers, level, propagate = list(root.handlers), tuneforge_log.level, tuneforge_log.propagate
    tuneforge_log.addHandler(handler)
    tuneforge_log.setLevel(logging.INFO)
    tuneforge_log.propagate = False  # as in its own process: the lines go to its stderr, nowhere else
    before = Path.cwd()
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # noqa: BLE001 - a crash: a traceback on stderr and exit 1, as the interpreter would
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
        tuneforge_log.removeHandler(handler)
        tuneforge_log.setLevel(level)
        tuneforge_log.propagate = propagate
        root.handlers[:] = root_handlers  # main's logging.basicConfig must not leave a handler on a closed stream
    return subprocess.CompletedProcess(["tuneforge", *args], code, out.getvalue(), err.getvalue())


def wait_until_serving(process: subprocess.Popen, port: int, output, timeout: float = 180) -> None:
    """Poll `tuneforge serve`'s /health until it answers; fail with the server's `output()` if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, output()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as health:
                if health.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, "tuneforge serve did not come up"
        time.sleep(0.2)


def free_port() -> int:
    """A localhost port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_in_thread(app):
    """(url, stop): `app` on a free localhost port, uvicorn in a daemon thread of this process."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop
