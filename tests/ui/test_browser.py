"""The dashboard in a real headless chromium (Playwright): the runs list; a run page whose curve gains points while a
real tiny training run writes metrics; a blind review of three prompts completed, reloaded and summarised (checked
against review_stats on the saved ratings); the playground answering from both sides (checked against tuneforge's
own generation). Screenshots of the run, review and playground pages go to docs/screenshots/."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO_STEPS, EMBEDDED, ROOT, serve_in_thread, write_jsonl
from tuneforge.run_dir import read_metrics
from tuneforge.ui.app import create_app

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
QUESTIONS = ["Repeat the number 3.", "Repeat the number 5.", "Repeat the number 1."]
WAIT_MS = 60_000
LOSS_POINTS = "document.querySelector('svg.chart[data-title=\"loss\"]').dataset.points"
TRAIN_LOSS_POINTS = "document.querySelector('path[data-name=\"train loss\"]').dataset.points"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, demo_run) -> Path:
    """runs/tuned: a copy of the session's finished LoRA run on the embedded SmolLM2-135M (tests/conftest.py), for
    the review and the playground: a tiny random model answers only whitespace, which would test and show nothing.
    The review writes into it, so it is a copy."""
    root = tmp_path_factory.mktemp("ui-runs")
    write_jsonl(root.parent / "train.jsonl", [{"instruction": f"Repeat the number {i % 7}.",
                                               "output": f"{i % 7} {i % 7} {i % 7}"} for i in range(48)])
    shutil.copytree(demo_run.run_dir, root / "tuned")
    return root


@pytest.fixture(scope="module")
def ui_url(runs_root):
    url, stop = serve_in_thread(create_app(runs_root))
    yield url
    stop()


def points(page, title: str) -> int:
    return int(page.locator(f'svg.chart[data-title="{title}"]').get_attribute("data-points"))


def test_runs_list_shows_each_run_with_status_method_and_settings(page, ui_url):
    page.goto(ui_url + "/")
    row = page.locator('tr[data-run="tuned"]')
    row.wait_for(timeout=WAIT_MS)
    text = row.inner_text()
    for shown in ("finished", "smollm2-135m-instruct", "lora", "lr=5.00e-4", f"max_steps={DEMO_STEPS}", "r=16",
                  f"{DEMO_STEPS}/{DEMO_STEPS}"):
        assert shown in text, (shown, text)


def test_run_page_curve_gains_points_while_the_run_trains(page, ui_url, runs_root, tiny_model_dir):
    """A real `tuneforge train` of the tiny random Llama, long enough never to end by itself: the page must show it
    running and its curve growing, then (after SIGTERM: checkpoint and exit 75) stopped, with every logged step."""
    run_file = runs_root.parent / "live.yaml"
    run_file.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output_dir": str(runs_root / "live"),
        "data": {"train": str(runs_root.parent / "train.jsonl"), "val_split": 0.125},
        "train": {"max_steps": 100_000, "batch_size": 2, "lr": 3e-3, "log_every": 1, "eval_every": 50,
                  "warmup_ratio": 0.002}}))  # warmup over the first 200 steps: a learning rate curve that shows
    trainer = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(run_file), "--quiet"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = runs_root / "live" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and '"loss"' in metrics.read_text()):
            assert time.monotonic() < deadline and trainer.poll() is None, trainer.stdout.read()
            time.sleep(0.05)

        page.goto(ui_url + "/run?run=live")
        page.locator('svg.chart[data-title="loss"]').wait_for(timeout=WAIT_MS)
        seen = [points(page, "loss")]
        assert page.locator(".badge").first.inner_text() == "running"
        for _ in range(2):  # two later redraws, each with more points: the page polls while metrics.jsonl grows
            page.wait_for_function(f"{LOSS_POINTS} > {seen[-1]}", timeout=WAIT_MS)
            seen.append(points(page, "loss"))
        assert seen[0] < seen[1] < seen[2]
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "run-page.png"), full_page=True)
    finally:
        trainer.send_signal(signal.SIGTERM)  # the trainer's own stop: finish the step, checkpoint, exit 75
        output = trainer.communicate(timeout=120)[0]
    assert trainer.returncode == 75, output

    page.locator(".badge.stopped").wait_for(timeout=WAIT_MS)
    steps = len([r for r in read_metrics(runs_root / "live") if "loss" in r])
    page.wait_for_function(f"{TRAIN_LOSS_POINTS} == {steps}", timeout=WAIT_MS)  # every logged step, none lost
    assert points(page, "learning rate") == steps == points(page, "tokens/s") == points(page, "grad norm")


def test_compare_overlays_the_selected_runs_and_lists_config_differences(page, ui_url, runs_root):
    page.goto(ui_url + "/")
    for name in ("tuned", "live"):
        page.locator(f'tr[data-run="{name}"] input[type=checkbox]').check()
    page.click("#compare")
    page.locator('svg.chart[data-title="train loss"]').wait_for(timeout=WAIT_MS)
    paths = page.locator('svg.chart[data-title="train loss"] path.series')
    assert sorted(paths.nth(i).get_attribute("data-name") for i in range(2)) == ["live", "tuned"]
    assert points(page, "train loss") == len([r for r in read_metrics(runs_root / "live") if "loss" in r]) + DEMO_STEPS
    differences = page.locator("#differences").inner_text()
    assert "model" in differences and "train.max_steps" in differences and "output_dir" not in differences


def rate(card, first: int, second: int, preferred: str) -> None:
    for criterion in ("relevance", "correctness", "helpfulness", "safety", "format"):
        card.locator(f'select[name="{criterion}-1"]').select_option(str(first))
        card.locator(f'select[name="{criterion}-2"]').select_option(str(second))
    card.locator(f'input[type=radio][value="{preferred}"]').check()
    card.locator("button.save").click()


def test_blind_review_of_three_prompts_is_kept_on_reload_and_summarised(page, ui_url, runs_root, tmp_path):
    from tuneforge.ui.review_stats import summarize
    from tuneforge.ui.review_store import read_ratings

    prompts = write_jsonl(tmp_path / "review.jsonl", [{"instruction": q, "output": "x"} for q in QUESTIONS])
    page.goto(ui_url + "/review?run=tuned")
    page.locator('#system-b option[value="run:tuned"]').wait_for(state="attached", timeout=WAIT_MS)
    page.select_option("#system-a", "base:tuned")
    page.select_option("#system-b", "run:tuned")
    page.set_input_files("#upload", str(prompts))
    page.fill('input[name="max_new_tokens"]', "12")
    page.click("#create")
    cards = page.locator(".card[data-prompt]")
    cards.nth(2).wait_for(timeout=WAIT_MS)
    assert cards.count() == 3
    assert "base" not in page.locator("#cards").inner_text()  # blind: no system names on the sheet

    plan = {0: (4, 2, "1"), 1: (1, 5, "2"), 2: (3, 3, "tie")}  # position 1 score, position 2 score, preferred
    for index, (first, second, preferred) in plan.items():
        card = cards.nth(index)
        rate(card, first, second, preferred)
        page.locator(f'.card.saved[data-prompt="{index}"]').wait_for(timeout=WAIT_MS)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "review-page.png"), full_page=True)

    page.reload()
    page.locator(".card.saved[data-prompt]").nth(2).wait_for(timeout=WAIT_MS)
    for index, (first, second, preferred) in plan.items():
        card = page.locator(f'.card[data-prompt="{index}"]')
        assert card.locator('select[name="correctness-1"]').input_value() == str(first)
        assert card.locator('select[name="format-2"]').input_value() == str(second)
        assert card.locator(f'input[type=radio][value="{preferred}"]').is_checked()

    folder = next((runs_root / "tuned" / "reviews").iterdir())
    review = json.loads((folder / "review.json").read_text())
    lines = read_ratings(folder)
    assert len(lines) == 3
    for line in lines:  # what was clicked, by position, is what was saved, by system
        order = review["items"][line["prompt"]]["order"]
        first, second, preferred = plan[line["prompt"]]
        assert line["ratings"][order[0]]["helpfulness"] == first and line["ratings"][order[1]]["safety"] == second
        assert line["preferred"] == ("tie" if preferred == "tie" else order[int(preferred) - 1])

    page.click("#summary-link")
    page.locator("#summary-table").wait_for(timeout=WAIT_MS)
    expected = summarize(lines)
    for system in ("A", "B"):
        cell = page.locator(f'td[data-criterion="relevance"][data-system="{system}"]')
        want = expected["criteria"]["relevance"][system]
        assert float(cell.get_attribute("data-mean")) == pytest.approx(want["mean"])
        low, high = want["low"], want["high"]
        assert f"[{low:.2f}, {high:.2f}]" in cell.inner_text()
        rate_text = page.locator(f'td[data-win-rate="{system}"]').inner_text()
        assert rate_text == f"{100 * expected['win_rate'][system]:.1f}%"
    assert page.locator("td[data-ties]").inner_text() == "1"
    assert "base (" in page.locator("#summary-table").inner_text()  # un-blinded here


def test_playground_answers_from_base_and_tuned_side_by_side(page, ui_url, runs_root):
    from tuneforge.eval.generation import generate_replies
    from tuneforge.model.trained import load_for_inference

    page.goto(ui_url + "/playground?run=tuned")
    page.locator('#right option[value="run:tuned"]').wait_for(state="attached", timeout=WAIT_MS)
    assert page.locator("#left").input_value() == "base:tuned"
    page.fill("#max-new-tokens", "10")
    page.fill("#message", QUESTIONS[0])
    page.click("#send")
    page.locator("#log-left .turn.assistant").wait_for(timeout=WAIT_MS)
    page.locator("#log-right .turn.assistant").wait_for(timeout=WAIT_MS)
    shown = [page.locator(f"#log-{side} .turn.assistant .text").inner_text() for side in ("left", "right")]
    conversation = [{"role": "user", "content": QUESTIONS[0]}]
    expected = [generate_replies(*load_for_inference(source), [conversation], max_new_tokens=10)[0]
                for source in (EMBEDDED, str(runs_root / "tuned"))]
    assert all(expected) and [s.strip() for s in shown] == expected
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)


def test_run_page_plots_a_preference_runs_rewards_and_reward_accuracy(page, ui_url, runs_root, tiny_model_dir):
    """A real DPO run of the tiny random Llama: the run page adds a rewards chart (chosen, rejected, margin) and a
    reward accuracy chart (train every step, validation dots), one point per logged value; a supervised run's page
    has neither."""
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    pairs = write_jsonl(runs_root.parent / "pairs.jsonl", [
        {"prompt": f"Add {i} and {i}.", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 3}, probably."}
        for i in range(24)])
    train(load_config(None, [f"model={tiny_model_dir}", "objective=dpo", f"data.train={pairs}", "data.val_split=0.25",
                             f"output_dir={runs_root / 'dpo'}", "train.epochs=2", "train.batch_size=6",
                             "train.eval_every=2", "train.save_every=0"]), show_progress=False)
    records = read_metrics(runs_root / "dpo")
    steps = len([r for r in records if "reward_accuracy" in r])
    validations = len([r for r in records if "val_reward_accuracy" in r])
    assert steps == 6 and validations == 3
    page.goto(ui_url + "/run?run=dpo")
    page.locator('svg.chart[data-title="reward accuracy"]').wait_for(timeout=WAIT_MS)
    assert points(page, "reward accuracy") == steps + validations
    assert points(page, "rewards") == 3 * steps + validations
    page.goto(ui_url + "/run?run=tuned")
    page.locator('svg.chart[data-title="loss"]').wait_for(timeout=WAIT_MS)
    assert page.locator('svg.chart[data-title="rewards"]').count() == 0
