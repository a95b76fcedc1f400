"The manual's generated parts agree with the notebooks (fast: reads files, runs nothing)."
import importlib.util, posixpath, re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("icrt_docs_tool", REPO/"tools"/"docs.py")
docs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(docs)

def test_readme_is_generated_from_the_index():
    text, figures = docs.readme()
    assert (REPO/"README.md").read_text(encoding="utf-8") == text, "README.md differs from nbs/index.ipynb: run `python tools/docs.py readme`"
    for path, data in figures.items(): assert path.is_file() and path.read_bytes() == data, f"{path} is stale: run `python tools/docs.py readme`"
    assert text.count("\n") <= docs.README_LIMIT

def test_readme_links_resolve():
    text = (REPO/"README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
        if not re.match(r"^[a-z]+:", target): assert (REPO/target).exists(), f"README links to {target}, which does not exist"

def test_the_map_lists_every_notebook_once():
    listed = [f for _, items in docs.nav_groups() for _, f in items]
    assert [g for g, _ in docs.nav_groups()] == ["Data", "Models", "Training", "Deploy", "Simulation and evaluation", "Benchmarks"]
    assert sorted(listed) == sorted(p.name for p in docs.notebooks()), "add the notebook to the map in nbs/index.ipynb"

def test_cell_ids_are_unique():
    "The bad-input tables and the README's figures name notebook cells by id: two cells with one id would be confused."
    for p in docs.notebooks():
        ids = [c.get("id") for c in docs.load_nb(p)["cells"]]
        assert len(ids) == len(set(ids)), f"{p.name}: cell ids used twice: {sorted({i for i in ids if ids.count(i) > 1})}"

def test_readme_says_nothing_a_notebook_says():
    assert docs.shared_runs() == {}, "the README repeats the notebooks' prose: `python tools/docs.py dupes`"

def test_bad_input_tables_are_current():
    for p in docs.notebooks():
        nb = docs.load_nb(p)
        assert docs.with_table(nb, p.name) == nb, f"{p.name}: its bad-input table is stale: run `python tools/docs.py tables`"
    rows = {p.name: docs.checks(docs.load_nb(p)) for p in docs.notebooks()}
    assert docs.GATHERED.read_text(encoding="utf-8") == docs.gathered(rows), "docs/bad_inputs.md is stale: run `python tools/docs.py tables`"

def test_checks_are_collected_from_test_fail_calls():
    nb = {"cells": [{"cell_type": "markdown", "id": "a", "source": ["## Paths\n"]},
                    {"cell_type": "code", "id": "b", "source": ['test_fail(lambda: load("nope.json"), contains="not found")\n',
                                                               'with ExceptionExpected(ex=ValueError, regex="bad"): f(1)\n']},
                    {"cell_type": "code", "id": "c", "source": ["#| eval: false\n", 'test_fail(lambda: never(), contains="x")\n']}]}
    rows = docs.checks(nb)
    assert [(r["section"], r["check"], r["says"]) for r in rows] == [
        ("Paths", "load('nope.json')", "not found"), ("Paths", "f(1)", "bad (ValueError)")]

def test_described_rows_name_real_tests():
    rows = docs.reliability_rows()
    assert len(rows) > 250
    names = {p.stem: p.read_text(encoding="utf-8") for p in (REPO/"tests").rglob("test_*.py")}
    missing = []
    for *_, where in rows:
        for f, t in re.findall(r"(test_\w+)\.py::(test_\w+)", where):
            if f not in names or not re.search(rf"def {t}\b", names[f]): missing.append(f"{f}.py::{t}")
        for nb in re.findall(r"\bnb (\d\w*[\w.]*)", where):
            if not (REPO/"nbs"/f"{nb}.ipynb").is_file(): missing.append(f"nb {nb}")
    assert not missing, f"docs/reliability.md names tests or notebooks that do not exist: {sorted(set(missing))}"

def test_report_pages_link_to_files_that_exist():
    bad = []
    for md in (REPO/"reports").rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", md.read_text(encoding="utf-8")):
            if not re.match(r"^[a-z]+:", target) and not (md.parent/target).exists(): bad.append(f"{md.relative_to(REPO)} -> {target}")
    assert not bad, f"report pages link to files that do not exist: {bad}"

def test_copied_report_pages_link_to_the_notebook_pages(tmp_path):
    "A report copied into the site points its `../../nbs/X.ipynb` links at X's page (the CI browser check caught this once)."
    md = next(p for p in (REPO/"reports").rglob("*.md") if ".ipynb" in p.read_text(encoding="utf-8"))
    docs._site_link(posixpath.relpath(md, REPO/"nbs"), tmp_path)
    staged = tmp_path/md.relative_to(REPO)
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", staged.read_text(encoding="utf-8")) if t.endswith(".ipynb")]
    assert targets and all((staged.parent/t).resolve().parent == tmp_path.resolve() for t in targets), targets
