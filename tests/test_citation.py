"""CITATION.cff (how to cite this implementation and the papers it implements) and the README's claims."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_citation_file_is_cff_1_2_0_naming_un_mix_and_swav():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load(_read("CITATION.cff"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):  # required by CFF 1.2.0
        assert cff[key], key
    assert all("name" in a or "family-names" in a for a in cff["authors"])
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("Un-Mix: Rethinking Image Mixtures") and paper["year"] == 2022
    assert [a["family-names"] for a in paper["authors"]] == ["Shen", "Liu", "Liu", "Savvides", "Darrell", "Xing"]
    assert "2003.05438" in paper["url"] and "AAAI" in paper["collection-title"]
    titles = {r["title"]: r for r in cff["references"]}
    swav = titles["Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"]
    assert swav["authors"][0]["family-names"] == "Caron" and swav["year"] == 2020 and "2006.09882" in swav["url"]
    for ref in [paper, *cff["references"]]:
        assert {"type", "title", "authors"} <= set(ref)


def test_readme_quick_look_promises_no_numbers_and_docs_point_to_flags_md():
    readme = _read("README.md")
    assert "printed the\nsame numbers" not in readme and "Three runs printed" not in readme
    assert re.search(r"depend on the CPU and its\s+number of threads", readme)
    for name in os.listdir(os.path.join(ROOT, "docs")):
        if name.endswith(".md"):
            assert not re.search(r"listed in the\s+README", _read("docs", name)), name
