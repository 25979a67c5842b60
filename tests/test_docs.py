"""The README and the pages in docs/ are tested: their examples run as printed, and their links lead somewhere.

Every ```bash and ```python block of a page runs, in page order, in one empty folder per page (so a
later block sees the files an earlier one wrote), with ``HF_HUB_OFFLINE=1``, unless the line just above
the block marks it:

    <!-- not run: why (what needs a download, a Mac, a GPU, or stands for the reader's own files) -->
    <!-- slow: why -->        (runs with ``pytest -m slow``)

Bash blocks are split into commands (continuation lines joined, ``#`` comments dropped, ``a && b`` as
two); the set-up commands that make the environment this test already runs in are skipped (``SET_UP``).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [p for p in [*PAGES, ROOT / "ARCHITECTURE.md", ROOT / "benchmarks" / "README.md", ROOT / "tests" / "README.md"]
          if p.exists()]
SET_UP = [r"^python3 -m venv ", r"pip install", r"^\.venv/bin/pytest"]  # the environment this test runs in
MARK = re.compile(r"<!--\s*(not run|slow):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(page: Path) -> list[dict]:
    """The page's code blocks in order: language, text, mark (None, 'not run' or 'slow') and its reason."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(above.strip())
        found.append({"lang": opened.group(1), "text": "\n".join(lines[i + 1:end]) + "\n", "line": i + 1,
                      "mark": mark.group(1) if mark else None, "why": mark.group(2) if mark else None})
        i = end + 1
    return [b for b in found if b["lang"] in ("bash", "python")]


def commands(block: str) -> list[str]:
    found = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        part: list[str] = []
        for word in shlex.split(line, comments=True) + ["&&"]:
            if word != "&&":
                part.append(word)
            elif part:
                found.append(shlex.join(part))
                part = []
    return [c for c in found if not any(re.search(p, c) for p in SET_UP)]


def run_block(block: dict, cwd: Path) -> None:
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "STARFLOW_MLX_CACHE": str(cwd / ".starflow-cache")}
    runs = ([shlex.split(c.removeprefix(".venv/bin/")) for c in commands(block["text"])] if block["lang"] == "bash"
            else [[sys.executable, "-c", block["text"]]])
    for argv in runs:
        res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                             stdin=subprocess.DEVNULL)
        where = f"line {block['line']}: {shlex.join(argv) if block['lang'] == 'bash' else block['text']}"
        assert res.returncode == 0, f"{where}\n{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stderr, f"{where}\n{res.stderr}"


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_examples_run_as_printed(page, tmp_path):
    for block in blocks(page):
        if block["mark"] is None:
            run_block(block, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b["mark"] == "slow" for b in blocks(p))], ids=page_id)
def test_slow_page_examples_run_as_printed(page, tmp_path):
    for block in blocks(page):
        if block["mark"] != "not run":  # a slow block may need what the page's earlier blocks wrote
            run_block(block, tmp_path)


def test_every_mark_gives_a_reason_and_runnable_blocks_are_commands():
    runnable = 0
    for page in PAGES:
        for block in blocks(page):
            where = f"{page_id(page)} line {block['line']}"
            if block["mark"] is not None:
                assert len(block["why"]) >= 10, f"{where}: say why the block is {block['mark']}"
                continue
            runnable += 1
            if block["lang"] == "bash":
                for command in commands(block["text"]):
                    assert command.removeprefix(".venv/bin/").startswith(("starflow ", "python", "mlx.launch ")), \
                        f"{where}: {command!r} is not a starflow command: mark the block not run, with why"
    assert runnable >= 15


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} leads nowhere")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} names no heading of {dest.name}")
    return broken


@pytest.mark.parametrize("page", LINKED, ids=page_id)
def test_links_lead_to_files_and_headings_that_exist(page):
    assert not broken_links(page), f"{page_id(page)}: " + "; ".join(broken_links(page))


def test_the_link_check_finds_broken_links(tmp_path):
    """The check itself can fail: a link to a missing file or to a missing heading is caught."""
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[fine](#a-title) [gone](missing.md) [no heading](#nothing)\n")
    assert broken_links(page) == ["missing.md leads nowhere", "#nothing names no heading of page.md"]
