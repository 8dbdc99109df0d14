"""The dashboard's HTTP routes: static pages under /, JSON under /api/.

Runs are named in query strings (`?run=bench-methods/lora`) and resolved by confine.run_dir, so no route can reach
outside the runs directory. Models are named by what they are relative to a run: "base:<run>" is the base model the
run was trained from (from its own tuneforge.json or config), "run:<run>" the run's trained weights; a request never
names a path on disk.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

# Module level: FastAPI resolves `request: Request` annotations by name in this module (see deploy/server.py).
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from tuneforge.errors import UserError
from tuneforge.run_dir import read_meta
from tuneforge.ui import review_store, runs
from tuneforge.ui.confine import PathRefused, run_dir
from tuneforge.ui.playground import GenerationRequest, Playground
from tuneforge.ui.review_jobs import is_generating, start_generation
from tuneforge.ui.review_stats import CRITERIA, latest_per_prompt, summarize
from tuneforge.ui.security import guard
from tuneforge.ui.settings import ANSWER, fill_page, from_body

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "runs.html", "/run": "run.html", "/compare": "compare.html", "/review": "review.html",
         "/playground": "playground.html"}
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv")


def create_app(runs_root: Path, token: str | None = None) -> FastAPI:
    app = FastAPI(title="tuneforge ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(guard(token))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    playground = Playground()
    app.router.on_shutdown.append(playground.close)

    @app.exception_handler(PathRefused)
    async def path_refused(_request, exc: PathRefused):
        return JSONResponse({"error": str(exc)}, exc.status)

    @app.exception_handler(UserError)
    async def user_error(_request, exc: UserError):
        return JSONResponse({"error": str(exc)}, 400)

    @app.get("/health", include_in_schema=False)
    def health():  # needs no token (security.py): tells scripts the server is up, and nothing else
        return {"status": "ok"}

    for route, page in PAGES.items():
        app.get(route, include_in_schema=False)(_page(STATIC / page))

    def model_of(spec: str) -> tuple[str, str | Path]:
        """(label, what load_for_inference takes) for "base:<run>" or "run:<run>"."""
        kind, _, name = spec.partition(":")
        path = run_dir(runs_root, name)
        if kind == "base":
            base = runs.base_model(path, runs.read_config(path))
            return f"base ({base})", base
        if kind == "run":
            if read_meta(path) is None:
                raise UserError(f"run {name}: has no trained weights yet")
            return f"run {name}", path
        raise UserError(f"model {spec!r}: expected base:<run> or run:<run>")

    # -- runs ----------------------------------------------------------------------------------------------------

    @app.get("/api/runs")
    def list_runs():
        return [runs.run_summary(runs_root, path) for path in runs.find_runs(runs_root)]

    @app.get("/api/run")
    def one_run(run: str):
        path = run_dir(runs_root, run)
        return {"summary": runs.run_summary(runs_root, path), "config": runs.read_config(path),
                "reviews": review_store.list_reviews(path), "data_files": _data_files(path)}

    @app.get("/api/curves")
    def curves(run: str):
        path = run_dir(runs_root, run)
        return {"curves": runs.run_curves(path), "status": runs.run_summary(runs_root, path)["status"]}

    @app.get("/api/compare")
    def compare(run: list[str] = Query(default=[])):
        paths = {name: run_dir(runs_root, name) for name in run}
        return {"curves": {name: runs.run_curves(path) for name, path in paths.items()},
                "differences": runs.config_differences({name: runs.read_config(p) for name, p in paths.items()})}

    # -- review --------------------------------------------------------------------------------------------------

    @app.post("/api/reviews")
    async def new_review(request: Request):
        body = await _json_body(request)
        path = run_dir(runs_root, str(body.get("run", "")))
        systems = {}
        for system in ("A", "B"):
            label, model = model_of(str(body.get(system, "")))
            systems[system] = {"label": label, "spec": body[system], "model": str(model)}
        if systems["A"]["model"] == systems["B"]["model"]:
            raise UserError("the two systems are the same model: pick two different ones")
        prompts, references, source = _review_prompts(path, body)
        limit = from_body(body, "limit")
        prompts, references = prompts[:limit], references[:limit]
        max_new_tokens = from_body(body, "max_new_tokens")
        review = review_store.create_review(path, prompts, references, systems, source,
                                            {"max_new_tokens": max_new_tokens, "decoding": "greedy"})
        start_generation(path, review, max_new_tokens, batch_size=ANSWER.review_batch_size)
        return {"id": review["id"]}

    @app.get("/api/review")
    def show_review(run: str, review: str):
        path = run_dir(runs_root, run)
        shown = review_store.load_review(path, review)
        if shown["state"] == "generating" and not is_generating(review):  # the UI that generated it stopped
            shown |= {"state": "failed", "error": "generating the answers was interrupted; start the review again"}
        folder = review_store.review_dir(path, review)
        items = review_store.blind_items(shown, review_store.latest_ratings(folder)) \
            if shown["state"] == "ready" else []
        return {key: shown[key] for key in ("id", "state", "progress", "error", "source")} | {
            "items": items, "criteria": CRITERIA}

    @app.post("/api/rating")
    async def save_rating(request: Request, run: str, review: str):
        path = run_dir(runs_root, run)
        shown = review_store.load_review(path, review)
        if shown["state"] != "ready":
            raise UserError(f"review {review}: answers are not ready yet")
        line = review_store.from_positions(shown, await _json_body(request))
        review_store.append_ratings(review_store.review_dir(path, review), [line])
        return {"saved": line["prompt"]}

    @app.get("/api/review/summary")
    def review_summary(run: str, review: str):
        path = run_dir(runs_root, run)
        shown = review_store.load_review(path, review)
        lines = review_store.read_ratings(review_store.review_dir(path, review))
        items = shown["items"]
        return {"summary": summarize(lines), "systems": shown["systems"], "prompts": len(items),
                "rated": [{"index": i, "question": items[i]["prompt"][-1]["content"],
                           "answers": items[i]["answers"], "preferred": line["preferred"],
                           "ratings": line["ratings"]} for i, line in latest_per_prompt(lines).items()]}

    # -- playground ----------------------------------------------------------------------------------------------

    @app.post("/api/chat")
    async def chat(request: Request):
        """Two conversations (each side keeps its own history), answered at once: {"left": {"model", "messages"},
        "right": {...}, "max_new_tokens", "temperature", "top_p"}."""
        body = await _json_body(request)
        settings = {name: from_body(body, name) for name in ("max_new_tokens", "temperature", "top_p")}
        sides = [body.get(side) or {} for side in ("left", "right")]
        models = [model_of(str(side.get("model", ""))) for side in sides]
        answers = await asyncio.gather(*(
            playground.answer(model, GenerationRequest(messages=list(side.get("messages") or []), **settings))
            for side, (_label, model) in zip(sides, models)))
        return {"answers": answers, "labels": [label for label, _model in models]}

    return app


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise UserError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def _page(file: Path):
    async def page():
        # Read at each request, as a static file would be; the inputs' defaults and bounds filled in (settings.py).
        return HTMLResponse(fill_page(file.read_text(encoding="utf-8")), headers={"Cache-Control": "no-store"})

    return page


def _data_files(run: Path) -> list[str]:
    """Evaluation files a review may read by path: the data files named in the run's own config that exist."""
    data = runs.read_config(run).get("data") or {}
    named = []
    for key in ("val", "train"):
        value = data.get(key)
        sources = value if isinstance(value, list) else [value]
        named += [s.get("path") if isinstance(s, dict) else s for s in sources]
    return [str(name) for name in dict.fromkeys(named) if isinstance(name, str) and Path(name).is_file()]


def _review_prompts(run: Path, body: dict) -> tuple[list, list, str]:
    """Prompts and references from an uploaded file's text, or from one of the run's own data files."""
    from tuneforge.eval.compare import prompts_and_references

    if body.get("data_text"):
        name = Path(str(body.get("data_name") or "prompts.jsonl")).name
        if not name.endswith(UPLOAD_SUFFIXES):
            raise UserError(f"evaluation file {name!r}: expected {', '.join(UPLOAD_SUFFIXES)}")
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / name
            copy.write_text(str(body["data_text"]), encoding="utf-8")
            prompts, references = prompts_and_references(str(copy))
        return prompts, references, f"uploaded {name}"
    data_file = str(body.get("data_file", ""))
    if data_file not in _data_files(run):
        raise UserError(f"evaluation file {data_file!r}: upload it, or pick one of the run's data files")
    prompts, references = prompts_and_references(data_file)
    return prompts, references, data_file
