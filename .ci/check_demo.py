"""Check what `make demo` wrote: a plan that loads, density within the budget at every length, a report.

Usage: python .ci/check_demo.py OUT_DIR --budget B
"""

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", type=float, required=True)
    args = parser.parse_args()

    from moa_compress.plan import load_plan

    problems = [
        f"{args.out / name} missing"
        for name in ("plan.json", "report.md", "compress.json")
        if not (args.out / name).is_file()
    ]
    if problems:
        print("\n".join(problems))
        return 1
    plan = load_plan(args.out)
    summary = json.loads((args.out / "compress.json").read_text())
    lengths = [int(n) for n in summary["density"]]
    for n in lengths:
        density = plan.density(n)  # recomputed from the rules, not read from the summary
        status = "ok" if density <= args.budget + 1e-9 else "OVER BUDGET"
        print(f"length {n}: density {density:.4f} (budget {args.budget}) {status}")
        if density > args.budget + 1e-9:
            problems.append(f"density {density:.4f} > {args.budget} at {n}")
    if not lengths:
        problems.append("compress.json lists no lengths")
    report = (args.out / "report.md").read_text()
    if len(report.strip()) < 100:
        problems.append("report.md is (nearly) empty")
    print(
        f"report.md: {len(report.splitlines())} lines; eval: {'skipped' if 'skipped' in summary['eval'] else 'run'}"
    )
    print("\n".join(problems) or "demo outputs ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
