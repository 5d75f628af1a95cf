"""Shared helpers for the benchmarks in ``bench/``.

* ``interleaved``: time several variants side by side in one process (warm-up first, then rounds
  that alternate the order A B / B A so drift on a shared machine hits every variant alike).
* ``summarize`` / ``paired_ratio``: medians, spreads, and the median of per-round ratios (the
  robust figure on a loaded machine: both timings of a round ran seconds apart).
* ``PeakRSS``: peak resident memory of a code region in *this* process, from Linux's VmHWM after
  resetting it through ``/proc/self/clear_refs`` (torch's CPU allocations are invisible to
  tracemalloc). Run each variant in its own subprocess (``run_child_json``) so that one variant's
  freed-but-kept heap cannot hide the other's peak.
* ``machine_info``: cores, threads, torch version, load average (state it next to every figure).
* ``write_json`` (atomic) and ``update_markdown_section`` (replace the text between
  ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in BENCHMARKS.md, atomically).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from stamina_core.errors import StaminaError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")
RESULTS_DIR = os.path.join(REPO, "bench", "results")


class BenchError(StaminaError, RuntimeError):
    """A benchmark could not run or could not write its results (names the file or step)."""


# -- timing -------------------------------------------------------------------------------------

def interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    before: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Time each variant ``repeats`` times, interleaved; returns {name: {"wall_s": [...], "cpu_s": [...]}}.

    Round ``i`` runs the variants in the given order when ``i`` is even and reversed when odd
    (A B, B A, ...). ``before[name]`` (untimed) runs right before each call of ``name`` (e.g. to
    install that variant's adapters). Warm-up calls (untimed) run first, in the same alternation.
    ``wall_s`` is ``time.perf_counter``; ``cpu_s`` is this process's CPU time
    (``time.process_time``): with one torch thread it is the work done, and far less sensitive
    than wall time to other jobs competing for the cores.
    """
    if repeats < 1:
        raise BenchError(f"repeats: must be >= 1, got {repeats}")
    names = list(variants)
    before = before or {}
    times: dict[str, dict[str, list[float]]] = {n: {"wall_s": [], "cpu_s": []} for n in names}
    for i in range(warmup + repeats):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            if n in before:
                before[n]()
            c0, t0 = time.process_time(), time.perf_counter()
            variants[n]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times[n]["wall_s"].append(dt)
                times[n]["cpu_s"].append(dc)
    return times


def summarize(xs: list[float]) -> dict[str, float]:
    """Median, min, max, mean and inter-quartile range of a list of timings (seconds)."""
    if not xs:
        raise BenchError("summarize: no timings (repeats must be >= 1)")
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0], xs[0], xs[0]]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
        "iqr": q[2] - q[0],
    }


def mean_std(vals) -> str:
    """'mean ± sample std' of the finite values (None and NaN skipped), 'mean' for one value, '–' for none."""
    v = [float(x) for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return "–"
    m = sum(v) / len(v)  # plain float arithmetic, as numpy's mean/std(ddof=1) gave before
    if len(v) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)):.3f}"


def density_column(runs: list[dict]) -> str:
    """Mean mask density per adapted layer type over every concept and seed of continual runs, e.g.
    '0.11 / 0.24 (to_k / to_v)'; '–' for methods without masks."""
    dens = [x["density_by_type"] for x in runs if x.get("density_by_type") and x["density_by_type"][0]]
    if not dens:
        return "–"
    types = sorted(dens[0][0])
    col = " / ".join(f"{statistics.fmean([d[t] for run in dens for d in run]):.2f}" for t in types)
    return col + " (" + " / ".join(t.split(".")[-1] for t in types) + ")"


def pairs_column(runs: list[dict]) -> str:
    """The multi-concept cell: the single-label judge's top-2 rule over every run with pairs and, for runs scored by
    the two-label judge too (since session 12), its both-found rate, e.g. '0.000 ± 0.000 / 2-label 0.125 (2 runs)'."""
    got = [x["pairs"] for x in runs if x.get("pairs")]
    col = "–"
    if got:
        col = mean_std([p["mean_both"] for p in got])
        two = [p["mean_both_2label"] for p in got if "mean_both_2label" in p]
        if two:
            col += f" / 2-label {mean_std(two)}" + (f" ({len(two)} of {len(got)} runs)" if len(two) < len(got) else "")
    bp = [x["base_pairs"] for x in runs if x.get("base_pairs")]
    if bp:  # --base-pairs (session 13): the base's own animal pairs before the first concept and after the last
        col += (f"; base animals' pairs {mean_std([b['before']['mean_both_2label'] for b in bp])} → "
                f"{mean_std([b['after']['mean_both_2label'] for b in bp])} (another pair's "
                f"{mean_std([b['after']['mean_both_2label_other'] for b in bp])} after)")
    return col


def continual_results(results_dir: str) -> list[dict]:
    """The reported (non-tuning) ``continual-*.json`` results in a folder: headline rows (no ``--tag``) first,
    then tagged variants, each group by method and tag."""
    out = []
    for fn in sorted(os.listdir(results_dir)):
        if fn.startswith("continual-") and fn.endswith(".json"):
            with open(os.path.join(results_dir, fn)) as f:
                r = json.load(f)
            if not r.get("tuning"):
                out.append(r)
    return sorted(out, key=lambda r: (bool(r.get("tag")), r["method"], r.get("tag", "")))


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Ratios num[i] / den[i] of the same round (median, min, max); also the ratios of medians and of minima.

    On a loaded machine the noise only adds time, so the ratio of minima is a useful cross-check.
    """
    if len(num) != len(den) or not num:
        raise BenchError(f"paired_ratio: need equal, non-empty timing lists (got {len(num)} and {len(den)})")
    rs = [a / b for a, b in zip(num, den)]
    return {
        "median_of_paired": statistics.median(rs),
        "min_paired": min(rs),
        "max_paired": max(rs),
        "ratio_of_medians": statistics.median(num) / statistics.median(den),
        "ratio_of_mins": min(num) / min(den),
        "paired": rs,
    }


# -- memory -------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/self/status: no {field} line (peak-RSS measurement needs Linux)")


class PeakRSS:
    """Peak resident set size of a region: ``with PeakRSS() as m: ...``; then ``m.result()``.

    On entry it records the current RSS and resets the kernel's high-water mark (write ``5`` to
    ``/proc/self/clear_refs``, Linux >= 4.0); on exit it reads VmHWM. ``increment`` = peak - start
    is the memory the region added on top of what was already resident (the model, for training).
    """

    method = "Linux VmHWM (peak RSS) reset via /proc/self/clear_refs, one subprocess per variant"

    def __enter__(self) -> "PeakRSS":
        import gc

        gc.collect()
        self.start_kib = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError as e:
            raise BenchError(f"/proc/self/clear_refs: cannot reset the peak-RSS mark ({e}); run on Linux >= 4.0") from None
        return self

    def __exit__(self, *exc) -> None:
        self.peak_kib = _status_kib("VmHWM")
        self.end_kib = _status_kib("VmRSS")

    def result(self) -> dict[str, float]:
        mib = 1.0 / 1024.0
        return {
            "start_mib": self.start_kib * mib,
            "peak_mib": self.peak_kib * mib,
            "end_mib": self.end_kib * mib,
            "increment_mib": (self.peak_kib - self.start_kib) * mib,
        }


def run_child_json(argv: list[str], timeout_s: float = 300.0, env: dict[str, str] | None = None) -> dict:
    """Run ``argv`` (a Python child), return the JSON object on the last line of its stdout."""
    full_env = {**os.environ, **(env or {})}
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=full_env, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise BenchError(f"child {' '.join(argv[1:4])} ran past {timeout_s:.0f} s; lower its steps or size") from None
    if cp.returncode != 0:
        tail = (cp.stderr or "").strip().splitlines()[-1:] or ["<no stderr>"]
        raise BenchError(f"child {' '.join(argv[1:])} failed (rc {cp.returncode}): {tail[0]}")
    lines = [ln for ln in cp.stdout.strip().splitlines() if ln.strip()]
    if not lines:
        raise BenchError(f"child {' '.join(argv[1:])} printed no JSON result")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise BenchError(f"child {' '.join(argv[1:])}: last stdout line is not JSON: {lines[-1][:120]!r}") from None


# -- machine ------------------------------------------------------------------------------------

def machine_info() -> dict:
    """Cores, threads, versions and load average (1/5/15 min) right now."""
    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- output -------------------------------------------------------------------------------------

def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, data: dict) -> str:
    """Write ``data`` as indented JSON, atomically (a reader never sees a half-written file)."""
    _atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def update_markdown_section(path: str, name: str, body: str, header: str = "") -> str:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Creates the file (with ``header``) when missing and appends the marked section when absent.
    Refuses a file whose markers for ``name`` are duplicated or out of order.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    elif header:
        text = header.rstrip() + "\n"
    ns, ne = text.count(start), text.count(end)
    if ns == 0 and ne == 0:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    elif ns == 1 and ne == 1 and text.index(start) < text.index(end):
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: block, text, count=1, flags=re.S)
    else:
        raise BenchError(
            f"{path}: markers for section {name!r} are broken ({ns} start, {ne} end, or end before start); "
            f"fix them by hand so that exactly one '{start}' precedes one '{end}'"
        )
    _atomic_write(path, text)
    return path


def python_child(script: str, *args: str) -> list[str]:
    """argv for running ``script`` with this interpreter (the venv's python)."""
    return [sys.executable, script, *args]


# -- which base model a benchmark runs on ---------------------------------------------------------

# The base of every table written before session 10 (stamina_core.pretrain.legacy_pretrain_config: UNet 32,64,64,
# plain MSE, 2400 steps on 1 thread); PretrainConfig's default until session 10.
LEGACY_BASE_KEY = "tiny-f4f0e6d5b69f"


def add_base_args(p) -> None:
    """``--base-set FIELD=VALUE``: pretrain (or reuse) another base than ``PretrainConfig()``'s."""
    p.add_argument("--base-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="PretrainConfig override of the base, repeatable (e.g. max_train_steps=2400, threads=1, "
                        "snr_gamma=none, model.block_out_channels=32,64,64: dotted fields reach nested configs, a "
                        "comma makes a list, 'none' is None); those four are the legacy base of the tables before "
                        "session 10 (the Makefile's BASE_LEGACY)")


def base_argv(args) -> list[str]:
    """``--base-set`` as given, to pass on to a child benchmark."""
    return [a for s in getattr(args, "base_set", []) for a in ("--base-set", s)]


def base_pretrain_config(args, **fields):
    """The validated ``PretrainConfig`` of ``--base-set`` (plus ``fields``); one clear line (SystemExit) naming
    the field on a bad value or an unknown field. Values stay strings for pydantic to coerce, as for ``--set``;
    a dotted FIELD reaches a nested config, a comma in VALUE makes a list and ``none`` is None."""
    from stamina_core.config import parse
    from stamina_core.errors import ConfigError
    from stamina_core.pretrain import PretrainConfig

    upd = dict(fields)
    for item in getattr(args, "base_set", []):
        key, sep, raw = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise SystemExit(f"--base-set: expected FIELD=VALUE, got {item!r}")
        node = upd  # dotted keys reach nested configs, e.g. model.block_out_channels=16,48,48
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--base-set: {key.strip()!r}: {p!r} is not a nested config")
        if raw.strip().lower() in ("none", "null"):
            node[parts[-1]] = None  # an optional field back at None (e.g. snr_gamma=none: plain MSE)
        else:
            node[parts[-1]] = raw.split(",") if "," in raw else raw  # a comma makes a list (strings; pydantic coerces)
    try:
        return parse(PretrainConfig, upd, source="--base-set")
    except ConfigError as e:
        raise SystemExit(str(e))


def base_key(result: dict) -> str:
    """The cache folder name (``tiny-<config hash>``) of the base a ``continual-*.json`` ran on; files written
    before runs recorded their base (session 8) all ran on the 2400-step base."""
    runs = result.get("runs") or [{}]
    b = runs[0].get("base")
    return os.path.basename(b["dir"].rstrip("/")) if b and b.get("dir") else LEGACY_BASE_KEY
