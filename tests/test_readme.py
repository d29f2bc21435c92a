"""The README's example runs as written: its ```python block is a doctest, executed here against the real modules."""
import doctest
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) == 5, "the README shows one five-line example"
    test = doctest.DocTestParser().get_doctest(blocks[0], {}, "README.md", str(README), 0)
    result = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(test)
    assert result.failed == 0 and result.attempted == 4
