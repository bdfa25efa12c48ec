"""Every shell command in the docs, run as written.

The commands are the lines of the ```sh / ```bash / ```console code blocks of README.md, docs/*.md,
benchmarks/README.md and examples/*/README.md (console lines start with "$ "; a trailing backslash
continues a line; `&&`, `|` and `>` are understood). They run from a scratch directory that holds what
the docs call `model.gguf` and `MODEL.gguf` (a tiny synthetic model) and links to the repository's
folders, with the user cache pointed at a scratch directory unless the command sets its own.

    python tests/docs_commands.py            # run them all (the 4b-a0.6b benchmarks take long)
    python tests/docs_commands.py --list     # print them
    python tests/docs_commands.py -k bench   # only those containing "bench"
    python tests/docs_commands.py --skip 4b-a0.6b   # all but the 4b-a0.6b benchmarks

`pip install` commands are checked, not run (the extras they name exist, the paths they install
exist): CI runs the README's own `pip install -e ".[test]"`; a local plugin (`pip install
./examples/custom_backend`) is installed into a scratch directory for the commands after it. tests/test_docs.py parses every st-sdk
command with the real command-line parser and runs the quick ones.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/*.md", "benchmarks/README.md", "examples/*/README.md"]
SHELL_BLOCKS = ("sh", "bash", "console", "shell")


@dataclass
class Command:
    source: str                         # file:line
    text: str                           # as written
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None            # piped from `echo ...`
    stdout: str | None = None           # redirected to this file

    @property
    def program(self) -> str:
        return self.argv[0] if self.argv else ""


def _lines(block: str, console: bool):
    """(command line, stdin) of each command in a code block; in a console block, "$ " starts a
    command and "> " lines after it are what is typed into it."""
    pending, items = "", []
    for raw in block.splitlines():
        line = raw.rstrip()
        if console:
            if line.startswith("> ") and items:
                items[-1][1].append(line[2:])
                continue
            if not line.startswith("$ ") and not pending:
                continue   # output
            line = line[2:] if line.startswith("$ ") else line
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        items.append(((pending + line).strip(), []))
        pending = ""
    for text, typed in items:
        yield text, "".join(t + "\n" for t in typed) or None


def _parse(text: str, source: str) -> list[Command]:
    words = shlex.split(text, comments=True)
    out, cur = [], []
    for w in words + ["&&"]:
        if w == "&&":
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(w)
    cmds = []
    for words in out:
        stdin = stdout = None
        if "|" in words:   # echo TEXT | command
            i = words.index("|")
            left, words = words[:i], words[i + 1:]
            stdin = " ".join(left[1:]) + "\n" if left[:1] == ["echo"] else None
        if ">" in words:
            i = words.index(">")
            stdout, words = words[i + 1], words[:i]
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        cmds.append(Command(source, text, words, env, stdin, stdout))
    return cmds


def commands(root: Path = ROOT) -> list[Command]:
    out = []
    for pattern in DOCS:
        for f in sorted(root.glob(pattern)):
            text = f.read_text(encoding="utf-8")
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
                lang, body = m.group(1), m.group(2)
                if lang not in SHELL_BLOCKS:
                    continue
                line_no = text[:m.start()].count("\n") + 2
                for line, typed in _lines(body, console=lang == "console"):
                    if line and not line.startswith("#"):
                        cmds = _parse(line, f"{f.relative_to(root)}:{line_no}")
                        if typed and cmds:
                            cmds[-1].stdin = typed
                        out += cmds
    return out


def pyproject_extras(root: Path = ROOT) -> set[str]:
    import tomllib

    return set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_pip(cmd: Command, root: Path = ROOT) -> str | None:
    """Why a `pip install` command as written would not do what the docs say, or None."""
    args = [a for a in cmd.argv[2:] if not a.startswith("-")]
    for a in args:
        m = re.fullmatch(r"(\.|\./[\w/.-]+)(\[([\w,]+)\])?", a)
        if not m:
            return f"{a!r} is not a path of this repository (st-sdk is not on a package index)"
        if not (root / m.group(1)).exists():
            return f"{m.group(1)} does not exist"
        if m.group(3) and m.group(1) == ".":
            missing = set(m.group(3).split(",")) - pyproject_extras(root)
            if missing:
                return f"pyproject.toml has no extra {', '.join(sorted(missing))}"
    return None


def scratch(tmp: Path) -> Path:
    """A working directory with model.gguf / MODEL.gguf (tiny) and links to the repository's folders."""
    from st_sdk.synth import write_model

    model = write_model(tmp / "synth", formats="gguf")["gguf"]
    for name in ("model.gguf", "MODEL.gguf"):
        (tmp / name).symlink_to(model)
    for d in ("benchmarks", "examples", "tests", "docs", "st_sdk", "backends", "csrc"):
        (tmp / d).symlink_to(ROOT / d)
    return tmp


def run(cmd: Command, cwd: Path, timeout: float, cache: Path) -> subprocess.CompletedProcess:
    """Run a command as written (st-sdk and pytest through this interpreter's installation)."""
    argv = list(cmd.argv)
    if argv[0] == "st-sdk":
        argv = [sys.executable, "-c", "import sys; from st_sdk.cli import main; sys.exit(main())", *argv[1:]]
    elif argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "pytest":
        argv = [sys.executable, "-m", "pytest", *argv[1:]]
    env = dict(os.environ, ST_SDK_CACHE_DIR=str(cache), **cmd.env)
    out = subprocess.run(argv, cwd=cwd, env=env, input=cmd.stdin, capture_output=True, text=True, timeout=timeout)
    if cmd.stdout:
        (cwd / cmd.stdout).write_text(out.stdout)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-k", default="", help="only commands containing this text")
    ap.add_argument("--skip", action="append", default=[], help="leave out commands containing this text")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    cmds = [c for c in commands() if args.k in c.text and not any(x in c.text for x in args.skip)]
    if args.list:
        for c in cmds:
            print(f"{c.source}: {c.text}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="st-sdk-docs-") as tmp:
        cwd = scratch(Path(tmp))
        for c in cmds:
            t0 = time.perf_counter()
            if c.program == "pip":
                problem = check_pip(c)
                status = "checked" if problem is None else f"FAILED: {problem}"
                local = [a for a in c.argv[2:] if a.startswith("./")]
                if problem is None and local:   # a plugin the next commands use: into a scratch site dir
                    site = Path(tmp) / "site"
                    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                          "--no-build-isolation", "--target", str(site), *local], cwd=cwd,
                                         capture_output=True, text=True)
                    status = "installed into a scratch --target" if out.returncode == 0 else \
                        f"FAILED (exit {out.returncode}): {out.stderr[-600:]}"
                    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
            elif c.argv == ["python", "-m", "pytest"]:
                status = "the whole suite: what .ci/run runs"
            else:
                try:
                    out = run(c, cwd, args.timeout, Path(tmp) / "cache")
                    status = "ok" if out.returncode == 0 else f"FAILED (exit {out.returncode}): {out.stderr[-600:]}"
                except subprocess.TimeoutExpired:
                    status = f"FAILED: still running after {args.timeout:.0f} s"
            failed += status.startswith("FAILED")
            print(f"{c.source}: {' '.join(c.argv)} -> {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"{len(cmds)} commands, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
