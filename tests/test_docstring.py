"""Finding where a docstring goes, the FIM split that asks for it, and formatting it."""

from __future__ import annotations

import ast

import pytest

from starcoder_lsp.docstring import fim_split, find_target, format_docstring, stop_at_quotes

SOURCE = '''import os


def add(a: int,
        b: int) -> int:  # a comment: with a colon
    return a + b


class Shape:
    """Has one."""

    def area(self):
        if True:
            return 0

    async def load(self, path="a:b"):
        pass


def empty():
'''


@pytest.mark.parametrize(
    ("line", "name", "body_line", "indent"),
    [
        (3, "add", 5, "    "),  # on the header
        (4, "add", 5, "    "),  # on its continuation line
        (5, "add", 5, "    "),  # in the body
        (11, "area", 12, "        "),
        (13, "area", 12, "        "),  # deep in a nested block
        (15, "load", 16, "        "),  # a ':' inside a string default
        (19, "empty", 20, "    "),  # no body yet: the file's indentation step
    ],
)
def test_find_target(line: int, name: str, body_line: int, indent: str) -> None:
    target = find_target(SOURCE, line)
    assert target is not None
    assert (target.name, target.body_line, target.indent) == (name, body_line, indent)


@pytest.mark.parametrize("line", [0, 1, 8, 9, 10, 99])
def test_no_target_outside_definitions_or_with_a_docstring(line: int) -> None:
    # 8-10: Shape has a docstring; 0-1: module level; 99: no such line
    assert find_target(SOURCE, line) is None


def test_tabs_and_one_line_definitions() -> None:
    assert find_target("def f():\n\treturn 1\n", 0).indent == "\t"
    assert find_target("def f(): return 1\n", 0) is None


def test_fim_split_brackets_the_docstring() -> None:
    target = find_target(SOURCE, 3)
    prefix, suffix = fim_split(SOURCE, target)
    assert prefix.endswith('-> int:  # a comment: with a colon\n    """')
    assert suffix.startswith('"""\n    return a + b\n')
    assert (prefix + suffix).replace('    """"""\n', "") == SOURCE


def test_format_one_and_several_lines() -> None:
    assert format_docstring("Add two numbers.", "    ") == '    """Add two numbers."""\n'
    assert format_docstring(' Add two.  """ and junk after', "  ") == '  """Add two."""\n'
    several = format_docstring("Add.\n\n    Args:\n        a: first\n    ", "    ")
    assert several == '    """Add.\n\n    Args:\n        a: first\n    """\n'
    assert format_docstring('   \n  """', "    ") == ""


def test_formatted_docstring_compiles_in_place() -> None:
    target = find_target(SOURCE, 3)
    lines = SOURCE.split("\n")
    for raw in ("Sum.", "Sum of a and b.\n  More words\\", 'Ends with a quote"'):
        docstring = format_docstring(raw, target.indent)
        edited = "\n".join(lines[: target.body_line]) + "\n" + docstring
        edited += "\n".join(lines[target.body_line :])
        tree = ast.parse(edited + "    pass\n")  # empty() needs a body to parse
        add = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
        assert ast.get_docstring(add)


def test_stop_rule() -> None:
    assert stop_at_quotes('Adds."""')
    assert not stop_at_quotes("Adds two")


def test_no_replacement_character_or_control_characters_in_a_docstring() -> None:
    written = "Add \x1b[1ma\x00 and b\ufffd.\r\n"
    assert format_docstring(written, "    ") == '    """Add [1ma and b."""\n'
