#!/usr/bin/env python3
"""Turn bench/run's raw measurements into the table and the JSON (stdlib only).

  report.py RESULTS_FILE JSON_OUT

RESULTS_FILE has one `key=value` a line: `meta.*` (strings) and
`btrship.*` / `restic.*` / `floor.*` (numbers), written by bench/run.
`floor.*` is the cold read of the same share (`tar | cat`, caches dropped);
`btrship.stage_*_s` are the seconds btrship's threads spent in each stage
of the first ship (from `snapshot --json`).
"""

import json
import sys

MIB = 1024 * 1024

# (key, label, unit conversion, decimals, better, target)
#   better "lower": advantage = restic / btrship (times better for btrship)
#   better "higher": advantage = btrship / restic
# target: minimum advantage the issue asks for (None: no target)
ROWS = [
    ("initial_wall_s", "initial wall s", 1, 2, "lower", 1.5),
    ("initial_cpu_s", "initial CPU s (user+sys)", 1, 2, "lower", None),
    ("initial_peak_rss_kib", "initial peak RSS MiB", 1 / 1024, 1, "lower", None),
    ("initial_repo_bytes", "initial repo MiB", 1 / MIB, 1, "lower", None),
    ("initial_throughput_mib_s", "initial throughput MiB/s", 1, 1, "higher", 1.5),
    ("incr_wall_s", "incr wall s", 1, 3, "lower", 50),
    ("incr_read_bytes", "incr bytes read MiB", 1 / MIB, 2, "lower", 100),
    ("incr_repo_written_bytes", "incr bytes written to repo MiB", 1 / MIB, 3, "lower", None),
    ("incr_objects_written", "incr objects written", 1, 0, "lower", None),
    ("restore_wall_s", "restore wall s (incl. sync)", 1, 2, "lower", 2),
]


def num(v):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def advantage(b, r, better):
    num_, den = (r, b) if better == "lower" else (b, r)
    if den == 0:
        return None if num_ == 0 else float("inf")
    return num_ / den


def fmt_adv(a):
    if a is None:
        return "="
    if a == float("inf"):
        return "inf"
    return f"{a:.2f}x" if a < 100 else f"{a:.0f}x"


def main():
    results, out = sys.argv[1], sys.argv[2]
    meta, vals = {}, {"btrship": {}, "restic": {}, "floor": {}}
    with open(results) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or "=" not in line:
                continue
            k, v = line.split("=", 1)
            scope, key = k.split(".", 1)
            if scope == "meta":
                meta[key] = num(v)
            else:
                vals[scope][key] = num(v)

    rows_json = []
    table = []
    for key, label, conv, dec, better, target in ROWS:
        b = vals["btrship"].get(key)
        r = vals["restic"].get(key)
        if b is None or r is None:
            continue
        a = advantage(b, r, better)
        if target is None:
            met = ""
        elif a is None:
            met = "n/a"
        else:
            met = "yes" if a >= target else "no"
        table.append(
            (
                label,
                f"{b * conv:.{dec}f}",
                f"{r * conv:.{dec}f}",
                ("restic/btrship " if better == "lower" else "btrship/restic ") + fmt_adv(a),
                "" if target is None else f">= {target}x",
                met,
            )
        )
        rows_json.append(
            {
                "metric": key,
                "label": label,
                "btrship": b,
                "restic": r,
                "btrship_advantage": None if a is None else (a if a != float("inf") else "inf"),
                "advantage_is": "restic/btrship" if better == "lower" else "btrship/restic",
                "target_advantage": target,
                "target_met": None if met in ("", "n/a") else met == "yes",
            }
        )

    head = ("metric", "btrship", "restic", "btrship advantage", "target", "met")
    widths = [max(len(str(row[i])) for row in table + [head]) for i in range(len(head))]

    def line(row):
        cells = []
        for i, c in enumerate(row):
            cells.append(str(c).ljust(widths[i]) if i == 0 or i >= 3 else str(c).rjust(widths[i]))
        return "  ".join(cells).rstrip()

    print()
    print(
        f"btrship vs restic {meta.get('restic_version', '')}: {meta.get('files')} small files, "
        f"{meta.get('big_gib')} GiB random file, {meta.get('text_mib')} MiB text "
        f"= {meta.get('data_bytes', 0) / MIB:.0f} MiB in {meta.get('data_files')} files"
    )
    print("btrship advantage = how many times better btrship is (>1: btrship better);")
    print("  restic/btrship for lower-is-better rows, btrship/restic for throughput.")
    print()
    if table:  # (none with --no-restic)
        print(line(head))
        print(line(tuple("-" * w for w in widths)))
        for row in table:
            print(line(row))
        print()

    floor = floor_table(vals)
    stages = stage_table(vals)
    doc = {"meta": meta, "rows": rows_json, "floor": floor, "stages": stages, "raw": vals}
    text = json.dumps(doc, indent=2, sort_keys=False)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\n(JSON saved to {out})")


# (key, label, target for btrship, unit conversion, decimals)
FLOOR_ROWS = [
    ("initial_wall_s", "wall s", None, 1, 2),
    ("initial_cpu_s", "CPU s (user+sys)", 8, 1, 2),
    ("initial_user_s", "CPU s (user)", None, 1, 2),
    ("initial_peak_rss_kib", "peak RSS MiB", 200, 1 / 1024, 1),
]
FLOOR_TARGET = 1.2


def floor_table(vals):
    """Initial ship against the cold read of the same share; prints it."""
    f = vals["floor"].get("initial_wall_s")
    if not f:
        return None
    out = {"floor_wall_s": f, "target_ratio": FLOOR_TARGET}
    print(f"initial ship against the cold-read floor (tar | cat, caches dropped): {f:.2f} s")
    print(f"  {'':<20}{'floor':>10}{'btrship':>10}{'restic':>10}   btrship target")
    for key, label, target, conv, dec in FLOOR_ROWS:
        cells = []
        for tool in ("floor", "btrship", "restic"):
            v = vals[tool].get(key)
            cells.append("-" if v is None else f"{v * conv:.{dec}f}")
        tgt = ""
        b = vals["btrship"].get(key)
        if target is not None and b is not None:
            met = b * conv <= target
            tgt = f"<= {target} ({'yes' if met else 'no'})"
            out[f"btrship_{key}_target_met"] = met
        print(f"  {label:<20}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}   {tgt}")
    for tool in ("btrship", "restic"):
        w = vals[tool].get("initial_wall_s")
        if w:
            out[f"{tool}_ratio"] = round(w / f, 3)
    b, r = out.get("btrship_ratio"), out.get("restic_ratio")
    cells = ["-" if x is None else f"{x:.2f}" for x in (1, b, r)]
    line = f"  {'wall / floor':<20}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}"
    if b is not None:
        out["btrship_ratio_target_met"] = b <= FLOOR_TARGET
        line += f"   <= {FLOOR_TARGET} ({'yes' if b <= FLOOR_TARGET else 'no'})"
    print(line)
    print()
    return out


def stage_table(vals):
    """Seconds btrship's threads spent per stage of the first ship; prints it."""
    b = vals["btrship"]
    stages = {k[len("stage_"):-2]: v for k, v in b.items() if k.startswith("stage_") and k.endswith("_s")}
    if not stages:
        return None
    wall = b.get("initial_wall_s") or 0
    print("btrship's first ship, time per stage (summed over threads; stat, read and")
    print("upload include waiting for the disk or the store, the others are CPU):")
    for name, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        share = f"  ({v / wall:.0%} of wall)" if wall else ""
        print(f"  {name:<12}{v:>8.2f} s{share}")
    print()
    return stages


if __name__ == "__main__":
    main()
