"""
Print "<passed> <failed> <skipped>" from the last PASSED/FAILED line of a trial log (file named by
the first argument), for .ci/run and .ci/pypy.
"""

import re
import sys

text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
lines = [each for each in text.splitlines() if each.startswith(("PASSED", "FAILED"))]
line = (lines or [""])[-1]
counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
passed = counts.get("successes", 0)
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
print(passed, failed, counts.get("skips", 0))
