"""Review storage: the blind order is drawn once and kept, ratings are append-only and survive a torn line, the page's
positions map back to the right system, and the CSV sheet round-trips (and refuses bad cells, appending nothing)."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import run_cli
from tuneforge.errors import UserError
from tuneforge.ui.review_sheet import SCORE_COLUMNS, export_sheet, find_review, import_sheet
from tuneforge.ui.review_stats import CRITERIA
from tuneforge.ui.review_store import (RATINGS_FILE, append_ratings, blind_items, create_review, from_positions,
                                       latest_ratings, load_review, read_ratings, review_dir, save_review)

QUESTIONS = ["Name a colour.", "Say hi.", "Count to three."]


def ready_review(run) -> dict:
    """A review whose answers are in: A answers "a: <question>", B answers "b: <question>"."""
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text("model: tiny\nmethod: lora\n")
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    review = create_review(run, prompts, ["ref"] * 3, {"A": {"label": "base"}, "B": {"label": "tuned"}}, "test", {})
    for item in review["items"]:
        item["answers"] = {s: f"{s.lower()}: {QUESTIONS[item['index']]}" for s in ("A", "B")}
    review["state"] = "ready"
    save_review(run, review)
    return review


def scores(value: int) -> dict:
    return {c: value for c in CRITERIA}


def test_blind_order_is_stored_and_positions_map_back_to_systems(tmp_path):
    review = ready_review(tmp_path / "run")
    again = load_review(tmp_path / "run", review["id"])
    assert [i["order"] for i in again["items"]] == [i["order"] for i in review["items"]]
    for item in review["items"]:
        assert sorted(item["order"]) == ["A", "B"]
    shown = blind_items(again, {})
    first = shown[0]
    position_of_b = str(first["answers"].index("b: Name a colour.") + 1)
    position_of_a = "1" if position_of_b == "2" else "2"
    line = from_positions(again, {"prompt": 0, "ratings": {position_of_b: scores(5), position_of_a: scores(2)},
                                  "preferred": position_of_b})
    assert line["ratings"] == {"B": scores(5), "A": scores(2)} and line["preferred"] == "B"
    folder = review_dir(tmp_path / "run", review["id"])
    append_ratings(folder, [line])
    saved = blind_items(again, latest_ratings(folder))[0]["saved"]
    assert saved == {"ratings": {position_of_b: scores(5), position_of_a: scores(2)}, "preferred": position_of_b}


def test_bad_ratings_are_refused_by_position_without_naming_the_system(tmp_path):
    review = ready_review(tmp_path / "run")
    with pytest.raises(UserError, match=r"prompt 1, answer 2, safety: expected a whole number from 1 to 5, got 6"):
        from_positions(review, {"prompt": 1, "ratings": {"1": scores(3), "2": {**scores(3), "safety": 6}},
                                "preferred": "tie"})
    with pytest.raises(UserError, match="preferred: expected 1, 2 or tie"):
        from_positions(review, {"prompt": 1, "ratings": {"1": scores(3), "2": scores(3)}, "preferred": "A"})
    with pytest.raises(UserError, match="prompt: expected an index from 0 to 2"):
        from_positions(review, {"prompt": 3, "ratings": {}, "preferred": "tie"})


def test_ratings_are_appended_and_a_line_torn_by_a_crash_loses_only_itself(tmp_path):
    append_ratings(tmp_path, [{"prompt": 0, "preferred": "A", "ratings": {}}])
    with (tmp_path / RATINGS_FILE).open("a") as fh:
        fh.write('{"prompt": 1, "prefer')  # the process died mid-write
    append_ratings(tmp_path, [{"prompt": 2, "preferred": "tie", "ratings": {}}])
    assert [line["prompt"] for line in read_ratings(tmp_path)] == [0, 2]


def fill_sheet(path, values: dict[int, dict]) -> None:
    """Fill rows of an exported sheet: {prompt: {column: value}}."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        rows, columns = list(reader), reader.fieldnames
    for row in rows:
        row.update(values.get(int(row["prompt"]), {}))
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_csv_sheet_round_trip_through_the_cli(tmp_path):
    run = tmp_path / "run"
    review = ready_review(run)
    folder = review_dir(run, review["id"])
    sheet = tmp_path / "sheet.csv"
    exported = run_cli("review", "export", str(run), "-o", str(sheet))
    assert exported.returncode == 0, exported.stderr
    with sheet.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["question"] for r in rows] == QUESTIONS and "tuned" not in sheet.read_text()  # blind
    first_is_b = rows[0]["answer_1"].startswith("b:")
    fill_sheet(sheet, {0: {**{c: "4" for c in SCORE_COLUMNS}, "relevance_1": "5", "preferred": "1"},
                       2: {**{c: "2" for c in SCORE_COLUMNS}, "preferred": "tie"}})  # row of prompt 1 left blank

    imported = run_cli("review", "import", str(sheet))
    assert imported.returncode == 0, imported.stderr
    latest = latest_ratings(folder)
    assert sorted(latest) == [0, 2]
    shown_first = "B" if first_is_b else "A"
    assert latest[0]["preferred"] == shown_first and latest[0]["ratings"][shown_first]["relevance"] == 5
    assert latest[2]["preferred"] == "tie" and latest[2]["source"] == "csv"

    again, added = import_sheet(sheet)  # the same sheet again: nothing new
    assert added == 0 and again == folder
    re_export = tmp_path / "again.csv"
    export_sheet(find_review(folder), re_export)  # saved ratings come back in the same blind positions
    assert re_export.read_text(encoding="utf-8").splitlines()[1:] == sheet.read_text(encoding="utf-8").splitlines()[1:]


def test_csv_import_refuses_a_bad_cell_with_row_and_column_and_appends_nothing(tmp_path):
    run = tmp_path / "run"
    review = ready_review(run)
    folder = review_dir(run, review["id"])
    sheet = tmp_path / "sheet.csv"
    export_sheet(folder, sheet)
    fill_sheet(sheet, {0: {**{c: "3" for c in SCORE_COLUMNS}, "preferred": "2"},
                       1: {**{c: "3" for c in SCORE_COLUMNS}, "helpfulness_2": "7", "preferred": "1"}})
    before = (folder / RATINGS_FILE).read_bytes() if (folder / RATINGS_FILE).exists() else b""
    result = run_cli("review", "import", str(sheet))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "row 3, column helpfulness_2: expected a whole number from 1 to 5, got '7'" in \
        message[0], result.stderr
    after = (folder / RATINGS_FILE).read_bytes() if (folder / RATINGS_FILE).exists() else b""
    assert after == before
    fill_sheet(sheet, {1: {"helpfulness_2": "", "preferred": "1"}})
    with pytest.raises(UserError, match="row 3, column helpfulness_2: expected a whole number from 1 to 5, got ''"):
        import_sheet(sheet)
    assert json.loads((folder / "review.json").read_text())["id"] == review["id"]


def test_a_review_left_generating_by_a_stopped_ui_shows_as_interrupted(tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.ui.app import create_app

    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    review = ready_review(run)
    review["state"] = "generating"  # as a UI killed mid-generation leaves it
    save_review(run, review)
    client = TestClient(create_app(tmp_path / "runs"), base_url="http://127.0.0.1")
    shown = client.get("/api/review", params={"run": "run", "review": review["id"]}).json()
    assert shown["state"] == "failed" and "interrupted" in shown["error"] and shown["items"] == []
