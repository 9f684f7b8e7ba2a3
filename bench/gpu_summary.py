"""Summarize a gpu_check.sh run (its OUT_DIR) as one JSON object on stdout."""
import json
import os
import sys
import xml.etree.ElementTree as ET


def main(out_dir: str) -> None:
    summary = {"steps": {}, "tests": None, "benchmarks": {}}
    steps = os.path.join(out_dir, "steps.txt")
    if os.path.exists(steps):
        for line in open(steps):
            parts = line.split()
            if len(parts) >= 2 and parts[1].startswith("rc="):
                summary["steps"][parts[0]] = {k: int(v) for k, v in (p.split("=") for p in parts[1:])}
    info = os.path.join(out_dir, "info.txt")
    if os.path.exists(info):
        summary["info"] = open(info).read().splitlines()
    tests = os.path.join(out_dir, "tests.xml")
    if os.path.exists(tests):
        root = ET.parse(tests).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bench = os.path.join(out_dir, "bench.json")
    data = None
    if os.path.exists(bench):
        try:
            data = json.load(open(bench))
        except ValueError as exc:  # the bench step was cut off before pytest-benchmark wrote it
            summary["benchmarks_error"] = f"{bench}: {exc}"
    if data is not None:
        summary["machine"] = data.get("machine_info", {}).get("cpu", {}).get("brand_raw")
        groups = {}
        for b in data.get("benchmarks", []):
            extra = b.get("extra_info", {})
            variant = b["param"] if b.get("param") else b["name"]
            variant = variant.split("-")[-1] if "-" in variant else variant
            groups.setdefault(b["group"], {})[variant] = {
                "median_ms": round(1e3 * extra.get("median_s", b["stats"]["median"]), 4),
                "peak_MiB": round(extra.get("peak_bytes", 0) / 2**20, 2),
                **{k: v for k, v in extra.items() if k not in ("median_s", "peak_bytes", "device")},
            }
        for group, variants in groups.items():
            base = variants.get("reference")
            for name, v in variants.items():
                if base and name != "reference" and v["median_ms"] > 0:
                    v["speedup_vs_reference"] = round(base["median_ms"] / v["median_ms"], 2)
                    if base["peak_MiB"] > 0:
                        v["peak_vs_reference"] = round(v["peak_MiB"] / base["peak_MiB"], 4)
        summary["benchmarks"] = groups
    json.dump(summary, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
