"""Stop processes by PID: SIGTERM the roots and all their descendants, SIGKILL leftovers after a grace period.

Never by name (no ``pkill``/``ray stop``). A recorded PID is only trusted together with the process
start time recorded with it, so a PID reused by an unrelated process is never signalled.

CLI: ``python -m infra.local.killtree [--grace 10] PID[@CREATE_TIME] ...``
"""

from __future__ import annotations

import argparse
import os
import re

import psutil


def proc_record(pid: int) -> dict:
    """A ``{"pid", "create_time"}`` record for a live process (what ``alive``/``kill_tree`` trust)."""
    p = psutil.Process(pid)
    return {"pid": pid, "create_time": p.create_time()}


def resolve(record: dict | int) -> psutil.Process | None:
    """The live process of a record, or None when it is gone or the PID now belongs to another process."""
    pid = record if isinstance(record, int) else int(record["pid"])
    try:
        p = psutil.Process(pid)
        if not isinstance(record, int) and abs(p.create_time() - float(record["create_time"])) > 0.5:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def alive(record: dict | int) -> bool:
    return resolve(record) is not None


def processes_with_arg(fragment: str) -> list[psutil.Process]:
    """Processes of this user whose command line contains ``fragment`` (e.g. a unique temp dir)."""
    pat = re.compile(re.escape(fragment.rstrip("/")) + r"(?![^/\s,;:'\"=])")
    me = os.getpid()
    uid = os.getuid()
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            if p.info["pid"] == me or (p.info["uids"] and p.info["uids"].real != uid):
                continue
            cmd = p.info["cmdline"] or []
            if any(pat.search(a) for a in cmd):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def tree(roots) -> dict[int, psutil.Process]:
    """Every live process of the given roots (Process, PID record or PID) and all their descendants, by PID."""
    procs: dict[int, psutil.Process] = {}
    for r in roots:
        p = r if isinstance(r, psutil.Process) else resolve(r)
        if p is None:
            continue
        try:
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    return procs


def kill_tree(roots: list[psutil.Process | dict | int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM every root and descendant; SIGKILL what is still alive after ``grace_s``. Returns the PIDs signalled."""
    procs = tree(roots)
    procs.pop(os.getpid(), None)
    if not procs:
        return []
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    return sorted(procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    ap.add_argument("pids", nargs="+", help="PID or PID@CREATE_TIME")
    a = ap.parse_args(argv)
    recs: list[dict | int] = []
    for s in a.pids:
        if "@" in s:
            pid, ct = s.split("@", 1)
            recs.append({"pid": int(pid), "create_time": float(ct)})
        else:
            recs.append(int(s))
    print(" ".join(str(p) for p in kill_tree(recs, a.grace)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
