"""Cross-file context: each family's format token by token, ranking, budgets, the current
document never quoted, and a block that holds still while the user types (context.py)."""

from __future__ import annotations

import contextlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from starcoder_lsp import checkpoint
from starcoder_lsp.cache import common_prefix
from starcoder_lsp.completer import Completer
from starcoder_lsp.config import PRESETS, STARCODER2
from starcoder_lsp.context import CHUNK_LINES, Chunk, CrossFile, Source, identifiers, jaccard
from starcoder_lsp.engine import Engine
from starcoder_lsp.prompt import PromptOptions, build_prompt, counter_for
from starcoder_lsp.random_tokenizer import train_tokenizer
from starcoder_lsp.runner import Runner
from starcoder_lsp.settings import Settings, SettingsError
from starcoder_lsp.special_tokens import special_tokens

# Three files of a small project: `shapes.py` shares the cursor's identifiers, the others not.
SHAPES = (
    "class Rectangle:\n"
    "    def __init__(self, width, height):\n"
    "        self.width = width\n"
    "        self.height = height\n"
    "\n"
    "    def area(self):\n"
    "        return self.width * self.height\n"
)
NETWORK = (
    "import socket\n"
    "\n"
    "def fetch(host, port):\n"
    "    connection = socket.create_connection((host, port))\n"
    "    return connection.recv(1024)\n"
)
STRINGS = "def shout(message):\n    return message.upper() + '!'\n"
CURRENT = "from shapes import Rectangle\n\nbox = Rectangle(width=3, height=4)\nprint(box."
OTHERS = {"pkg/shapes.py": SHAPES, "pkg/network.py": NETWORK, "pkg/strings.py": STRINGS}


@pytest.fixture(scope="module")
def starcoder(tiny_mqa_dir):
    return checkpoint.load_tokenizer(tiny_mqa_dir)


@pytest.fixture(scope="module")
def starcoder2():
    tokenizer = train_tokenizer(PRESETS["test-tiny-2"].vocab_size, family=STARCODER2)
    return tokenizer, special_tokens(tokenizer)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def project(files: dict[str, str], current: str = "main.py", repo: str = "proj") -> CrossFile:
    """A CrossFile over `files` opened in order, plus the current document."""
    documents = {path: Source(path, path, text) for path, text in files.items()}
    documents[current] = Source(current, current, CURRENT)
    cross = CrossFile(lambda: list(documents.values()), repo=repo)
    cross.documents_by_path = documents  # for the tests that change a file
    for path in files:
        cross.opened(path)
    return cross


def block_for(cross, tok, budget=400, sources=("open", "edited", "pushed"), before=CURRENT):
    tokenizer, t = tok
    return cross.block("main.py", before, "", 0, budget, sources, t, counter_for(tokenizer))


def test_starcoder_quotes_files_as_documents_with_filename_headers(starcoder):
    tokenizer, t = starcoder
    block = block_for(project({"pkg/shapes.py": SHAPES}), starcoder)
    # StarCoder's training documents: <filename>path\ncode<|endoftext|>, one after another.
    assert list(block.ids) == [t.filename, *enc(tokenizer, "pkg/shapes.py\n" + SHAPES), t.eos]
    # The block goes first, then the file's own header and the FIM prompt (SPM).
    options = PromptOptions(prefix_tokens=100, suffix_tokens=100, filename="main.py")
    prompt = build_prompt(CURRENT, len(CURRENT), tokenizer, t, options, context=block.ids)
    assert prompt.ids == [
        *block.ids,
        t.filename,
        *enc(tokenizer, "main.py\n"),
        t.fim_prefix,
        t.fim_suffix,
        t.fim_middle,
        *enc(tokenizer, CURRENT),
    ]
    assert prompt.context_tokens == len(block.ids)


def test_starcoder2_quotes_files_in_its_repository_format(starcoder2):
    tokenizer, t = starcoder2
    block = block_for(project({"pkg/shapes.py": SHAPES}), starcoder2)
    # StarCoder2's repositories: <repo_name>name<file_sep>path\ncode<file_sep>path\ncode...
    assert list(block.ids) == [
        t.repo_name,
        *enc(tokenizer, "proj"),
        t.file_sep,
        *enc(tokenizer, "pkg/shapes.py\n" + SHAPES),
    ]
    tail = CURRENT.split("\n")[-1]
    options = PromptOptions(mode="psm", prefix_tokens=100, suffix_tokens=100, filename="main.py")
    prompt = build_prompt(tail, len(tail), tokenizer, t, options, context=block.ids)
    # ...and FIM inside the repository's last file: <file_sep><fim_prefix>path\nprefix...
    assert prompt.ids == [
        *block.ids,
        t.file_sep,
        t.fim_prefix,
        *enc(tokenizer, "main.py\n"),
        *enc(tokenizer, tail),
        t.fim_suffix,
        t.fim_middle,
    ]
    # Without a file name, the current file still starts a file of its own.
    nameless = PromptOptions(mode="psm", prefix_tokens=100, suffix_tokens=100)
    prompt = build_prompt(tail, len(tail), tokenizer, t, nameless, context=block.ids)
    assert prompt.ids[: len(block.ids) + 2] == [*block.ids, t.file_sep, t.fim_prefix]
    assert build_prompt(tail, len(tail), tokenizer, t, nameless).ids[0] == t.fim_prefix


def test_the_chunk_sharing_the_cursor_s_identifiers_is_chosen(starcoder):
    tokenizer, t = starcoder
    # Room for one file only: the one that speaks of rectangles, widths and heights.
    cost = 2 + len(enc(tokenizer, "pkg/shapes.py\n" + SHAPES))
    block = block_for(project(OTHERS), starcoder, budget=cost + 5)
    assert [c.path for c in block.chunks] == ["pkg/shapes.py"]
    # With room for all, files that share nothing with the cursor's code still stay out.
    assert [c.path for c in block_for(project(OTHERS), starcoder, 4000).chunks] == ["pkg/shapes.py"]
    assert jaccard(identifiers(SHAPES), identifiers(CURRENT)) > 0
    assert jaccard(identifiers(NETWORK), identifiers(CURRENT)) == 0


@pytest.mark.parametrize("family", ["starcoder", "starcoder2"])
def test_budgets_hold_and_a_long_chunk_is_cut_to_the_lines_that_fit(family, request):
    tok = request.getfixturevalue(family)
    long_file = "".join(f"rectangle_{i} = Rectangle(width={i}, height={i})\n" for i in range(60))
    cross = project({"long.py": long_file, **OTHERS})
    for budget in (0, 20, 60, 150, 400, 1000):
        block = block_for(cross, tok, budget)
        assert len(block.ids) <= budget
    cut = block_for(cross, tok, 150)
    assert cut.chunks and all(c.lines < CHUNK_LINES for c in cut.chunks if c.path == "long.py")
    assert all(c.text.endswith("\n") for c in cut.chunks)


def test_the_first_candidate_that_does_not_fit_ends_the_block():
    """Cut to its lines that fit, or left out when too few do; the thousands of windows after
    it are not tokenized one by one to look for one that would still fit."""
    from starcoder_lsp.context import select

    calls = []

    def lines(chunk: Chunk) -> int:
        calls.append(chunk)
        return chunk.lines

    a = Chunk("a.py", 0, "a = 1\n" * 10, "open", 0.9)
    b = Chunk("b.py", 0, "b = 2\n" * 10, "open", 0.8)
    rest = [Chunk(f"c{i}.py", 0, f"c = {i}\n" * 2, "open", 0.5) for i in range(1000)]
    candidates = [("a", a), ("b", b), *((c.path, c) for c in rest)]
    assert [c for _, c in select(candidates, 15, lines)] == [
        a,
        Chunk("b.py", 0, "b = 2\n" * 5, "open", 0.8),
    ]
    calls.clear()
    assert [c for _, c in select(candidates, 12, lines)] == [a]  # b's first 3 lines do not fit
    assert len(calls) < 10


def test_the_current_document_is_never_quoted(starcoder):
    cross = project(OTHERS)
    cross.push("main.py", "main.py", "box = Rectangle(width=1, height=2)\n" * 3)
    yank = "area = Rectangle(width=5, height=6).area()\n" * 3
    cross.push("main.py#yank", "main.py", yank, origin="main.py")
    cross.edited("main.py", 2)
    block = block_for(cross, starcoder, 4000)
    assert block.chunks and all(c.path != "main.py" for c in block.chunks)


def test_pushed_text_and_recent_edits_are_sources_as_the_settings_say(starcoder):
    cross = project({"pkg/network.py": NETWORK})
    cross.push("yank", "pkg/geometry.py", "def scale(rectangle, width, height):\n    pass\n")
    assert [c.source for c in block_for(cross, starcoder).chunks] == ["pushed"]
    assert block_for(cross, starcoder, sources=("open",)).chunks == ()
    # An edit in an open file: the lines around it, ahead of equally similar windows.
    documents = cross.documents_by_path
    documents["pkg/network.py"] = Source("pkg/network.py", "pkg/network.py", SHAPES)
    cross.opened("pkg/network.py")
    cross.edited("pkg/network.py", 3)
    sources = {c.source for c in block_for(cross, starcoder, 4000, ("open", "edited")).chunks}
    assert "edited" in sources
    assert {c.source for c in block_for(cross, starcoder, 4000, ("edited",)).chunks} == {"edited"}


def test_the_block_holds_still_while_typing_and_changes_at_coarse_events(starcoder):
    cross = project(OTHERS)
    typed = [CURRENT + "area"[:n] for n in range(5)]
    blocks = [block_for(cross, starcoder, 4000, before=text) for text in typed]
    assert all(b is blocks[0] for b in blocks) and cross.builds == 1
    # The cursor moving to another region rebuilds it (the same chunks: the same ids).
    far = "\n" * 100 + CURRENT
    assert block_for(cross, starcoder, 4000, before=far).ids == blocks[0].ids
    assert cross.builds == 2
    # A pushed file goes after the older sources: the block's head, and its cache, stay.
    cross.push("yank", "pkg/geometry.py", "def perimeter(rectangle):\n    return 2 * width\n")
    pushed = block_for(cross, starcoder, 4000)
    assert cross.builds == 3 and len(pushed.ids) > len(blocks[0].ids)
    assert common_prefix(list(pushed.ids), list(blocks[0].ids)) == len(blocks[0].ids)
    assert [c.path for c in pushed.chunks][-1] == "pkg/geometry.py"


def test_a_block_for_later_is_built_when_called_from_the_sources_as_they_were(starcoder):
    """The engine builds a request's block when it admits it: one superseded before costs
    nothing, and files changed meanwhile do not change what the request was made from."""
    tokenizer, t = starcoder
    cross = project({"pkg/shapes.py": SHAPES})
    counter = counter_for(tokenizer)
    later = cross.later("main.py", CURRENT, "", 0, 4000, ("open",), t, counter)
    assert cross.builds == 0
    cross.documents_by_path["pkg/shapes.py"] = Source("pkg/shapes.py", "pkg/shapes.py", "")
    cross.saved("pkg/shapes.py")
    block = later()
    assert cross.builds == 1 and [c.path for c in block.chunks] == ["pkg/shapes.py"]
    assert block.ids == block_for(project({"pkg/shapes.py": SHAPES}), starcoder, 4000).ids
    # Made again with the same inputs, it is the block built then, not a new one.
    again = project({"pkg/shapes.py": SHAPES})
    first = again.later("main.py", CURRENT, "", 0, 4000, ("open",), t, counter)
    second = again.later("main.py", CURRENT, "", 0, 4000, ("open",), t, counter)
    assert first() is second() and again.builds == 1
    # Now the change is seen.
    assert block_for(cross, starcoder, 4000, ("open",)).chunks == ()


def test_select_never_takes_overlapping_lines_of_one_source_twice():
    from starcoder_lsp.context import select

    a = Chunk("a.py", 0, "x = 1\n" * 10, "open", 0.5)
    b = Chunk("a.py", 5, "y = 2\n" * 10, "edited", 0.9)
    c = Chunk("b.py", 0, "x = 1\n" * 10, "open", 0.4)  # the same text as `a`
    chosen = select([("a", a), ("a", b), ("b", c)], 1000, lambda chunk: chunk.lines)
    assert [chunk for _, chunk in chosen] == [b, c]


def test_the_context_budget_is_a_quarter_of_the_context_where_the_rest_allows():
    assert Settings().context_budget(8192) == 2048
    assert Settings(cross_file_context=False).context_budget(8192) == 0
    assert Settings(cross_file_sources="").context_budget(8192) == 0
    assert Settings(cross_file_tokens=100).context_budget(8192) == 100
    # 512 - 400 new - 4 special: 108 left, half of it for the windows.
    assert Settings(max_new_tokens=400).context_budget(512) == 53
    Settings(max_new_tokens=400).check_context(512)
    # Windows set by the user: the context takes what they leave, up to a quarter.
    assert (
        Settings(prefix_tokens=300, suffix_tokens=120, max_new_tokens=8).context_budget(512) == 80
    )
    with pytest.raises(SettingsError, match="crossFileTokens 500"):
        Settings(cross_file_tokens=500).check_context(512)
    with pytest.raises(SettingsError, match="crossFileSources must list"):
        Settings(cross_file_sources="open,disk")
    assert Settings(cross_file_sources="pushed,open").sources() == ("open", "pushed")
    # What the block takes is left out of the windows' shares, and nothing more.
    assert Settings().budgets(512, reserved=0) == Settings().budgets(512)
    prefix, suffix = Settings().budgets(512, reserved=100)
    assert prefix + suffix == 512 - 64 - 4 - 100


# --- over the engine: the keystroke cache with three other files open -----------------------

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_typing_with_three_other_files_open_prefills_only_the_typed_tokens(tiny_mqa_dir):
    """The block sits before everything a keystroke changes: typing appends to an SPM prompt
    as it did without context, and the suggestions are those of prompts made without a cache."""
    ckpt = checkpoint.load(tiny_mqa_dir)
    source = (STDLIB / "textwrap.py").read_text()
    others = [Source(name, name, (STDLIB / name).read_text()) for name in OTHER_FILES]
    start = sum(len(line) for line in source.splitlines(keepends=True)[:60])
    keystrokes = [(source[: start + n] + source[start + 80 :], start + n) for n in range(1, 81)]
    settings = Settings(max_new_tokens=8, prefix_tokens=200, suffix_tokens=100, fim_mode="spm")
    runs = {}
    for cached in (True, False):
        cross = CrossFile(lambda: [*others, Source("doc", "textwrap.py", "")])
        for other in others:
            cross.opened(other.key)
        with _completer(ckpt, cached) as completer:
            runs[cached] = [
                completer.complete("doc", text, cursor, settings, context=cross)
                for text, cursor in keystrokes
            ]
    made = [(a, b) for a, b in zip(runs[True], runs[False], strict=True) if not a.typed_through]
    assert len(made) > 20
    assert all(len(a.context) > 50 for a, _ in made)  # every prompt quoted the other files
    assert all(a.prompt.ids[: len(a.context)] == list(a.context.ids) for a, _ in made)
    assert [a.result.tokens for a, _ in made] == [b.result.tokens for _, b in made]
    assert [a.text for a in runs[True]] == [b.text for b in runs[False]]
    prefill = sorted(a.result.prefilled_tokens for a, _ in made)
    assert prefill[len(prefill) // 2] <= 8
    assert min(b.result.prefilled_tokens for _, b in made) > 100


OTHER_FILES = ("shlex.py", "string.py", "glob.py")


@contextlib.contextmanager
def _completer(ckpt, prefix_cache: bool) -> Iterator[Completer]:
    runner = Runner.from_checkpoint(ckpt, slots=2, chunks=(4, 16, 64), batches=(1, 2))
    engine = Engine(runner, ckpt.tokenizer.decode, ckpt.tokens.stop_ids, prefix_cache)
    engine.start()
    assert engine.ready.wait(120)
    try:
        yield Completer(engine, ckpt.tokenizer, ckpt.tokens)
    finally:
        engine.close()
