"""Documents cited in the code exist, with the sections cited; docs/performance.md is what
benchmarks/tools/performance_md.py makes of benchmarks/results/."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("csrc", "python", "benchmarks", "tests") for p in (ROOT / d).rglob("*")
           if p.suffix in {".py", ".h", ".cpp", ".cu", ".sh"}]
CITATION = re.compile(r"docs/([\w-]+\.md)(?:,\s*\"([^\"]+)\")?")


def _headings(doc: pathlib.Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.*)$", doc.read_text(), re.M)}


def test_cited_documents_and_sections_exist():
    cited = 0
    for path in SOURCES:
        text = re.sub(r"\s*(#|//)\s*", " ", path.read_text(errors="replace"))  # join wrapped comments
        for m in CITATION.finditer(text):
            doc = ROOT / "docs" / m.group(1)
            assert doc.exists(), f"{path.relative_to(ROOT)} cites {doc.relative_to(ROOT)}, which is missing"
            if m.group(2):
                assert m.group(2) in _headings(doc), f"{path.relative_to(ROOT)} cites \"{m.group(2)}\" in {m.group(1)}"
            cited += 1
    assert cited > 10


def test_no_citations_of_documents_outside_the_repository():
    # Notes kept outside the repository, or issue numbers, mean nothing to a reader.
    outside = re.compile(r"\b(DESIGN|STYLE|BRIEF|EVAL)\.md\b|\bMETHOD\b|\bissue \d+\b")
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in SOURCES + docs if p.name != "test_docs.py"
            for m in outside.finditer(p.read_text(errors="replace"))]
    assert not hits, hits


def test_performance_page_is_generated_from_the_results():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tools" / "performance_md.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
