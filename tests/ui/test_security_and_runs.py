"""The UI's boundaries and its reading of run directories: paths stay inside --runs (`../` tricks, encoded or through
a symlink, get 400/404), the token is required on every request when set, non-local binds need a token, foreign
Host headers are refused; a run's state comes from status.json (a dead "running" is failed) or its end event."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import run_cli
from tuneforge.ui.app import create_app
from tuneforge.ui.runs import config_differences, find_runs, run_curves, run_state, run_summary

LOCAL = "http://127.0.0.1"


def make_run(root, name, config="model: tiny\nmethod: lora\ntrain:\n  lr: 0.001\n", metrics=(), status=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    return run


@pytest.fixture()
def runs_root(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "one", metrics=[{"step": 1, "loss": 2.0}, {"event": "end", "step": 1}])
    make_run(tmp_path, "outside")  # a run next to, not inside, the runs directory
    (root / "sneaky").symlink_to(tmp_path / "outside")
    return root


@pytest.mark.parametrize("name, status", [
    ("../outside", 400), ("one/../../outside", 400), ("%2e%2e/outside", 400), ("/etc", 400), ("..", 400),
    ("one\\..\\..\\outside", 400), ("sneaky", 404), ("missing", 404), (".", 404), ("", 400)])
def test_run_paths_stay_inside_the_runs_directory(runs_root, name, status):
    client = TestClient(create_app(runs_root), base_url=LOCAL)
    for route in ("/api/run", "/api/curves", "/api/compare"):
        # %2e%2e: sent pre-encoded, arrives as '..' after the server decodes the query string
        url = f"{route}?run={name}" if "%" in name else None
        response = client.get(url) if url else client.get(route, params={"run": name})
        assert response.status_code == status, (route, name, response.text)
    assert client.get("/api/run", params={"run": "one"}).status_code == 200
    review = client.get("/api/review", params={"run": "one", "review": "../../one"})
    assert review.status_code == 400


def test_token_is_needed_on_every_request_and_a_query_token_becomes_a_cookie(runs_root):
    client = TestClient(create_app(runs_root, token="s3cret"), base_url=LOCAL)
    assert client.get("/api/runs").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/static/common.js").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/runs", headers={"X-Tuneforge-Token": "s3cret"}).status_code == 200
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get("/api/runs").status_code == 200  # the cookie set by the visit above


def test_without_a_token_only_local_host_names_are_served(runs_root):
    assert TestClient(create_app(runs_root), base_url="http://localhost:7860").get("/api/runs").status_code == 200
    assert TestClient(create_app(runs_root), base_url="http://attacker.example").get("/api/runs").status_code == 403


def test_a_non_local_bind_needs_a_token(runs_root):
    result = run_cli("ui", "--runs", str(runs_root), "--host", "0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tuneforge: error: --host 0.0.0.0: other machines could read every run and start models; give --token "
        "SECRET as well (or bind to 127.0.0.1)"]


def test_state_from_status_json_and_from_metrics(tmp_path):
    now = time.time()
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    alive = make_run(tmp_path, "alive", status={"state": "running", "pid": os.getpid(), "host": host,
                                                "updated": now, "step": 3, "total_steps": 9})
    crashed = make_run(tmp_path, "crashed", status={"state": "running", "pid": dead.pid, "host": host,
                                                    "updated": now, "step": 3, "total_steps": 9})
    remote_stale = make_run(tmp_path, "remote", status={"state": "running", "pid": 1, "host": "elsewhere",
                                                        "updated": now - 3600})
    failed = make_run(tmp_path, "failed", status={"state": "failed", "pid": 1, "host": host, "error": "CUDA OOM"})
    old_finished = make_run(tmp_path, "old", metrics=[{"event": "end", "step": 4}])
    old_unknown = make_run(tmp_path, "old2", metrics=[{"step": 1, "loss": 1.0}])
    assert run_state(alive, [])["state"] == "running" and run_state(alive, [])["total_steps"] == 9
    # status.json moves at checkpoints only: the progress shown follows metrics.jsonl's newer steps
    assert run_state(alive, [{"step": 5, "loss": 1.0}])["step"] == 5
    assert run_state(crashed, []) == {"state": "failed", "detail": "process ended without finishing", "step": 3,
                                      "total_steps": 9}
    assert run_state(remote_stale, [])["state"] == "failed"
    assert run_state(failed, [])["detail"] == "CUDA OOM"
    assert run_state(old_finished, [{"event": "end", "step": 4}])["state"] == "finished"
    assert run_state(old_unknown, [{"step": 1, "loss": 1.0}])["state"] == "unknown"


def test_runs_list_shows_the_runs_own_eval_scores(tmp_path):
    # `tuneforge eval RUN --compare BASE --out RUN/eval` (what `make demo` does) keeps its summary in the run.
    run = make_run(tmp_path / "runs", "demo", metrics=[{"event": "end", "step": 1}])
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"models": {
        "tuned": {"name": "runs/demo", "scores": {"exact_match": 0.85, "bleu": 97.1}},
        "base": {"name": "smollm2", "scores": {"exact_match": 0.0, "bleu": 1.5}}}, "settings": {}}))
    row = run_summary(tmp_path / "runs", run)
    assert row["eval"] == {"exact_match": 0.85, "bleu": 97.1}


def test_curves_skip_a_torn_line_and_config_differences_list_what_differs(tmp_path):
    run = make_run(tmp_path / "runs", "a", metrics=[
        {"event": "start", "step": 0, "total_steps": 2},
        {"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0},
        {"step": 1, "val_loss": 2.5}])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 2, "loss": 1.')  # cut short by a kill
    curves = run_curves(run)
    assert curves["loss"] == [[1, 2.0]] and curves["val_loss"] == [[1, 2.5]] and curves["tokens_per_s"] == [[1, 100.0]]
    make_run(tmp_path / "runs", "group/b", config="model: tiny\nmethod: dora\ntrain:\n  lr: 0.001\n  epochs: 2\n")
    assert [p.name for p in find_runs(tmp_path / "runs")] and len(find_runs(tmp_path / "runs")) == 2
    differences = config_differences({"a": {"method": "lora", "train": {"lr": 1e-3}, "output_dir": "x"},
                                      "b": {"method": "dora", "train": {"lr": 1e-3, "epochs": 2}, "output_dir": "y"}})
    assert differences == {"method": {"a": "lora", "b": "dora"}, "train.epochs": {"a": None, "b": 2}}


def test_changes_need_json_from_the_dashboards_own_origin(runs_root):
    client = TestClient(create_app(runs_root), base_url=LOCAL)
    body = '{"run": "one", "A": "base:one", "B": "run:one"}'
    # A form or a text/plain post from another site needs no CORS preflight: refused before it is read.
    assert client.post("/api/reviews", content=body, headers={"Content-Type": "text/plain"}).status_code == 403
    assert client.post("/api/reviews", content=body, headers={"Content-Type": "application/json",
                                                              "Origin": "http://evil.example"}).status_code == 403
    same_origin = client.post("/api/reviews", content=body, headers={"Content-Type": "application/json",
                                                                     "Origin": LOCAL})
    assert same_origin.status_code == 400 and same_origin.json()["error"] == "run one: has no trained weights yet"
    bad = client.post("/api/chat", json={"left": {}, "right": {}, "max_new_tokens": "many"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "max_new_tokens: expected a number from 1 to 1024, got 'many'"
    assert client.post("/api/chat", content="{", headers={"Content-Type": "application/json"}).json() == {
        "error": "the request body is not valid JSON"}


def test_tuneforge_ui_command_serves_with_its_token(runs_root):
    import urllib.error
    import urllib.request

    from tests.conftest import ROOT, free_port, wait_until_serving

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tuneforge", "ui", "--runs", str(runs_root), "--port",
                                str(port), "--token", "s3cret"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(process, port, lambda: process.stdout.read(), timeout=60)
        url = f"http://127.0.0.1:{port}/api/runs"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert [run["name"] for run in json.load(answer)] == ["one"]
    finally:
        process.terminate()
        process.wait(timeout=30)
