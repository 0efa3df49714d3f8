"""The README's command blocks work verbatim (issue 12, part 8).

Every fenced block of README.md declares a language. The runnable ones (``bash``/``sh``/``shell``,
``console`` lines after ``$ ``, and ``python``) are run in order, as written, in ONE bash shell — as a
reader types them into a terminal, so variables set by one block (``RUN``, keys) reach the next —
against ``weightstore serve`` started the way ``make serve`` starts it: in a fresh directory holding
the project's ``.venv``, embedded SQLite and SeaweedFS under ``./var``, on a free loopback port. The
shell starts with what the README tells a reader to paste: the ``export WEIGHTSTORE_URL=...
WEIGHTSTORE_API_KEY=...`` line that ``serve`` printed. The Hugging Face examples (issue 15: tiny base model,
export, ``snapshot_download``/``from_pretrained``/``PeftModel``/``hf_hub_download``, ``create_repo`` +
``upload_folder`` and back) and the loading and DCP save/resume examples (issue 14) run the same way; the
Hub libraries reach only this serve (``NO_HUB`` below).

A block that cannot run here (``make serve`` blocks, placeholders for the reader's own files, a
PostgreSQL deployment) is marked in the README, right before its fence, with
``<!-- readme-test: skip (reason) -->``; a marker without a reason, or one that is not followed by a
runnable block, fails the test too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
RUNNABLE = {"bash": "sh", "sh": "sh", "shell": "sh", "console": "console", "python": "python"}
FENCE = re.compile(r"^(```+)(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<verb>\S+)\s*(?P<rest>.*?)\s*-->\s*$")
SKIP_REASON = re.compile(r"^\((?P<reason>.*\S.*)\)$")
BLOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason given in the marker, or None when the block runs

    def describe(self) -> str:
        return f"README.md:{self.line} ```{self.lang}\n{self.code}```"


def parse_readme(text: str) -> tuple[list[Block], list[str]]:
    """Fenced blocks in order, and the problems found with fences and markers."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines(keepends=True)
    pending: tuple[int, str | None] | None = None  # (line of a marker, its skip reason)
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\n")
        m = MARKER.match(line)
        if m:
            if pending:
                problems.append(f"README.md:{pending[0]}: readme-test marker not followed by a runnable block")
            reason = SKIP_REASON.match(m["rest"])
            if m["verb"] != "skip":
                problems.append(f"README.md:{i + 1}: unknown readme-test marker {m['verb']!r} (only `skip (reason)`)")
            elif not reason:
                problems.append(f"README.md:{i + 1}: a skip marker needs a reason: <!-- readme-test: skip (why) -->")
            pending = (i + 1, reason["reason"] if reason else "")
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            if line.strip() and pending:
                problems.append(f"README.md:{pending[0]}: readme-test marker not followed by a runnable block")
                pending = None
            i += 1
            continue
        start, lang, ticks = i + 1, fence[2], fence[1]
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].rstrip("\n") != ticks:
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if not lang:
            problems.append(f"README.md:{start}: a fenced block without a language (use ```text for non-commands)")
        if lang in RUNNABLE:
            blocks.append(Block(start, lang, "".join(body), pending[1] if pending else None))
        elif pending:
            problems.append(f"README.md:{pending[0]}: readme-test marker before a ```{lang} block, which never runs")
        pending = None
    if pending:
        problems.append(f"README.md:{pending[0]}: readme-test marker not followed by a runnable block")
    return blocks, problems


def as_script(block: Block, path: Path) -> str:
    """The shell line that runs ``block`` (written under ``path``) in the reader's shell."""
    if RUNNABLE[block.lang] == "python":
        path.with_suffix(".py").write_text(block.code)
        return f"python {path.with_suffix('.py')}"
    code = block.code
    if RUNNABLE[block.lang] == "console":  # only the commands after a `$ ` prompt; the rest is output
        code = "".join(ln[2:] for ln in code.splitlines(keepends=True) if ln.startswith("$ "))
    path.with_suffix(".sh").write_text(code)
    return f"source {path.with_suffix('.sh')}"


class ReaderShell:
    """One bash process fed block after block, with ``set -eo pipefail`` (a failing command ends it)."""

    def __init__(self, cwd: Path, env: dict[str, str], scratch: Path) -> None:
        self.scratch = scratch
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-s"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.send("set -eo pipefail")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, n: int, block: Block) -> tuple[bool, str]:
        base = self.scratch / f"block{n:02d}"
        out, done = base.with_suffix(".out"), base.with_suffix(".done")
        # stdin from /dev/null: a command that prompts must not read the next block as its answer.
        self.send(f"{{ {as_script(block, base)} ; }} </dev/null >{out} 2>&1\ntouch {done}")
        deadline = time.monotonic() + BLOCK_TIMEOUT_S
        while not done.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = done.exists()
        output = out.read_text() if out.exists() else ""
        if not ok and self.proc.poll() is None:
            output += f"\n[timed out after {BLOCK_TIMEOUT_S} s]"
        elif not ok:
            output += f"\n[exit status {self.proc.returncode}]"
        return ok, output

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


# Where the reader's Hugging Face libraries point until the README's own `export HF_ENDPOINT=...`: a
# loopback port nothing listens on, so a Hub call made before that fails at once instead of reaching
# huggingface.co. (HF_HUB_OFFLINE cannot stay set in the reader's shell: the README's Hub examples talk to
# weightstore through the libraries' online code paths, and a reader's shell does not have it.)
NO_HUB = "http://127.0.0.1:9"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def clean_env(home: Path) -> dict[str, str]:
    """The reader's shell: none of the test runner's weightstore, tinker or Hugging Face settings."""
    own = ("WEIGHTSTORE_", "TINKER_", "VIRTUAL_ENV", "HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return {
        **keep,
        "HOME": str(home),  # the client's hash cache, the tinker CLI's files and the HF cache stay in the test's directory
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONFAULTHANDLER": "1",  # a Python command that dies on a signal shows its threads' stacks in the failure
        "HF_ENDPOINT": NO_HUB,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def start_serve(clone: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """``make serve`` in ``clone`` on a free port; returns the process and the ``export`` line it printed."""
    port = free_port()
    log_path = clone / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(clone / ".venv" / "bin" / "weightstore"), "serve"],
            cwd=clone,
            env={**env, **OFFLINE, "WEIGHTSTORE_PORT": str(port)},  # serve's export worker reads local files only
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited:\n" + log_path.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise AssertionError("serve did not become ready:\n" + log_path.read_text())
    exports = [ln.strip() for ln in log_path.read_text().splitlines() if ln.strip().startswith("export WEIGHTSTORE_URL=")]
    assert len(exports) == 1, "serve printed no `export WEIGHTSTORE_URL=... WEIGHTSTORE_API_KEY=...` line"
    return proc, exports[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_readme_markers_and_fences_are_well_formed() -> None:
    """issue 12, part 8: every fence says its language; every skip says why."""
    blocks, problems = parse_readme(README.read_text())
    assert not problems, "\n".join(problems)
    assert [b for b in blocks if b.skip is None], "no runnable block found in README.md"


# The calls the README's Hugging Face and loading/DCP sections show (issue 15 "Must show: the README
# examples work verbatim", issue 14): each must appear in a block that runs, and in no skipped block.
PROVEN_CALLS = (
    "snapshot_download(",
    "hf_hub_download(",
    "AutoModelForCausalLM.from_pretrained(",
    "AutoTokenizer.from_pretrained(",
    "PeftModel.from_pretrained(",
    "create_repo(",
    "upload_folder(",
    "load_weights(",
    "load_state(",
    "dcp.save(",
    "dcp.load(",
    "WeightstoreStorageWriter(",
    "WeightstoreStorageReader(",
)


def test_readme_hub_and_dcp_examples_are_not_skipped() -> None:
    """issue 15 (Must show) and issue 14 (README examples): every Hub read/write call, the loading calls
    and the DCP save/load that the README shows are in blocks the verbatim run executes."""
    blocks, _ = parse_readme(README.read_text())
    skipped = [
        f"README.md:{b.line} skips {call}" for b in blocks if b.skip is not None for call in PROVEN_CALLS if call in b.code
    ]
    missing = [call for call in PROVEN_CALLS if not any(call in b.code for b in blocks if b.skip is None)]
    assert (skipped, missing) == ([], [])


def test_parse_readme_rules() -> None:
    """The parser itself: markers bind to the next block, reasons are required, stray markers are errors."""
    text = (
        "<!-- readme-test: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n"
        "```python\nprint(1)\n```\n"
        "<!-- readme-test: skip -->\n```sh\nfalse\n```\n"
        "<!-- readme-test: skip (x) -->\nprose\n"
        "```\nplain\n```\n```text\nnot run\n```\n"
    )
    blocks, problems = parse_readme(text)
    assert [(b.line, b.lang, b.code, b.skip) for b in blocks] == [
        (2, "bash", "nvidia-smi\n", "needs a GPU"),
        (5, "python", "print(1)\n", None),
        (9, "sh", "false\n", ""),
    ]
    assert problems == [
        "README.md:8: a skip marker needs a reason: <!-- readme-test: skip (why) -->",
        "README.md:12: readme-test marker not followed by a runnable block",
        "README.md:14: a fenced block without a language (use ```text for non-commands)",
    ]


def test_cli_starts_without_the_server_stack() -> None:
    """issue 12, part 8: the README runs ~40 `weightstore` commands; importing the catalog and store
    stack (sqlalchemy, boto3, the models) on every start made each one take 2-4 s of CPU."""
    heavy = ("sqlalchemy", "sqlmodel", "boto3", "torch", "fastapi")
    code = f"import sys, weightstore_cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~40 CLI starts, 4 Python snippets importing torch, and serve: minutes on a loaded machine
def test_readme_command_blocks_run_verbatim(tmp_path: Path) -> None:
    """issue 12, part 8: every runnable README block, in order, against a served instance."""
    blocks, problems = parse_readme(README.read_text())
    assert not problems, "\n".join(problems)
    clone = tmp_path / "weightstore"  # where a reader stands: the clone, with `make install`'s .venv
    clone.mkdir()
    (clone / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    proc, export_line = start_serve(clone, env)
    shell = None
    try:
        scratch = tmp_path / "blocks"
        scratch.mkdir()
        shell = ReaderShell(clone, env, scratch)
        shell.send(export_line)  # what the README tells the reader to paste from serve's output
        ran = 0
        for n, block in enumerate(blocks):
            if block.skip is not None:
                continue
            began = time.monotonic()
            ok, output = shell.run(n, block)
            print(f"README.md:{block.line} {block.lang}: {time.monotonic() - began:.1f} s")
            assert ok, f"README block failed:\n{block.describe()}\n--- output ---\n{output}"
            ran += 1
        skipped = [b for b in blocks if b.skip is not None]
        print(f"README: {ran} blocks ran, {len(skipped)} skipped:")
        for b in skipped:
            print(f"  line {b.line}: {b.skip}")
    finally:
        if shell:
            shell.close()
        stop(proc)
        shutil.rmtree(clone / "var", ignore_errors=True)
