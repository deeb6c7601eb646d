"""Wall time of every stage of `dvc repro` and of the whole study, with each cell's train and evaluate seconds.

    python bench/study_times.py                    # runs `dvc repro`, logs it with timestamps, prints the table
    python bench/study_times.py -- -f train@clip     # arguments after -- go to `dvc repro`
    python bench/study_times.py --log study.log    # the table of an earlier logged run

The log (default runs/study_times.log) has one `HH:MM:SS line` per line of DVC's output, between START and
END lines; a stage's wall time runs from its "Running stage" line to the next stage's line (or END).
Train and evaluate seconds come from each cell's results/runs/<cell>/metrics.json. It measures and prints;
it asserts nothing.
"""
import argparse, json, re, subprocess, sys, time
from datetime import datetime, timezone
from pathlib import Path

STAGE = re.compile(r"(\d\d:\d\d:\d\d) (?:Running stage '([^']+)'|Stage '([^']+)' (?:is cached|didn't change))")


def run_logged(args: list[str], log: Path) -> int:
    "Run `dvc repro ARGS`, echoing and logging each output line with a UTC timestamp; its exit status."
    log.parent.mkdir(parents=True, exist_ok=True)
    stamp = lambda: datetime.now(timezone.utc).strftime("%H:%M:%S")
    t0 = time.time()
    with log.open("w") as f:
        f.write(f"START {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}\n")
        proc = subprocess.Popen(["dvc", "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(f"{stamp()} {line}"); f.flush()
            sys.stdout.write(line)
        rc = proc.wait()
        f.write(f"END {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} rc={rc} elapsed={time.time() - t0:.0f}s\n")
    return rc


def table(log: Path, results: Path = Path("results/runs")) -> str:
    "A Markdown table of the logged run: stage, ran or skipped, wall seconds, seeds, train and evaluate seconds."
    lines = log.read_text().splitlines()
    start = next((l for l in lines if l.startswith("START")), None)
    end = next((l for l in lines if l.startswith("END")), None)
    if start is None: raise SystemExit(f"{log}: no START line; is this a log written by bench/study_times.py?")
    events = [(m[1], m[2] or m[3], "ran" if m[2] else "skipped") for m in map(STAGE.match, lines) if m]
    clock = lambda s: datetime.strptime(s, "%H:%M:%S")
    last = re.search(r"T(\d\d:\d\d:\d\d)Z", end).group(1) if end else lines[-1][:8]
    rows = ["| stage | | wall s | seeds | train s | evaluate s |", "|---|---|---:|---:|---:|---:|"]
    total = 0.0
    for i, (ts, name, how) in enumerate(events):
        sec = (clock(events[i + 1][0] if i + 1 < len(events) else last) - clock(ts)).total_seconds() % 86400
        total += sec
        seeds = train = evaluate = ""
        kind, _, cell = name.partition("@")
        metrics = results / cell / "metrics.json"
        if kind in ("train", "evaluate", "run") and metrics.exists():  # run@: a log from before train and evaluate were split
            timing = json.loads(metrics.read_text()).get("timing", {}).values()
            seeds = str(len(timing))
            if kind in ("train", "run"): train = f"{sum(t['train_seconds'] or 0 for t in timing):.0f}"
            if kind in ("evaluate", "run"): evaluate = f"{sum(t['evaluate_seconds'] for t in timing):.0f}"
        rows.append(f"| {name} | {how} | {sec:.0f} | {seeds} | {train} | {evaluate} |")
    rows.append(f"\nWhole run: {total:.0f} s = {total / 60:.1f} min ({start[6:]} to {end[4:] if end else 'not finished'}).")
    return "\n".join(rows)


if __name__ == "__main__":
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, help="tabulate this log instead of running dvc repro")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    log = a.log or Path("runs/study_times.log")
    if a.log is None:
        rc = run_logged(rest, log)
        if rc: print(f"dvc repro failed (exit {rc}); the table covers the stages that ran", file=sys.stderr)
    elif not log.exists():
        raise SystemExit(f"{log}: no such log; run `python bench/study_times.py` to write one")
    print(table(log))
