"""The worked examples in docs/ are what the code computes, byte for byte.

``scripts/doc_examples.py`` builds every example with the real code from fixed
keys, nonces and times; each sits in the docs as a fenced block after a
``<!-- example: NAME -->`` line. After a deliberate change, refresh them with
``.venv/bin/python scripts/doc_examples.py --write``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "doc_examples", ROOT / "scripts" / "doc_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("doc_examples", module)
    spec.loader.exec_module(module)
    return module


script = load_script()
EXAMPLES: dict[str, str] = script.examples()


def in_docs() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in script.DOCS:
        for name, body in script.BLOCK.findall(path.read_text()):
            assert name not in found, f"example {name!r} appears twice in docs/"
            found[name] = body
    return found


def test_every_example_is_in_the_docs_and_nothing_else() -> None:
    assert set(in_docs()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_in_the_docs_is_what_the_code_computes(name: str) -> None:
    assert in_docs().get(name) == EXAMPLES[name], (
        f"docs example {name!r} differs from the code; if the change is deliberate, run "
        ".venv/bin/python scripts/doc_examples.py --write"
    )


def test_every_example_marker_is_followed_by_its_block() -> None:
    """A marker whose block is malformed would silently escape the check above."""
    for path in script.DOCS:
        text = path.read_text()
        assert text.count("<!-- example: ") == len(script.BLOCK.findall(text)), path.name
