"""The README and the manuals in ``docs/`` still describe the code: every relative link and anchor
resolves, every file they name exists, and every ``ddm ...`` example parses with ddm's own parser,
with its ``key=value`` overrides accepted by the config they set (nothing runs, nothing is imported
beyond the parser and the config classes)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ddm.cli import EPILOG, build_parser
from ddm.core.config import load
from ddm.data.config import IngestConfig, PartitionConfig
from ddm.demo.config import DemoConfig
from ddm.ensemble.settings import SampleConfig
from ddm.eval.settings import EvalConfig
from ddm.launchers.spec import RunSpec
from ddm.train.job import JobConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
# Files a page names in code spans or prose: bench/x.py, scripts/x.sh, launch/x.yaml, ...
NAMED_FILE = re.compile(r"(?<![\w./-])((?:bench|scripts|launch|cluster|docker|tests|ddm|docs)/[\w./-]*\w)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _prose(page: Path) -> str:
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move manual text to a page under docs/"
    linked = {m.group(1).split("#")[0] for m in LINK.finditer((ROOT / "README.md").read_text(encoding="utf-8"))}
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(page: Path):
    bad = []
    for m in LINK.finditer(_prose(page)):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_files_exist(page: Path):
    text = page.read_text(encoding="utf-8")
    missing = sorted(
        {
            name
            for name in NAMED_FILE.findall(text)
            if not any(c in name for c in "<*{") and not (ROOT / name).exists() and "." in Path(name).name
        }
    )
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def _examples(text: str) -> list[str]:
    """``ddm ...`` command lines in fenced blocks: continuations joined, comments dropped, ``&&``
    chains split."""
    out = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if not re.match(r"\s*(\$ )?ddm\s", line):  # YAML, Python, other commands
                continue
            words = shlex.split(line.strip().removeprefix("$ "), comments=True)
            start = 0
            for i, w in enumerate([*words, "&&"]):
                if w == "&&":
                    if words[start : start + 1] == ["ddm"]:
                        out.append(shlex.join(words[start:i]))
                    start = i + 1
    return out


def _epilog_examples() -> list[str]:
    out = []
    for line in EPILOG.splitlines():
        line = line.strip()
        if line.startswith("ddm "):
            cmd = re.split(r"\s{2,}", line)[0]  # the description follows after two spaces
            out += [c.strip() for c in cmd.split("&&")]
    return out


EXAMPLES = sorted(
    {(p.relative_to(ROOT).as_posix(), ex) for p in PAGES for ex in _examples(p.read_text(encoding="utf-8"))}
    | {("ddm --help", ex) for ex in _epilog_examples()}
)


def _config_of(args) -> tuple[type, str | None, list[str]] | None:
    """The config class a command's overrides set, the file it reads them over, extra overrides."""
    what = getattr(args, "what", None)
    return {
        "run": (RunSpec, getattr(args, "spec", None), []),
        "submit": (RunSpec, getattr(args, "spec", None), []),
        "demo": (DemoConfig, getattr(args, "config", None), []),
        "ingest": (IngestConfig, None, [f"source={getattr(args, 'source', '')}"]),
        "partition": (PartitionConfig, None, []),
        "train": (JobConfig, getattr(args, "config", None), [f"job={what}"] if what == "router" else []),
        "distill": (JobConfig, getattr(args, "config", None), ["job=distill"]),
        "sample": (SampleConfig, None, []),
        "evaluate": (EvalConfig, None, []),
    }.get(args.command)


def test_the_pages_have_examples():
    """The check below is not vacuous: the manuals hold command lines for every stage."""
    commands = {shlex.split(ex, comments=True)[1] for _, ex in EXAMPLES}
    assert {"run", "ingest", "partition", "train", "assemble", "sample", "evaluate", "submit"} <= commands


@pytest.mark.parametrize(("where", "example"), EXAMPLES, ids=[f"{w}: {e[:60]}" for w, e in EXAMPLES])
def test_command_line_examples_parse(where: str, example: str):
    argv = shlex.split(example, comments=True)[1:]
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{example}` is refused by ddm's parser (exit {e.code})")
    if extra:  # overrides after options, as ddm.cli.main accepts them
        assert hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra), (
            f"{where}: `{example}`: unrecognised arguments {extra}"
        )
        args.overrides = [*args.overrides, *extra]
    config = _config_of(args)
    if config is not None:
        cls, path, more = config
        try:
            load(cls, str(ROOT / path) if path else None, [*more, *args.overrides])
        except ValueError as e:
            pytest.fail(f"{where}: `{example}`: {e}")


def test_a_wrong_example_is_caught():
    """The checks fail where they should: an unknown option, an unknown key, a missing file."""
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "expert", "--partitoin", "0"])
    with pytest.raises(ValueError):
        load(RunSpec, str(ROOT / "launch/digits.yaml"), ["budget.splitt=paper"])
    assert "gone" in _slug("Gone?") and _slug("The budget split (`budget.*`)") == "the-budget-split-budget"


def _subparsers(parser) -> dict:
    return next(a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


INLINE = sorted(
    {
        (p.relative_to(ROOT).as_posix(), " ".join(m.group(1).split()))
        for p in PAGES
        for m in re.finditer(r"`(ddm [^`]*)`", _prose(p))
    }
)


@pytest.mark.parametrize(("where", "mention"), INLINE, ids=[f"{w}: {m[:60]}" for w, m in INLINE])
def test_commands_named_in_prose_exist(where: str, mention: str):
    """`ddm <command> --option` in running text names a real command and real options of it."""
    words = mention.split()[1:]
    parser = build_parser()
    if words[0].startswith("-"):
        flags, target = words, parser
    else:
        target = _subparsers(parser).get(words[0])
        assert target is not None, f"{where}: `{mention}`: ddm has no command {words[0]!r}"
        rest = words[1:]
        if words[0] == "train" and rest and not rest[0].startswith("-"):
            target = _subparsers(target).get(rest[0])
            assert target is not None, f"{where}: `{mention}`: ddm train has no {rest[0]!r}"
        flags = rest
    known = {s for a in target._actions for s in a.option_strings}
    unknown = [w for w in flags if w.startswith("-") and w not in known]
    assert not unknown, f"{where}: `{mention}`: no such option {unknown}"
