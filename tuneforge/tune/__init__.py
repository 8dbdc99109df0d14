"""`tuneforge tune`: the recommendation measured on the user's own data.

A hyperparameter search (Optuna: TPE sampling, median pruning) around what `recommend` chooses, inside a wall-clock
budget, scored on the validation data only. Every trial is a real `tuneforge train` run in its own process and run
directory; the search reads its evaluations from metrics.jsonl as they are written and stops a losing trial with
SIGTERM, which the loop turns into a checkpoint and a clean exit. The study (Optuna's SQLite storage), every trial's
run directory and the report live in one study directory, so a killed study continues with `--resume`.

    settings.py   the command's settings (one home of their defaults)
    space.py      the search space: from recommend, or a --space file checked like a config
    trials.py     one trial: its run file, its process, its evaluations, pruning
    study.py      the study: budget, resume, the held-out split, the best trial, the test set once
    report.py     the tables, the plot and best.yaml
"""
