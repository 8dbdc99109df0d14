"""`tuneforge ui` (the web dashboard) and `tuneforge review export|import` (a review sheet as CSV)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneforge.errors import UserError


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from tuneforge.ui.app import create_app
    from tuneforge.ui.security import check_bind

    check_bind(args.host, args.token)
    runs = Path(args.runs)
    if not runs.is_dir():
        raise UserError(f"--runs {runs}: not a directory (train a run first, or point --runs at your runs folder)")
    address = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
    print(f"tuneforge ui: runs in {runs.resolve()} on {address}" + ("?token=..." if args.token else ""), flush=True)
    uvicorn.run(create_app(runs, args.token), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


def cmd_review_export(args: argparse.Namespace) -> int:
    from tuneforge.ui.review_sheet import export_sheet, find_review

    folder = find_review(Path(args.run_or_review))
    count = export_sheet(folder, Path(args.out))
    print(f"wrote {args.out}: {count} prompts of review {folder.name} (answers blind, as numbered in the UI)")
    return 0


def cmd_review_import(args: argparse.Namespace) -> int:
    from tuneforge.ui.review_sheet import import_sheet

    folder, added = import_sheet(Path(args.sheet), Path(args.into) if args.into else None)
    print(f"review {folder.name}: {added} new or changed ratings appended to {folder / 'ratings.jsonl'}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("ui", help="web dashboard: runs, live curves, compare, blind review, playground",
                       description="A local web app over your run directories. Binds 127.0.0.1 unless told; a "
                                   "non-local --host needs --token.")
    p.add_argument("--runs", default="runs", help="the folder holding run directories (default: runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="required on every request (open the page once with ?token=TOKEN)")
    p.set_defaults(func=cmd_ui)

    review = sub.add_parser("review", help="move a blind review sheet (CSV) to reviewers without the UI and back")
    actions = review.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write a review's prompts, blind answers and ratings so far as CSV")
    export.add_argument("run_or_review", help="a review folder (<run>/reviews/<id>) or a run (its newest review)")
    export.add_argument("-o", "--out", required=True, help="the CSV file to write")
    export.set_defaults(func=cmd_review_export)
    imp = actions.add_parser("import", help="append a filled-in sheet's ratings (checked first: all or nothing)")
    imp.add_argument("sheet", help="a CSV written by `tuneforge review export` and filled in")
    imp.add_argument("--into", help="the review folder, when it moved since the export")
    imp.set_defaults(func=cmd_review_import)
