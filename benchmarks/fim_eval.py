"""Fill-in-the-middle evaluation on a repository: hide a line (or a short block) of its files,
ask for it through the Completer the server uses, with and without cross-file context, in
PSM and SPM order, and print exact match and edit similarity per variant.

    python benchmarks/fim_eval.py --model bigcode/starcoderbase-1b --repo ~/src/project

Each task removes the code of one line after its indentation (or of 2-4 lines from a line
that opens a block), leaving the cursor where the code was, as a user stops typing. The
cross-file variants see the repository's other files as a client's open documents would
show them (context.py picks the chunks most like the code at the cursor); the others see the
current file only. Exact match compares the suggestion with the hidden code, trailing
whitespace aside; edit similarity is 1 - Levenshtein distance / the longer length (as
CrossCodeEval reports it). Scores mean something only with trained weights: random weights
score about zero (tests/test_fim_eval.py checks the scoring with a scripted completer).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from starcoder_lsp.context import CrossFile, Source
from starcoder_lsp.settings import Settings

# The hidden code must be worth guessing: at least this many characters.
MIN_MIDDLE_CHARS = 4
BLOCK_LINES = (2, 4)  # a hidden block: from a line ending with ":" or "{", 2 to 4 lines


@dataclass(frozen=True)
class Task:
    """One hidden stretch of code: `text` is the file without it, the cursor at `cursor`."""

    path: str
    text: str
    cursor: int
    middle: str
    block: bool  # several lines (a multi-line suggestion is asked for)


@dataclass(frozen=True)
class Variant:
    mode: str  # "psm" or "spm"
    cross_file: bool

    @property
    def name(self) -> str:
        return f"{self.mode.upper()}, {'cross-file context' if self.cross_file else 'file only'}"


VARIANTS = tuple(Variant(mode, cross) for mode in ("psm", "spm") for cross in (False, True))


@dataclass
class Scores:
    exact: list[bool] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=list)

    def add(self, suggestion: str, task: Task, seconds: float, context_tokens: int) -> None:
        self.exact.append(exact_match(suggestion, task.middle))
        self.similarity.append(edit_similarity(suggestion, task.middle))
        self.seconds.append(seconds)
        self.context_tokens.append(context_tokens)


def exact_match(suggestion: str, middle: str) -> bool:
    return suggestion.rstrip() == middle.rstrip()


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute one character) that turn `a` into `b`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def edit_similarity(suggestion: str, middle: str) -> float:
    a, b = suggestion.rstrip(), middle.rstrip()
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


# --- tasks ---------------------------------------------------------------------------------


def tasks_of(path: str, text: str, rng: random.Random, per_file: int) -> list[Task]:
    """Up to `per_file` tasks of one file, half single lines and half blocks where it has
    lines that open one."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    singles = [i for i, line in enumerate(lines) if len(line.strip()) >= MIN_MIDDLE_CHARS]
    openers = [
        i
        for i, line in enumerate(lines[:-1])
        if line.rstrip().endswith((":", "{")) and lines[i + 1].strip()
    ]
    found = []
    for i in rng.sample(singles, min(len(singles), (per_file + 1) // 2)):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        code = line.rstrip()[indent:]
        at = starts[i] + indent
        found.append(Task(path, text[:at] + text[at + len(code) :], at, code, False))
    for i in rng.sample(openers, min(len(openers), per_file // 2)):
        n = rng.randint(*BLOCK_LINES)
        first, last = i + 1, min(len(lines), i + 1 + n)
        indent = len(lines[first]) - len(lines[first].lstrip())
        at, end = starts[first] + indent, starts[last]
        middle = text[at:end].rstrip()
        if "\n" in middle:  # a block at the end of the file may have a single line left
            found.append(Task(path, text[:at] + text[at + len(middle) :], at, middle, True))
    # One task per place: a block starting where a hidden line does is the same question.
    return list({task.cursor: task for task in found}.values())


def make_tasks(files: dict[str, str], samples: int, seed: int = 0) -> list[Task]:
    """About `samples` tasks spread over `files` (path → text), the same ones for a seed."""
    rng = random.Random(seed)
    per_file = max(2, -(-samples // max(1, len(files))))
    tasks = [t for path in sorted(files) for t in tasks_of(path, files[path], rng, per_file)]
    rng.shuffle(tasks)
    return tasks[:samples]


# --- asking --------------------------------------------------------------------------------


def evaluate(
    completer: object,
    tasks: Sequence[Task],
    files: dict[str, str],
    variants: Iterable[Variant] = VARIANTS,
    settings: Settings | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[Variant, Scores]:
    """Ask `completer` (a Completer, or anything with its `complete`) for every task in
    every variant; the cross-file ones see the repository's other files as open documents
    (the task's own file, as the server does, is never quoted)."""
    settings = settings or Settings(max_new_tokens=64)
    results = {}
    for variant in variants:
        scores = results[variant] = Scores()
        context = repository_context(files) if variant.cross_file else None
        for n, task in enumerate(tasks):
            multiline = "always" if task.block else "never"
            asked = replace(settings, fim_mode=variant.mode, multiline=multiline)
            # The document is named as its source is, so that the context never quotes the
            # file the code was hidden from; and no suggestion is typed through from another.
            getattr(completer, "forget", lambda document: None)(task.path)
            began = time.perf_counter()
            suggestion = completer.complete(
                task.path, task.text, task.cursor, asked, Path(task.path).name, context=context
            )
            seconds = time.perf_counter() - began
            scores.add(suggestion.text, task, seconds, len(suggestion.context))
            progress(f"{variant.name}: {n + 1}/{len(tasks)}")
    return results


def repository_context(files: dict[str, str]) -> CrossFile:
    """The repository's files as a client's open documents, keyed by path."""
    sources = [Source(path, path, text) for path, text in files.items()]
    context = CrossFile(lambda: sources, repo="repo")
    for source in sources:
        context.opened(source.key)
    return context


def table(results: dict[Variant, Scores]) -> str:
    lines = [
        "| variant                        |    n | exact match | edit similarity |"
        " median ms | context tok |",
        "|--------------------------------|------|-------------|-----------------|"
        "-----------|-------------|",
    ]
    for variant, s in results.items():
        n = len(s.exact)
        if not n:
            continue
        similarity, ms = statistics.mean(s.similarity), statistics.median(s.seconds) * 1000
        lines.append(
            f"| {variant.name:<30} | {n:>4} | {sum(s.exact) / n:>11.1%} | {similarity:>15.3f} |"
            f" {ms:>9.0f} | {statistics.median(s.context_tokens):>11.0f} |"
        )
    return "\n".join(lines)


def read_repository(root: Path, pattern: str, max_files: int) -> dict[str, str]:
    """The files of `root` matching `pattern`, by path relative to it (the first
    `max_files` in path order)."""
    files = {}
    for path in sorted(root.glob(pattern))[:max_files]:
        try:
            files[str(path.relative_to(root))] = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bigcode/tiny_starcoder_py")
    parser.add_argument("--repo", type=Path, required=True, help="the repository's directory")
    parser.add_argument("--glob", default="**/*.py", help="its files to use")
    parser.add_argument("--max-files", type=int, default=200)
    parser.add_argument("--samples", type=int, default=100, help="hidden stretches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cross-file-tokens", type=int, default=None)
    args = parser.parse_args()

    from starcoder_lsp.factory import ModelOptions, build_completer

    files = read_repository(args.repo, args.glob, args.max_files)
    if len(files) < 2:
        raise SystemExit(f"{args.repo} has fewer than 2 files matching {args.glob}")
    tasks = make_tasks(files, args.samples, args.seed)
    completer = build_completer(ModelOptions(args.model, slots=2))
    settings = Settings(
        max_new_tokens=args.max_new_tokens, cross_file_tokens=args.cross_file_tokens
    )
    try:
        results = evaluate(
            completer,
            tasks,
            files,
            settings=settings,
            progress=lambda line: print(f"\r{line}", end="", file=sys.stderr, flush=True),
        )
    finally:
        completer.engine.close()
    print(file=sys.stderr)
    print(
        f"\nFIM eval · {args.repo.name} · {len(files)} files · {len(tasks)} hidden stretches "
        f"({sum(t.block for t in tasks)} blocks) · greedy · {args.model}"
    )
    print(table(results))


if __name__ == "__main__":
    main()
