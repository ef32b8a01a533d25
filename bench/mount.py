#!/usr/bin/env python3
"""Helpers of bench/mount (stdlib only).

  mount.py layout SHARE
      the history share's files: docs/report.txt (the file whose previous
      versions are listed), 40 more files in docs/, and hot/ (200 files in
      4 directories) that the generator also writes
  mount.py gen SHARE --db DB --clock FILE --moments N --snapshot-every E
               --daemon-pid PID --state FILE -- SNAPSHOT_CMD...
      N more moments of the share, each in its own UTC second of the
      daemon's (faked) clock: before each one the offset in FILE (read by
      libfaketime in the daemon and in SNAPSHOT_CMD) goes up by one second;
      then either SNAPSHOT_CMD runs (every E-th moment) or docs/report.txt
      and one hot file are written (two closes) and the generator waits
      until the daemon has captured and shipped both (its state database)
  mount.py allinfo STDOUT STDERR
      smbclient allinfo's output as JSON: labels listed, with a size line,
      unexpected errors
  mount.py stats STDERR_FILE
      the btrship_stats line of a command's stderr (BTRSHIP_STATS=1) as JSON
  mount.py requests STATS_JSON
      one line about it, for the progress log
  mount.py statall DIR PATH [--order desc|asc]
      stat DIR/@GMT-*/PATH for every label, newest first as smbclient
      asks (or oldest first), twice (the first right after the caller
      started the mount and dropped caches): the mount's own share of
      allinfo, without smbd
  mount.py s3get ENDPOINT BUCKET PREFIX [--threads 6] [--range-kib 1024]
      what moto alone serves: every object under PREFIX/packs/ read in
      ranged GETs of --range-kib, --threads at a time
  mount.py report RESULTS JSON_OUT
      the table and the JSON
"""

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import time

DOCS = 40
HOT_DIRS = 4
HOT_FILES = 200
GMT = re.compile(r"^@GMT-\d{4}\.\d{2}\.\d{2}-\d{2}\.\d{2}\.\d{2}$")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hot_path(j):
    return f"hot/d{j % HOT_DIRS}/f{j:04d}.txt"


def report_text(v):
    # a few hundred bytes, a different size now and then
    return f"quarterly report, revision {v}\n" + "figures and notes\n" * (10 + v % 7)


def layout(a):
    os.makedirs(f"{a.share}/docs", exist_ok=True)
    for j in range(DOCS):
        with open(f"{a.share}/docs/n{j:02d}.txt", "w") as f:
            f.write(f"note {j}\n" * 20)
    with open(f"{a.share}/docs/report.txt", "w") as f:
        f.write(report_text(0))
    for j in range(HOT_FILES):
        p = f"{a.share}/{hot_path(j)}"
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(f"hot file {j} v0\n")


def alive(pid):
    """Running (not gone, not a zombie waiting for bench/mount to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def read_offset(path):
    with open(path) as f:
        return int(f.read().strip())


def write_offset(path, seconds):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{seconds:+d}\n")
    os.replace(tmp, path)


def gen(a):
    c = sqlite3.connect(a.db, timeout=30)

    def newest_capture():
        return c.execute("SELECT coalesce(max(seq), 0) FROM captures").fetchone()[0]

    offset = read_offset(a.clock)
    started = time.monotonic()
    shown = started
    snaps = batches = 0
    snap_s = 0.0
    for k in range(1, a.moments + 1):
        # every capture of the last moment is shipped: from here on the
        # daemon's clock is at least one second later
        offset += 1
        write_offset(a.clock, offset)
        if a.snapshot_every and k % a.snapshot_every == 0:
            t = time.monotonic()
            r = subprocess.run(a.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                sys.exit(f"mount.py gen: snapshot failed (exit {r.returncode}): {r.stderr.strip()}")
            snap_s += time.monotonic() - t
            snaps += 1
        else:
            before = newest_capture()
            j = k % HOT_FILES
            paths = ["docs/report.txt", hot_path(j)]
            with open(f"{a.share}/{paths[0]}", "w") as f:
                f.write(report_text(k))
            with open(f"{a.share}/{paths[1]}", "w") as f:
                f.write(f"hot file {j} moment {k}\n")
            # Wait until the daemon captured both closes and shipped them
            # (in one version batch, or two when it picked up the first
            # close alone: both then fall in this second and share a label).
            deadline = time.monotonic() + 120
            while True:
                seen, pending = c.execute(
                    "SELECT count(DISTINCT CASE WHEN path IN (?, ?) THEN path END), "
                    "coalesce(sum(state = 'pending'), 0) FROM captures WHERE seq > ?",
                    (paths[0].encode(), paths[1].encode(), before)).fetchone()
                if seen == 2 and pending == 0:
                    break
                if time.monotonic() > deadline or not alive(a.daemon_pid):
                    sys.exit(f"mount.py gen: the daemon did not ship the closes of moment {k} in 120 s "
                             f"(daemon {'running' if alive(a.daemon_pid) else 'gone'}; "
                             f"{seen} of 2 captured, {pending} pending)")
                time.sleep(0.002)
            batches += 1
        now = time.monotonic()
        if now - shown >= 10:
            shown = now
            log(f"  {k}/{a.moments} moments, {k / (now - started):.1f} moments/s")
    seconds = time.monotonic() - started
    st = {"moments": a.moments, "daemon_batch_moments": batches, "snapshot_moments": snaps,
          "seconds": round(seconds, 2), "snapshot_seconds": round(snap_s, 2),
          "moments_per_s": round(a.moments / seconds, 1) if seconds else None,
          "final_clock_offset_s": offset}
    with open(a.state, "w") as f:
        json.dump(st, f, indent=1)
    log(f"  {a.moments} moments in {seconds:.1f} s ({batches} daemon batch moments, {snaps} snapshots "
        f"taking {snap_s:.1f} s)")


def allinfo(a):
    with open(a.stdout, errors="replace") as f:
        out = f.read()
    with open(a.stderr, errors="replace") as f:
        err = f.read()
    labels, sized, cur = [], 0, None
    for line in out.splitlines():
        line = line.rstrip()
        if GMT.match(line):
            labels.append(line)
            cur = line
        elif cur and line.startswith("size:"):
            sized += 1
            cur = None
    missing = unexpected = 0
    first_unexpected = None
    for line in err.splitlines():
        if "NT_STATUS_" not in line:
            continue
        if line.startswith("pathinfo(@GMT-") and (line.endswith("NT_STATUS_OBJECT_NAME_NOT_FOUND")
                                                 or line.endswith("NT_STATUS_OBJECT_PATH_NOT_FOUND")):
            missing += 1
        else:
            unexpected += 1
            first_unexpected = first_unexpected or line
    print(json.dumps({"labels": len(labels), "with_size": sized, "not_found": missing,
                      "unexpected_errors": unexpected, "first_unexpected": first_unexpected,
                      "altname_seen": "altname:" in out,
                      "distinct_labels": len(set(labels))}))


def stats(a):
    line = None
    with open(a.file, errors="replace") as f:
        for l in f:
            if l.startswith('{"btrship_stats"'):
                line = l
    if line is None:
        sys.exit(f"mount.py stats: no btrship_stats line in {a.file}")
    print(json.dumps(json.loads(line)["btrship_stats"]["store"]))


def statall(a):
    names = sorted((n for n in os.listdir(a.dir) if GMT.match(n)), reverse=a.order == "desc")
    out = {"labels": len(names)}
    for run in ("cold", "warm"):
        t = time.monotonic()
        for n in names:
            os.stat(f"{a.dir}/{n}/{a.path}")
        out[f"{run}_s"] = round(time.monotonic() - t, 3)
    print(json.dumps(out))


def sigv4(endpoint, path):
    """Headers of a signed GET of `path` (AWS Signature V4, empty query,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, us-east-1): moto wants
    credentials for GetObject, though it checks no signature."""
    import datetime
    import hashlib
    import hmac
    import urllib.parse
    host = urllib.parse.urlparse(endpoint).netloc
    now = datetime.datetime.now(datetime.timezone.utc)
    amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    key_id = os.environ.get("AWS_ACCESS_KEY_ID", "test")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "test")
    payload = "UNSIGNED-PAYLOAD"
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join(["GET", path, "", f"host:{host}", f"x-amz-content-sha256:{payload}",
                           f"x-amz-date:{amz}", "", signed, payload])
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = f"AWS4{secret}".encode()
    for part in (day, "us-east-1", "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"x-amz-date": amz, "x-amz-content-sha256": payload,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={signed}, "
                             f"Signature={sig}"}


def s3get(a):
    import concurrent.futures
    import urllib.parse
    import urllib.request
    import xml.etree.ElementTree as ET
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    objects, token = [], None
    while True:
        q = {"list-type": "2", "prefix": f"{a.prefix}/packs/"}
        if token:
            q["continuation-token"] = token
        with urllib.request.urlopen(f"{a.endpoint}/{a.bucket}?{urllib.parse.urlencode(q)}") as r:
            root = ET.fromstring(r.read())
        for c in root.iter(f"{ns}Contents"):
            objects.append((c.find(f"{ns}Key").text, int(c.find(f"{ns}Size").text)))
        t = root.find(f"{ns}NextContinuationToken")
        if t is None:
            break
        token = t.text
    step = a.range_kib << 10
    ranges = [(k, o, min(o + step, size) - 1) for k, size in objects for o in range(0, size, step)]

    def get(r):
        k, lo, hi = r
        path = f"/{a.bucket}/{urllib.parse.quote(k)}"
        req = urllib.request.Request(f"{a.endpoint}{path}",
                                     headers={"Range": f"bytes={lo}-{hi}", **sigv4(a.endpoint, path)})
        with urllib.request.urlopen(req) as resp:
            return len(resp.read())

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(a.threads) as ex:
        got = sum(ex.map(get, ranges))
    secs = time.monotonic() - t
    print(json.dumps({"objects": len(objects), "requests": len(ranges), "bytes": got,
                      "seconds": round(secs, 3), "mib_s": round(got / 2**20 / secs, 1),
                      "threads": a.threads, "range_kib": a.range_kib}))


def requests_line(s):
    return (f"{s['requests']} requests ({s['gets']} get, {s['puts']} put, {s['lists']} list, "
            f"{s['heads']} head, {s['downloaded_bytes'] / 2**20:.1f} MiB down)")


# ---------------------------------------------------------------- report

def num(v):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def report(a):
    r = {}
    with open(a.results) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                r[k] = json.loads(v) if v.startswith("{") else num(v)
    meta = {k[5:]: v for k, v in r.items() if k.startswith("meta.")}
    g = lambda k: r.get(k)  # noqa: E731

    rows = []  # (figure, value text, target text, met)

    def row(label, value, fmt, target=None, ok=None):
        txt = "-" if value is None else fmt.format(value)
        met = "" if ok is None or value is None else ("yes" if ok(value) else "no")
        rows.append((label, txt, target or "", met))

    n = meta.get("moments_wanted")
    row(f"allinfo, {n} moments: cold (mount just started) s", g("smb.cold_s"), "{:.2f}", "<= 1 s",
        lambda v: v <= 1)
    row(f"allinfo, {n} moments: warm s (median of {meta.get('runs')})", g("smb.warm_s"), "{:.2f}", "<= 1 s",
        lambda v: v <= 1)
    ci = g("smb.cold_allinfo") or {}
    row("labels listed (cold allinfo)", ci.get("labels"), "{:d}", f"= {n}", lambda v: v == n)
    row("labels with the file's size (cold allinfo)", ci.get("with_size"), "{:d}", f"= {n}",
        lambda v: v == n)
    row("mount CPU s during the cold allinfo", g("smb.cold_mount_cpu_s"), "{:.2f}")
    row("mount ready s (history share, shipping machine)", g("smb.mount_ready_s"), "{:.2f}")
    row("mount peak RSS MiB after the allinfo runs", (g("smb.vmhwm_kib") or 0) / 1024 or None, "{:.1f}")
    for order, words in (("desc", "newest first"), ("asc", "oldest first")):
        sa = g(f"smb.statall_{order}") or {}
        ss = g(f"smb.statall_{order}_stats") or {}
        row(f"  no smbd: stat of every version, {words}: cold s", sa.get("cold_s"), "{:.2f}")
        row(f"  no smbd: {words}: mount CPU s (cold + warm)", sa.get("mount_cpu_s"), "{:.2f}")
        row(f"  no smbd: {words}: store GETs (start-up included)", ss.get("gets"), "{:d}")
        row(f"  no smbd: {words}: the same again (warm) s", sa.get("warm_s"), "{:.3f}")
    row("  floor: allinfo, moments as plain directories: cold s", g("smb.plain_cold_s"), "{:.2f}")
    row(f"  floor: the same, warm s (median of {meta.get('runs')})", g("smb.plain_warm_s"), "{:.2f}")
    for kind in ("s3", "local"):
        if g(f"{kind}.ttfb_s") is None and g(f"{kind}.read_s") is None:
            continue
        name = "S3 (moto)" if kind == "s3" else "local dir"
        row(f"{name}: fresh-machine mount ready s", g(f"{kind}.ttfb_mount_ready_s"), "{:.2f}")
        row(f"{name}: time to first byte (head -c1) s", g(f"{kind}.ttfb_s"), "{:.3f}", "<= 2 s",
            lambda v: v <= 2)
        mib = meta.get("file_mib")
        row(f"{name}: sequential read of {mib} MiB, MiB/s", g(f"{kind}.read_mib_s"), "{:.1f}",
            ">= 100 MiB/s", lambda v: v >= 100)
        row(f"{name}: mount peak RSS MiB (VmHWM after the read)", (g(f"{kind}.read_vmhwm_kib") or 0) / 1024
            or None, "{:.1f}")
        row(f"  {name}: mount CPU s during the read", g(f"{kind}.read_mount_cpu_s"), "{:.2f}")
        if kind == "s3":
            row(f"  {name}: moto CPU s during the read", g(f"{kind}.read_moto_cpu_s"), "{:.2f}")
        if kind == "s3":
            rs = g(f"{kind}.read_stats") or {}
            if rs.get("gets"):
                row(f"  {name}: moto CPU ms per GET during the read", g(f"{kind}.read_moto_cpu_s") * 1000 / rs["gets"],
                    "{:.1f}")
            for t in (1, 6):
                al = g(f"{kind}.store_alone_{t}") or {}
                kib = al.get("range_kib")
                row(f"  {name}: moto alone, {kib} KiB ranged GETs {t} at a time, MiB/s", al.get("mib_s"), "{:.1f}")
                if al.get("requests"):
                    row(f"  {name}: moto alone, {t} at a time: moto CPU ms per GET",
                        al["moto_cpu_s"] * 1000 / al["requests"], "{:.1f}")
        else:
            alone = g(f"{kind}.store_alone") or {}
            row(f"  {name}: the repository's packs alone (cat), MiB/s", alone.get("mib_s"), "{:.1f}")

    head = ("figure", "value", "target", "met")
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(4)]

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i == 1 else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    print()
    print(f"btrship {meta.get('btrship_rev')}: bench/mount ({meta.get('bin')}), "
          f"{meta.get('cpus')} CPUs, kernel {meta.get('kernel')}, load average "
          f"{meta.get('load_avg_start')} at the start, {meta.get('load_avg_end')} at the end")
    gst = r.get("gen") or {}
    print(f"history: {n} moments wanted ({gst.get('daemon_batch_moments')} daemon batches, "
          f"{gst.get('snapshot_moments')} snapshots, built in {gst.get('seconds')} s); "
          f"mount: {g('smb.mount_message')}")
    print()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for x in rows:
        print(line(x))
    print()
    notes = [("smb.startonly_stats", "history mount, start-up only"),
             ("smb.statall_desc_stats", "history mount, start-up + stat of every version twice, newest first"),
             ("smb.statall_asc_stats", "history mount, start-up + stat of every version twice, oldest first"),
             ("smb.stats", "history mount, start-up + cold + warm allinfo"),
             ("s3.ttfb_stats", "S3 fresh mount, start-up + head -c1"),
             ("s3.read_stats", "S3 fresh mount, start-up + full read"),
             ("local.ttfb_stats", "local fresh mount, start-up + head -c1"),
             ("local.read_stats", "local fresh mount, start-up + full read")]
    for k, label in notes:
        s = r.get(k)
        if isinstance(s, dict):
            print(f"store requests, {label}: {requests_line(s)}")
    print()
    doc = {"meta": meta, "results": {k: v for k, v in r.items() if not k.startswith("meta.")},
           "table": [dict(zip(head, x)) for x in rows]}
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
    p = sub.add_parser("gen")
    p.add_argument("share")
    p.add_argument("--db", required=True)
    p.add_argument("--clock", required=True)
    p.add_argument("--moments", type=int, required=True)
    p.add_argument("--snapshot-every", type=int, required=True)
    p.add_argument("--daemon-pid", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("cmd", nargs="+")
    p = sub.add_parser("allinfo")
    p.add_argument("stdout")
    p.add_argument("stderr")
    p = sub.add_parser("stats")
    p.add_argument("file")
    p = sub.add_parser("requests")
    p.add_argument("stats")
    p = sub.add_parser("statall")
    p.add_argument("dir")
    p.add_argument("path")
    p.add_argument("--order", choices=["desc", "asc"], default="desc")
    p = sub.add_parser("s3get")
    p.add_argument("endpoint")
    p.add_argument("bucket")
    p.add_argument("prefix")
    p.add_argument("--threads", type=int, default=6)
    p.add_argument("--range-kib", type=int, default=1024)
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("out")
    a = ap.parse_args()
    if a.what == "layout":
        layout(a)
    elif a.what == "gen":
        gen(a)
    elif a.what == "allinfo":
        allinfo(a)
    elif a.what == "stats":
        stats(a)
    elif a.what == "statall":
        statall(a)
    elif a.what == "s3get":
        s3get(a)
    elif a.what == "requests":
        print(requests_line(json.loads(a.stats)))
    else:
        report(a)


if __name__ == "__main__":
    main()
