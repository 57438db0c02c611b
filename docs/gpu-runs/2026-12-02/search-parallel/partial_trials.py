# Read the per-trial scores out of the four MLflow SQLite files the run returned (4 MB; kept out of the
# repository: partial_trials.txt is what this printed).
import sys, sqlite3

for name in ["search-random-seed0", "search-optuna-seed0", "search-optuna-seed1", "search-optuna-seed2"]:
    db = sqlite3.connect(f"file:docs/gpu-runs/2026-12-02/search-parallel/{name}.db?mode=ro", uri=True)
    parent = db.execute("select run_uuid from runs r where name=? ", (name,)).fetchall()
    rows = db.execute("""select r.run_uuid, r.start_time, r.end_time, r.status,
        (select value from latest_metrics m where m.run_uuid=r.run_uuid and m.key='best_val_exact_match'),
        (select value from tags t where t.run_uuid=r.run_uuid and t.key='runner.kind')
        from runs r order by start_time""").fetchall()
    trials = [r for r in rows if r[5] == 'trial']
    print(name, "parent", parent, "trials", len(trials), "kinds", sorted({str(r[5]) for r in rows}))
    t0 = min(r[1] for r in rows)
    for r in trials: print("  ", (r[1]-t0)/1000, r[2] and (r[2]-t0)/1000, r[3], r[4])
