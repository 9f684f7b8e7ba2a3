"""Summarize a gpu_check.sh work folder as one JSON object on stdout.

    python bench/gpu_summary.py WORK_DIR HAS_GPU

Holds: each step's exit code, seconds and limit (or why it was skipped), the test counts, the
memcheck verdicts, op and module speed-ups and peak memory against the reference, and the
training-step figures. Exits 1 when a step that ran failed, else 0.
"""
import json
import os
import sys
import xml.etree.ElementTree as ET


def _steps(work):
    steps, total, limits = {}, None, None
    path = os.path.join(work, "steps.txt")
    for line in open(path) if os.path.exists(path) else ():
        parts = line.split()
        if parts[:2] == ["limits", parts[1]] and parts[1].startswith("total="):
            limits = int(parts[1].split("=")[1])
        elif parts[:1] == ["total"]:
            total = int(parts[1].split("=")[1])
        elif len(parts) >= 2 and parts[1] == "skipped:":
            steps[parts[0]] = {"skipped": " ".join(parts[2:])}
        elif len(parts) >= 2 and parts[1].startswith("rc="):
            entry = {k: int(v) for k, v in (p.split("=") for p in parts[1:])}
            entry["timed_out"] = entry["rc"] in (124, 130, 137)
            steps[parts[0]] = entry
    return steps, total, limits


def _tests(work):
    path = os.path.join(work, "tests.xml")
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _memcheck(work, steps):
    out = {}
    for name, entry in steps.items():
        if not name.startswith("memcheck_"):
            continue
        backend = name[len("memcheck_"):]
        if "skipped" in entry:
            out[backend] = "skipped: " + entry["skipped"]
            continue
        log = open(os.path.join(work, name + ".log"), errors="replace").read()
        clean = "ERROR SUMMARY: 0 errors" in log
        out[backend] = "clean" if entry["rc"] == 0 and clean else f"FAILED (rc {entry['rc']})"
    return out


def _benchmarks(work):
    path = os.path.join(work, "bench.json")
    if not os.path.exists(path):
        return None
    try:
        data = json.load(open(path))
    except ValueError as exc:  # cut off before pytest-benchmark wrote it
        return {"error": str(exc)}
    groups = {}
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        variant = (b.get("params") or {}).get("backend") or (b.get("params") or {}).get("impl") or b["name"]
        groups.setdefault(b["group"], {})[variant] = {
            "median_ms": round(1e3 * extra.get("median_s", b["stats"]["median"]), 4),
            "peak_MiB": round(extra.get("peak_bytes", 0) / 2**20, 2),
        }
    for variants in groups.values():
        base = variants.get("reference")
        for name, v in variants.items():
            if base and name != "reference" and v["median_ms"] > 0:
                v["speedup_vs_reference"] = round(base["median_ms"] / v["median_ms"], 2)
                if base["peak_MiB"] > 0:
                    v["peak_vs_reference"] = round(v["peak_MiB"] / base["peak_MiB"], 4)
    return groups


def main(work: str, has_gpu: str) -> int:
    steps, total, limits = _steps(work)
    summary = {"gpu": has_gpu == "1", "total_seconds": total, "step_limits_total_seconds": limits, "steps": steps, "tests": _tests(work),
               "memcheck": _memcheck(work, steps), "benchmarks": _benchmarks(work)}
    info = os.path.join(work, "info.log")
    if os.path.exists(info):
        summary["info"] = open(info).read().splitlines()[:20]
    train = os.path.join(work, "train_step.json")
    if os.path.exists(train):
        try:
            summary["train_step"] = json.load(open(train))
        except ValueError as exc:
            summary["train_step"] = {"error": str(exc)}
    summary["needs_gpu"] = sorted(n for n, e in steps.items() if "needs a CUDA GPU" in e.get("skipped", ""))
    summary["failed_steps"] = sorted(n for n, e in steps.items() if e.get("rc", 0) != 0)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 1 if summary["failed_steps"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "0"))
