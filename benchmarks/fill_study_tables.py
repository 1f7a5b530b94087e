"""Refresh the study's tables in docs/sparsity_tax.md and the README from `study_tax report`.

    .venv/bin/python benchmarks/fill_study_tables.py           # from the repository root
    .venv/bin/python benchmarks/fill_study_tables.py --check   # only say whether they are current

The tables sit between `<!-- STUDY_TABLE_* -->` markers in the study (and between
`<!-- README_STUDY_TABLE -->` markers in the README, which shows the main table only); the text
around them is written by hand. `tests/test_study_tables.py` checks that the checked-in tables
are what the checked-in records give."""

import re
import subprocess
import sys
from typing import Dict, Tuple

# marker in docs/sparsity_tax.md -> the report's block title (its first word)
DOC_TABLES = {
    "MAIN": "main",
    "CAUSES": "causes",
    "LENGTH": "length",
    "NM": "N:M",
    "SEEDS": "seeds",
    "WARMUP": "warmup",
    "LARGE": "large",
    "MLR": "mlr",
    "SHORT": "short",
    "TARGETS": "targets",
    "PRACTITIONERS": "practitioners",
}
README_BLOCKS = ("main",)  # the README's headline table; the others are in the study


def report_blocks(report: str) -> Dict[str, str]:
    """The report's tables by title (`#### <title> ...` headings)."""
    blocks = {}
    for part in re.split(r"^#### ", report, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        blocks[title.split(" ")[0]] = body.strip() + "\n"
    return blocks


def _replace(text: str, start: str, end: str, body: str) -> str:
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body + text[j:]


def fill(doc: str, readme: str, report: str) -> Tuple[str, str]:
    """docs/sparsity_tax.md and README.md with their tables replaced by the report's."""
    blocks = report_blocks(report)
    for marker, key in DOC_TABLES.items():
        start, end = f"<!-- STUDY_TABLE_{marker} -->", f"<!-- /STUDY_TABLE_{marker} -->"
        if start not in doc:
            print("no marker", marker)
            continue
        doc = _replace(doc, start, end, blocks[key])
    readme = _replace(
        readme, "<!-- README_STUDY_TABLE -->", "<!-- /README_STUDY_TABLE -->", "\n".join(blocks[k] for k in README_BLOCKS)
    )
    return doc, readme


def main() -> None:
    check = "--check" in sys.argv[1:]
    rep = subprocess.run([sys.executable, "benchmarks/study_tax.py", "report"], capture_output=True, text=True, check=True).stdout
    with open("docs/sparsity_tax.md") as f, open("README.md") as g:
        old_doc, old_readme = f.read(), g.read()
    doc, readme = fill(old_doc, old_readme, rep)
    if check:
        stale = [
            name for name, old, new in (("docs/sparsity_tax.md", old_doc, doc), ("README.md", old_readme, readme)) if old != new
        ]
        if stale:
            sys.exit(f"tables differ from the records in: {', '.join(stale)} (run without --check to refill)")
        print("tables are current")
        return
    with open("docs/sparsity_tax.md", "w") as f, open("README.md", "w") as g:
        f.write(doc)
        g.write(readme)
    print("filled")


if __name__ == "__main__":
    main()
