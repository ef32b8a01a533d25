#!/usr/bin/env python3
"""Data for bench/run (Python 3.11 stdlib only).

  gen.py gen SHARE --files N --text-mib M     small files + compressible text
  gen.py touch SHARE --count 10               rewrite the content of COUNT small files
  gen.py stat DIR                             "<regular files> <total bytes>" of a tree

The big random file is written by bench/run with `head -c` from /dev/urandom.

Small files: N files spread over min(1000, N) directories small/dNNNN/, sizes
uniform in 1..16 KiB, content half random bytes (incompressible), half a
slice of generated text (compressible), with a unique header so no two files
are equal. Text: a few dozen files text/log-NN.log (generated log lines with
increasing timestamps) and text/doc-NN.txt (repeated words), M MiB in all.
Everything is seeded, so the same arguments give the same tree shape.
"""

import argparse
import os
import random
import sys

KIB = 1024
MIB = 1024 * 1024
WORDS = (
    "invoice budget quarter report meeting minutes draft final review client "
    "project schedule contract offer order delivery payment reminder summary "
    "agenda notes proposal scan letter memo plan forecast audit tax salary "
    "the a of and to in for on with by from at as is was be are this that"
).split()


def small_dir(share, i, ndirs):
    return os.path.join(share, "small", f"d{i % ndirs:04d}")


def small_path(share, i, ndirs):
    return os.path.join(small_dir(share, i, ndirs), f"f{i:07d}.dat")


def text_pool(rng, size):
    out = []
    n = 0
    while n < size:
        line = " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + ".\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def gen_small(share, files, rng):
    ndirs = max(1, min(1000, files))
    for d in range(ndirs):
        os.makedirs(os.path.join(share, "small", f"d{d:04d}"), exist_ok=True)
    pool = text_pool(rng, 4 * MIB)
    urandom = os.urandom
    for i in range(files):
        size = rng.randint(1 * KIB, 16 * KIB)
        header = f"file {i} of {files}\n".encode()
        nrand = max(0, size // 2 - len(header))
        ntext = max(0, size - len(header) - nrand)
        off = rng.randrange(0, len(pool) - ntext)
        data = header + urandom(nrand) + pool[off:off + ntext]
        with open(small_path(share, i, ndirs), "wb") as f:
            f.write(data[:size])


HOSTS = [f"fs{n:02d}" for n in range(8)]
PROCS = ["smbd", "nmbd", "winbindd", "sshd", "cron", "kernel", "systemd"]
MSGS = [
    "session setup ok for user {u} from 10.0.{a}.{b}",
    "open_file: {u} opened share/projects/p{a}/report-{b}.docx read=Yes write=No",
    "close_file: {u} closed file share/finance/q{a}/budget-{b}.xlsx (numopen=0) NT_STATUS_OK",
    "connect to service share initially as user {u} (uid={a}{b}, gid=100) (pid {a}{b}{a})",
    "Disconnecting from 10.0.{a}.{b} (NT_STATUS_CONNECTION_RESET)",
    "check_ntlm_password: authentication for user [{u}] -> [{u}] -> [{u}] succeeded",
    "pam_unix(cron:session): session opened for user {u} by (uid=0)",
]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


def gen_text(share, text_mib, rng):
    tdir = os.path.join(share, "text")
    os.makedirs(tdir, exist_ok=True)
    total = int(text_mib * MIB)
    if total <= 0:
        return
    nfiles = max(1, min(36, int(text_mib)))
    per = total // nfiles
    ts = 1_700_000_000
    for n in range(nfiles):
        size = per if n < nfiles - 1 else total - per * (nfiles - 1)
        if n % 3 == 2:
            # documents: repeated words
            path = os.path.join(tdir, f"doc-{n:02d}.txt")
            with open(path, "wb") as f:
                left = size
                while left > 0:
                    chunk = text_pool(rng, min(left, 4 * MIB))
                    f.write(chunk)
                    left -= len(chunk)
            continue
        path = os.path.join(tdir, f"log-{n:02d}.log")
        with open(path, "wb") as f:
            left = size
            while left > 0:
                lines = []
                got = 0
                want = min(left, 4 * MIB)
                while got < want:
                    ts += rng.randint(0, 3)
                    sec = ts % 86400
                    line = (
                        f"2024-{1 + ts // 2592000 % 12:02d}-{1 + ts // 86400 % 28:02d} "
                        f"{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}."
                        f"{rng.randrange(1000000):06d} {rng.choice(HOSTS)} "
                        f"{rng.choice(PROCS)}[{rng.randrange(100, 65000)}]: "
                        + rng.choice(MSGS).format(u=rng.choice(USERS), a=rng.randrange(256), b=rng.randrange(256))
                        + "\n"
                    )
                    lines.append(line)
                    got += len(line)
                data = "".join(lines).encode()[:want]
                f.write(data)
                left -= len(data)


def cmd_gen(a):
    rng = random.Random(20241125)
    gen_small(a.share, a.files, rng)
    gen_text(a.share, a.text_mib, rng)


def cmd_touch(a):
    """Rewrite the content of COUNT small files spread over the tree, same sizes."""
    ndirs = max(1, min(1000, a.files))
    count = min(a.count, a.files)
    step = max(1, a.files // max(1, count))
    for k in range(count):
        i = (k * step + 7 * k + step // 2) % a.files  # different directories too
        p = small_path(a.share, i, ndirs)
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.write(f"touched {k}\n".encode()[:size] + os.urandom(max(0, size - len(f"touched {k}\n"))))
        print(p)


def cmd_stat(a):
    count = 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(a.dir):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000:
                count += 1
                total += st.st_size
    print(count, total)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("share")
    g.add_argument("--files", type=int, required=True)
    g.add_argument("--text-mib", type=float, required=True)
    t = sub.add_parser("touch")
    t.add_argument("share")
    t.add_argument("--files", type=int, required=True)
    t.add_argument("--count", type=int, default=10)
    s = sub.add_parser("stat")
    s.add_argument("dir")
    a = p.parse_args()
    {"gen": cmd_gen, "touch": cmd_touch, "stat": cmd_stat}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
