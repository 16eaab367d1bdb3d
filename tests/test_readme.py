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
