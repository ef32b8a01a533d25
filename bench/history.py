#!/usr/bin/env python3
"""Helpers of bench/history (stdlib only).

  history.py layout SHARE --files M
      the share's files: cold/ (report.txt and 20 more files, never
      written again after the start) and hot/ (M files in M/50 directories, rewritten round-robin)
  history.py gen SHARE --db DB --until N --closes K --files M
                 --snapshot-every E --state FILE --daemon-pid PID -- SNAPSHOT_CMD...
      writes K hot files (K closes), waits until the daemon shipped a new
      version batch, and again, until the share's history has N daemon
      batches; runs SNAPSHOT_CMD whenever E batches were shipped since the
      last snapshot. FILE (JSON) carries the position, the batch count at
      the last snapshot and the timings from one call to the next.
  history.py batches DB
      how many version batches the daemon has shipped (its state database)
  history.py mark-snapshot --db DB --state FILE
      a snapshot was just taken (outside gen): count from here
  history.py requests STATS_LINE
      one line about a command's BTRSHIP_STATS=1 line, for the progress log
  history.py report RESULTS STATE JSON_OUT
      the table and the JSON

The batch count is the number of `versions` events in the daemon's state
database (one per shipped version batch; the daemon logs the same line
with BTRSHIP_LOG=info). Nothing here reads the repository.
"""

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time

HOT_PER_DIR = 50
COLD_FILES = 20


def hot_path(j, files):
    dirs = max(1, files // HOT_PER_DIR)
    return f"hot/d{j % dirs:03d}/f{j:05d}.txt"


def layout(a):
    for j in range(COLD_FILES):
        os.makedirs(f"{a.share}/cold", exist_ok=True)
        with open(f"{a.share}/cold/c{j:02d}.txt", "w") as f:
            f.write(f"cold file {j}\n" * 8)
    with open(f"{a.share}/cold/report.txt", "w") as f:
        f.write("report v0\n")
    for j in range(a.files):
        p = f"{a.share}/{hot_path(j, a.files)}"
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(f"hot file {j} v0\n")


def batch_count(db):
    c = sqlite3.connect(db, timeout=30)
    try:
        return c.execute("SELECT count(*) FROM events WHERE kind = 'versions'").fetchone()[0]
    finally:
        c.close()


def load_state(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"next_close": 0, "last_snapshot_at": 0, "segments": []}


def save_state(path, st):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f, indent=1)
    os.replace(tmp, path)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def alive(pid):
    """Running (not gone, not a zombie waiting for bench/history to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def gen(a):
    st = load_state(a.state)
    c = sqlite3.connect(a.db, timeout=30)
    # Polled every 2 ms: the newest batch event's id (an index lookup), the
    # count only of the events after the last one seen.
    last_id = c.execute("SELECT coalesce(max(id), 0) FROM events WHERE kind = 'versions'").fetchone()[0]
    start_batches = n = c.execute(
        "SELECT count(*) FROM events WHERE kind = 'versions' AND id <= ?", (last_id,)).fetchone()[0]

    def count():
        nonlocal last_id
        newest = c.execute("SELECT coalesce(max(id), 0) FROM events WHERE kind = 'versions'").fetchone()[0]
        if newest == last_id:
            return n
        new = c.execute("SELECT count(*) FROM events WHERE kind = 'versions' AND id > ? AND id <= ?",
                        (last_id, newest)).fetchone()[0]
        last_id = newest
        return n + new

    started = time.monotonic()
    shown = started
    snaps = 0
    snap_s = 0.0
    closes = 0
    i = st["next_close"]
    while n < a.until:
        if a.snapshot_every and n - st["last_snapshot_at"] >= a.snapshot_every:
            t = time.monotonic()
            r = subprocess.run(a.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                sys.exit(f"history.py gen: snapshot failed (exit {r.returncode}): {r.stderr.strip()}")
            snap_s += time.monotonic() - t
            snaps += 1
            st["last_snapshot_at"] = n
        for _ in range(a.closes):
            j = i % a.files
            with open(f"{a.share}/{hot_path(j, a.files)}", "w") as f:
                f.write(f"hot file {j} v{i // a.files + 1} close {i}\n")
            i += 1
            closes += 1
        deadline = time.monotonic() + 120
        while True:
            m = count()
            if m > n:
                n = m
                break
            if time.monotonic() > deadline or not alive(a.daemon_pid):
                sys.exit(f"history.py gen: the daemon shipped no version batch for 120 s "
                         f"(at {n} batches; daemon {'running' if alive(a.daemon_pid) else 'gone'})")
            time.sleep(0.002)
        now = time.monotonic()
        if now - shown >= 10:
            shown = now
            log(f"  {n}/{a.until} batches, {(n - start_batches) / (now - started):.1f} batches/s "
                f"(snapshots included), {snaps} snapshots")
    seconds = time.monotonic() - started
    st["next_close"] = i
    seg = {
        "from_batches": start_batches,
        "to_batches": n,
        "batches": n - start_batches,
        "closes": closes,
        "snapshots": snaps,
        "seconds": round(seconds, 3),
        "snapshot_seconds": round(snap_s, 3),
        "batches_per_s": round((n - start_batches) / seconds, 2) if seconds > 0 else None,
        "batches_per_s_without_snapshots": round((n - start_batches) / (seconds - snap_s), 2)
        if seconds > snap_s else None,
    }
    st["segments"].append(seg)
    save_state(a.state, st)
    log(f"  {n} batches: {seg['batches']} new in {seconds:.1f} s = {seg['batches_per_s']} batches/s "
        f"({closes} closes, {snaps} snapshots taking {snap_s:.1f} s)")


def mark_snapshot(a):
    st = load_state(a.state)
    st["last_snapshot_at"] = batch_count(a.db)
    save_state(a.state, st)


# ---------------------------------------------------------------- report

ROWS = [
    ("ls", "ls NAME --at now cold"),
    ("versions", "versions NAME cold/report.txt"),
    ("restore", "restore --at now --path cold/report.txt"),
    ("fresh_restore", "fresh machine: restore --repo --key-file --path"),
    ("snapshot", "snapshot NAME"),
]
RATIO_TARGET = 1.5
FRESH_REQUESTS_TARGET = 200


def num(v):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def report(a):
    meta, points = {}, {}
    with open(a.results) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" not in line:
                continue
            k, v = line.split("=", 1)
            parts = k.split(".")
            if parts[0] == "meta":
                meta[parts[1]] = num(v)
            elif parts[0] == "point":
                p = points.setdefault(int(parts[1]), {})
                if len(parts) == 3:
                    p[parts[2]] = num(v)
                else:
                    cmd = p.setdefault(parts[2], {})
                    cmd[parts[3]] = json.loads(v)["btrship_stats"] if parts[3] == "stats" else num(v)
    st = load_state(a.state)
    pts = sorted(points)
    for p in pts:
        for key, _ in ROWS:
            c = points[p].get(key)
            if c and isinstance(c.get("stats"), dict):
                c["requests"] = c["stats"]["store"]["requests"]

    def ratio(vals):
        if len(vals) < 2 or vals[0] in (None, 0) or vals[-1] is None:
            return None
        return vals[-1] / vals[0]

    head = ["command", "metric"] + [f"{points[p].get('batches', p)}" for p in pts] + \
        [f"ratio {points[pts[-1]].get('batches', pts[-1])}/{points[pts[0]].get('batches', pts[0])}"
         if len(pts) > 1 else "ratio", "target", "met"]
    table, rows_json = [], []
    for key, label in ROWS:
        for metric, unit, fmt in (("wall_s", "wall s", "{:.2f}"), ("requests", "requests", "{:d}")):
            vals = [points[p].get(key, {}).get(metric) for p in pts]
            r = ratio(vals)
            met = "" if r is None else ("yes" if r <= RATIO_TARGET else "no")
            table.append([label if metric == "wall_s" else "", unit]
                         + ["-" if v is None else fmt.format(v) for v in vals]
                         + ["-" if r is None else f"{r:.2f}x", f"<= {RATIO_TARGET}x", met])
            rows_json.append({"command": key, "label": label, "metric": metric,
                              "by_batches": {str(points[p].get("batches", p)): v for p, v in zip(pts, vals)},
                              "ratio_largest_smallest": None if r is None else round(r, 3),
                              "target_ratio": RATIO_TARGET,
                              "target_met": None if r is None else r <= RATIO_TARGET})
    fresh = points[pts[-1]].get("fresh_restore", {}).get("requests") if pts else None
    fresh_met = None if fresh is None else fresh <= FRESH_REQUESTS_TARGET
    table.append(["fresh machine restore at the largest point (target: S3)", "requests",
                  *([""] * (len(pts) - 1)), "-" if fresh is None else str(fresh), "",
                  f"<= {FRESH_REQUESTS_TARGET}", "" if fresh_met is None else ("yes" if fresh_met else "no")])

    widths = [max(len(str(row[i])) for row in table + [head]) for i in range(len(head))]

    def line(row):
        cells = []
        for i, c in enumerate(row):
            left = i < 2 or i >= len(head) - 2
            cells.append(str(c).ljust(widths[i]) if left else str(c).rjust(widths[i]))
        return "  ".join(cells).rstrip()

    gen_batches = sum(s["batches"] for s in st["segments"])
    gen_seconds = sum(s["seconds"] for s in st["segments"])
    gen_snap = sum(s["snapshot_seconds"] for s in st["segments"])
    generator = {
        "method": "the real daemon (btrship daemon, settle_ms = 0) and closes written by a loop",
        "closes_per_batch_written": meta.get("closes"),
        "batches": gen_batches,
        "seconds": round(gen_seconds, 1),
        "snapshots": sum(s["snapshots"] for s in st["segments"]),
        "snapshot_seconds": round(gen_snap, 1),
        "batches_per_s": round(gen_batches / gen_seconds, 1) if gen_seconds else None,
        "batches_per_s_without_snapshots": round(gen_batches / (gen_seconds - gen_snap), 1)
        if gen_seconds > gen_snap else None,
        "segments": st["segments"],
    }

    print()
    print(f"btrship {meta.get('btrship_rev')}: command cost by history length "
          f"({meta.get('repo_kind')} repository; columns: daemon version batches shipped)")
    print(f"history: {meta.get('closes')} closes written per batch over {meta.get('files')} hot files, "
          f"a snapshot every {meta.get('snapshot_every')} batches; caches dropped before each command")
    print(f"generator: {gen_batches} batches in {gen_seconds:.0f} s = {generator['batches_per_s']} batches/s "
          f"({generator['batches_per_s_without_snapshots']} without the {generator['snapshots']} snapshots)")
    print(f"targets (issue 11): each command <= {RATIO_TARGET}x from 1,000 to 100,000 batches; "
          f"fresh-machine one-file restore from S3 <= {FRESH_REQUESTS_TARGET} requests at 100,000 batches")
    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in table:
        print(line(row))
    extra = []
    for p in pts:
        o = points[p]
        if "repo_objects" in o:
            extra.append(f"{o.get('batches', p)}: {o['repo_objects']} objects, {o['repo_bytes'] / 2**20:.0f} MiB")
    if extra:
        print("\nrepository (local): " + "; ".join(extra))
    print()

    doc = {"meta": meta, "generator": generator, "rows": rows_json,
           "fresh_restore_requests_at_largest": fresh,
           "fresh_restore_requests_target": FRESH_REQUESTS_TARGET,
           "fresh_restore_requests_target_met": fresh_met,
           "points": {str(p): points[p] for p in pts}}
    text = json.dumps(doc, indent=2)
    with open(a.out, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\n(JSON saved to {a.out})")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("layout")
    p.add_argument("share")
    p.add_argument("--files", type=int, required=True)
    p = sub.add_parser("gen")
    p.add_argument("share")
    p.add_argument("--db", required=True)
    p.add_argument("--until", type=int, required=True)
    p.add_argument("--closes", type=int, required=True)
    p.add_argument("--files", type=int, required=True)
    p.add_argument("--snapshot-every", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--daemon-pid", type=int, required=True)
    p.add_argument("cmd", nargs="+")
    p = sub.add_parser("batches")
    p.add_argument("db")
    p = sub.add_parser("mark-snapshot")
    p.add_argument("--db", required=True)
    p.add_argument("--state", required=True)
    p = sub.add_parser("requests")
    p.add_argument("stats")
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("state")
    p.add_argument("out")
    a = ap.parse_args()
    if a.what == "layout":
        layout(a)
    elif a.what == "gen":
        gen(a)
    elif a.what == "batches":
        print(batch_count(a.db))
    elif a.what == "requests":
        s = json.loads(a.stats)["btrship_stats"]["store"]
        print(f"{s['requests']} requests ({s['gets']} get, {s['puts']} put, {s['lists']} list, "
              f"{s['heads']} head, {s['downloaded_bytes'] / 2**20:.1f} MiB down)")
    elif a.what == "mark-snapshot":
        mark_snapshot(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
