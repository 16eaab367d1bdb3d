"""The README's configuration reference is generated from the spec models: keep it current."""

from farm.spec import reference_markdown

from .conftest import REPO


def test_readme_reference_matches_the_spec():
    text = (REPO / "README.md").read_text()
    start = text.index("-->", text.index("<!-- reference:start")) + len("-->")
    end = text.index("<!-- reference:end -->")
    assert text[start:end].strip() == reference_markdown().strip(), (
        "README configuration reference is stale: regenerate it with "
        "python -c 'from farm.spec import reference_markdown; print(reference_markdown())'")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def test_readme_contents_list_every_section_and_every_link_lands():
    text = (REPO / "README.md").read_text()
    headings = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    contents = text[text.index("<!-- contents:start -->"):text.index("<!-- contents:end -->")]
    listed = [line.split("](#", 1)[1].rstrip(")") for line in contents.splitlines() if "](#" in line]
    assert listed == [_anchor(h) for h in headings]
    anchors = {_anchor(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")}
    import re

    broken = sorted({link for link in re.findall(r"\]\(#([^)]+)\)", text)} - anchors)
    assert not broken, f"links to no heading: {broken}"
