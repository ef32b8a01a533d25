#!/usr/bin/env python3
"""Helpers of bench/million (Python 3.11 stdlib only).

  million.py plan --files LIST [--keep]
      sizes for each share size: "<N> <data bytes> <image bytes> <need bytes>"
      per line, then one line "total <need bytes>" (the free space the run needs:
      the largest size's, or the sum with --keep)
  million.py requests STATS_LINE
      one line about a command's BTRSHIP_STATS=1 line, for the progress log
  million.py rss PID
      "<VmRSS> <VmHWM> <RssAnon> <RssFile>" in KiB from /proc/PID/status
  million.py report RESULTS JSON_OUT
      the table and the JSON

RESULTS has one `key=value` a line: `meta.*` and `size.<N>.<measurement>`
(numbers; `*.stats` is btrship's BTRSHIP_STATS JSON line), written by
bench/million.
"""

import argparse
import json
import sys

KIB, MIB, GIB = 1024, 1024**2, 1024**3

# Targets of issue 11 ("1 M-files points"), evaluated at the largest size.
INCR_RATIO_TARGET = 1.5        # incremental at 1M <= 1.5x its time at 100k
RESTORE_WALL_TARGET = 0.5      # one-file restore at 1M <= 0.5 s
RESTORE_RATIO_TARGET = 5.0     # restic/btrship one-file restore >= 5x
DAEMON_RSS_TARGET_MIB = 100.0  # daemon idle RSS at 1M <= 100 MiB


def plan(a):
    sizes = [int(x) for x in a.files.split(",")]
    needs = []
    for n in sizes:
        data = n * (KIB + 16 * KIB) // 2          # mean size 8.5 KiB
        # sparse image: costs only what is written; room for metadata (DUP),
        # 4 KiB block rounding and the snapshots' CoW
        image = int(1.5 * data + n * 16 * KIB + 2 * GIB)
        image = (image + MIB - 1) // MIB * MIB
        # on the host: the filled image (data, block rounding, metadata), the
        # btrship and restic repositories (half of each file is text, counted
        # at 0.75 of the data each), restic's cache and the logs
        need = int(data + n * 6 * KIB + 2 * 0.75 * data + n * 0.5 * KIB + 1 * GIB)
        needs.append(need)
        print(n, data, image, need)
    print("total", sum(needs) if a.keep else max(needs))


def requests(a):
    s = json.loads(a.stats)["btrship_stats"]["store"]
    print(f"{s['requests']} requests ({s['gets']} get, {s['puts']} put, {s['lists']} list, "
          f"{s['heads']} head, {s['downloaded_bytes'] / MIB:.1f} MiB down)")


def rss(a):
    want = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    got = {}
    with open(f"/proc/{a.pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in want:
                got[k] = int(v.split()[0])
    print(*(got.get(k, 0) for k in want))


# ---------------------------------------------------------------- report

def num(v):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def short(n):
    for div, suf in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            x = n / div
            return f"{x:g}{suf}"
    return str(n)


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def report(a):
    meta, sizes = {}, {}
    with open(a.results) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" not in line:
                continue
            k, v = line.split("=", 1)
            parts = k.split(".")
            if parts[0] == "meta":
                meta[parts[1]] = num(v)
            elif parts[0] == "size":
                s = sizes.setdefault(int(parts[1]), {})
                if len(parts) == 3:
                    s[parts[2]] = num(v)
                else:
                    c = s.setdefault(parts[2], {})
                    c[parts[3]] = json.loads(v)["btrship_stats"] if parts[3] == "stats" else num(v)
    ns = sorted(sizes)
    for n in ns:
        s = sizes[n]
        for c in s.values():
            if isinstance(c, dict) and isinstance(c.get("stats"), dict):
                c["requests"] = c["stats"]["store"]["requests"]
        b, r = get(s, "restore", "wall_s"), get(s, "restic_restore", "wall_s")
        s["restore_ratio_restic_btrship"] = round(r / b, 3) if b and r is not None else None

    def kib_mib(v):
        return None if v is None else v / 1024

    # (key, label, value of a size, format, ratio column, target kind, target)
    rows = [
        ("initial_wall_s", "initial wall s", lambda s: get(s, "initial", "wall_s"), "{:.2f}", False, None, None),
        ("initial_cpu_s", "initial CPU s (user+sys)", lambda s: get(s, "initial", "cpu_s"), "{:.2f}", False, None, None),
        ("initial_peak_rss_mib", "initial peak RSS MiB", lambda s: kib_mib(get(s, "initial", "peak_rss_kib")),
         "{:.1f}", False, None, None),
        ("incr_wall_s", "incr wall s", lambda s: get(s, "incr", "wall_s"), "{:.2f}", True,
         "ratio_max", INCR_RATIO_TARGET),
        ("incr_peak_rss_mib", "incr RSS MiB", lambda s: kib_mib(get(s, "incr", "peak_rss_kib")),
         "{:.1f}", False, None, None),
        ("nochange_wall_s", "no-change wall s", lambda s: get(s, "nochange", "wall_s"), "{:.2f}", False, None, None),
        ("restore_wall_s", "one-file restore wall s: btrship", lambda s: get(s, "restore", "wall_s"), "{:.2f}",
         False, "max", RESTORE_WALL_TARGET),
        ("restic_restore_wall_s", "one-file restore wall s: restic", lambda s: get(s, "restic_restore", "wall_s"),
         "{:.2f}", False, None, None),
        ("restore_ratio", "one-file restore restic/btrship", lambda s: s.get("restore_ratio_restic_btrship"),
         "{:.2f}x", False, "min", RESTORE_RATIO_TARGET),
        ("restore_requests", "one-file restore requests", lambda s: get(s, "restore", "requests"), "{:d}",
         False, None, None),
        ("restore_peak_rss_mib", "one-file restore RSS MiB", lambda s: kib_mib(get(s, "restore", "peak_rss_kib")),
         "{:.1f}", False, None, None),
        ("restic_initial_wall_s", "restic initial backup wall s", lambda s: get(s, "restic_initial", "wall_s"),
         "{:.2f}", False, None, None),
        ("daemon_idle_rss_mib", "daemon idle RSS MiB (VmRSS)", lambda s: kib_mib(get(s, "daemon", "vmrss_kib")),
         "{:.1f}", False, "max", DAEMON_RSS_TARGET_MIB),
        ("daemon_peak_rss_mib", "daemon peak RSS MiB (VmHWM)", lambda s: kib_mib(get(s, "daemon", "vmhwm_kib")),
         "{:.1f}", False, None, None),
    ]
    largest, smallest = (ns[-1], ns[0]) if ns else (None, None)
    ratio_head = f"ratio {short(largest)}/{short(smallest)}" if len(ns) > 1 else "ratio"
    head = ["metric"] + [f"{short(n)} files" for n in ns] + [ratio_head, "target", "met"]
    table, rows_json = [], []
    for key, label, fn, fmt, with_ratio, kind, target in rows:
        vals = [fn(sizes[n]) for n in ns]
        ratio = None
        if with_ratio and len(vals) > 1 and vals[0] not in (None, 0) and vals[-1] is not None:
            ratio = vals[-1] / vals[0]
        met, tgt_text = None, ""
        if kind == "ratio_max":
            tgt_text = f"<= {target}x ({short(largest)}/{short(smallest)})"
            met = None if ratio is None else ratio <= target
        elif kind == "max":
            unit = " s" if key.endswith("wall_s") else " MiB"
            tgt_text = f"<= {target:g}{unit} at {short(largest)}"
            met = None if vals[-1] is None else vals[-1] <= target
        elif kind == "min":
            tgt_text = f">= {target:g}x at {short(largest)}"
            met = None if vals[-1] is None else vals[-1] >= target

        def cell(v):
            if v is None:
                return "-"
            if fmt == "{:d}":
                return str(int(v))
            return fmt.format(v)
        table.append([label] + [cell(v) for v in vals]
                     + ["" if not with_ratio else ("-" if ratio is None else f"{ratio:.2f}x"),
                        tgt_text, "" if met is None else ("yes" if met else "no")])
        rows_json.append({"row": key, "label": label,
                          "by_files": {str(n): (None if v is None else round(v, 3)) for n, v in zip(ns, vals)},
                          "ratio_largest_smallest": None if ratio is None else round(ratio, 3),
                          "target": tgt_text or None, "target_met": met})

    widths = [max(len(str(row[i])) for row in table + [head]) for i in range(len(head))]

    def line(row):
        cells = []
        for i, c in enumerate(row):
            left = i == 0 or i >= len(head) - 2
            cells.append(str(c).ljust(widths[i]) if left else str(c).rjust(widths[i]))
        return "  ".join(cells).rstrip()

    print()
    if meta.get("bin_given") == "yes":
        what = f"btrship {meta.get('bin')} (sha256 {meta.get('bin_sha256')}; tree at {meta.get('btrship_rev')})"
    else:
        what = f"btrship {meta.get('btrship_rev')} (release build)"
    print(f"{what}, restic {meta.get('restic_version')}: the share-size points (issue 11)")
    print("share: small files of 1-16 KiB (half random, half text) in min(1000, N) directories; "
          "caches dropped before each measured command; local repositories")
    if largest != 1_000_000 and ns:
        print(f"note: the targets are stated for 100k -> 1M files; this run's largest size is {largest:,}")
    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in table:
        print(line(row))
    extra = []
    for n in ns:
        s = sizes[n]
        parts = [f"{s.get('data_files', '?')} files, {s.get('data_bytes', 0) / GIB:.2f} GiB of data "
                 f"(generated in {s.get('gen_s', 0):.0f} s)"]
        if "btrship_repo_bytes" in s:
            parts.append(f"btrship repo {s['btrship_repo_bytes'] / MIB:.0f} MiB")
        if "restic_repo_bytes" in s:
            parts.append(f"restic repo {s['restic_repo_bytes'] / MIB:.0f} MiB")
        if "daemon" in s and "ready_s" in s["daemon"]:
            parts.append(f"daemon ready (start-up snapshot shipped) in {s['daemon']['ready_s']:.1f} s")
        extra.append(f"{short(n)}: " + "; ".join(parts))
    if extra:
        print()
        for e in extra:
            print(e)
    print()

    doc = {"meta": meta, "rows": rows_json,
           "targets": {"incr_ratio_max": INCR_RATIO_TARGET, "restore_wall_s_max": RESTORE_WALL_TARGET,
                       "restore_restic_over_btrship_min": RESTORE_RATIO_TARGET,
                       "daemon_idle_rss_mib_max": DAEMON_RSS_TARGET_MIB},
           "sizes": {str(n): sizes[n] for n in ns}}
    text = json.dumps(doc, indent=2)
    with open(a.out, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\n(JSON saved to {a.out})")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--files", required=True)
    p.add_argument("--keep", action="store_true")
    p = sub.add_parser("requests")
    p.add_argument("stats")
    p = sub.add_parser("rss")
    p.add_argument("pid")
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("out")
    a = ap.parse_args()
    {"plan": plan, "requests": requests, "rss": rss, "report": report}[a.what](a)


if __name__ == "__main__":
    main()
