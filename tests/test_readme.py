"""The README shows examples/embed.py verbatim; the example itself runs in test_examples."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_embeds_the_example_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "embed.py").read_text().rstrip("\n")
    section = readme[readme.index("## Embedding"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    assert block[:block.index("\n```")] == example
