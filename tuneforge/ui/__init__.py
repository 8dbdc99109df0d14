"""`tuneforge ui`: a local web dashboard over the run directories — runs and their live curves, comparisons, blind
side-by-side human review, and a chat playground.

Every number it shows is read from the run directories (config.yaml, metrics.jsonl, status.json, tuneforge.json,
eval summaries); the only files it writes are review sheets under `<run>/reviews/`.

  runs.py          which runs exist under --runs, their status, key settings and curves (read-only)
  confine.py       request paths resolved and kept inside the runs directory
  review_store.py  a review's prompts, answers and blind order (review.json) and its append-only ratings.jsonl
  review_jobs.py   generating a review's answers in the background
  review_sheet.py  CSV export/import of a review sheet
  review_stats.py  the summary: per-criterion means with t-intervals, win rate (pure functions)
  playground.py    side-by-side chat, on tuneforge.deploy's engine
  settings.py      the answer settings' defaults and ranges (playground, review), for the routes and the pages
  security.py      localhost by default; a token for anything else
  app.py           the FastAPI routes; static/ holds the pages, their JS and CSS
"""
