"""Refresh the study's tables in docs/sparsity_tax.md and the README from `study_tax report`.

    .venv/bin/python benchmarks/fill_study_tables.py     # from the repository root

The tables sit between `<!-- STUDY_TABLE_* -->` markers (and `<!-- README_STUDY_TABLE -->` in
the README); the text around them is written by hand."""
import re
import subprocess
import sys

rep = subprocess.run([sys.executable, "benchmarks/study_tax.py", "report"], capture_output=True, text=True, check=True).stdout
blocks = {}
for part in re.split(r"^#### ", rep, flags=re.M)[1:]:
    title, _, body = part.partition("\n")
    blocks[title.split(" ")[0]] = body.strip() + "\n"
names = {"MAIN": "main", "CAUSES": "causes", "LENGTH": "length", "NM": "N:M", "SEEDS": "seeds", "WARMUP": "warmup", "LARGE": "large", "MLR": "mlr", "SHORT": "short"}
p = "docs/sparsity_tax.md"
s = open(p).read()
for marker, key in names.items():
    start, end = f"<!-- STUDY_TABLE_{marker} -->", f"<!-- /STUDY_TABLE_{marker} -->"
    if start not in s:
        print("no marker", marker)
        continue
    i, j = s.index(start) + len(start), s.index(end)
    s = s[:i] + "\n" + blocks[key] + s[j:]
open(p, "w").write(s)
r = "README.md"
t = open(r).read()
start, end = "<!-- README_STUDY_TABLE -->", "<!-- /README_STUDY_TABLE -->"
i, j = t.index(start) + len(start), t.index(end)
t = t[:i] + "\n" + blocks["main"] + "\n" + blocks["length"] + t[j:]
open(r, "w").write(t)
print("filled")
