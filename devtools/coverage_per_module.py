"""Fail when any module of the integration is below the per-module coverage floor (reads .coverage)."""

from __future__ import annotations

import sys

import coverage


def main(floor: float) -> int:
    """Print the modules under ``floor`` percent; return 1 if there are any."""
    cov = coverage.Coverage()
    cov.load()
    low = []
    for path in sorted(cov.get_data().measured_files()):
        _, statements, _, missing, _ = cov.analysis2(path)
        if statements:
            percent = 100.0 * (len(statements) - len(missing)) / len(statements)
            if percent < floor:
                low.append((path, percent))
    for path, percent in low:
        print(f"[sarai] coverage of {path} is {percent:.1f} % (< {floor:g} % per module)")
    if not low:
        print(f"[sarai] every module is covered >= {floor:g} %")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 95.0))
