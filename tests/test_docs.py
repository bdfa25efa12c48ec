"""The commands in the docs are right as written: every st-sdk command parses with the real command
line, every pip command names extras and paths that exist, every script exists, and the quick ones
run on a tiny model (tests/docs_commands.py runs them all)."""
from __future__ import annotations

import json

import pytest

from docs_commands import ROOT, check_pip, commands, run, scratch

ALL = commands()


def test_the_docs_have_commands():
    assert len(ALL) > 20 and {c.program for c in ALL} >= {"st-sdk", "pip", "python", "pytest"}


@pytest.mark.parametrize("cmd", [c for c in ALL if c.program == "st-sdk"], ids=lambda c: f"{c.source} {c.text}"[:90])
def test_st_sdk_command_parses_as_written(cmd):
    from st_sdk.cli import build_parser

    try:
        args = build_parser().parse_args(cmd.argv[1:])
    except SystemExit as e:
        pytest.fail(f"{cmd.source}: `{cmd.text}` does not parse (exit {e.code})")
    assert getattr(args, "func", None) is not None


@pytest.mark.parametrize("cmd", [c for c in ALL if c.program == "pip"], ids=lambda c: f"{c.source} {c.text}"[:90])
def test_pip_command_names_what_exists(cmd):
    assert check_pip(cmd) is None


@pytest.mark.parametrize("cmd", [c for c in ALL if c.program in ("python", "pytest")],
                         ids=lambda c: f"{c.source} {c.text}"[:90])
def test_scripts_and_test_paths_exist(cmd):
    # the repository's scripts and test files; placeholders such as /path/to/old/venv/bin/python are not checked
    paths = [a for a in cmd.argv[1:] if not a.startswith(("-", "/", ".venv")) and ("/" in a or a.endswith(".py"))]
    if cmd.argv[1:3] == ["-m", "pytest"]:
        return
    assert paths and all((ROOT / p.split("::")[0]).exists() for p in paths if not p.endswith(".gguf")), cmd.text


#: run here (each CLI process probes every backend, torch and jax included: seconds each); the rest is
#: parsed here and run by tests/docs_commands.py
QUICK = ('st-sdk generate model.gguf -p "Once upon a time"', "st-sdk chat model.gguf")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return scratch(tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("cmd", [c for c in ALL if c.program == "st-sdk" and any(q in c.text for q in QUICK)
                                 and "ST_BACKEND" not in c.env], ids=lambda c: f"{c.source} {c.text}"[:90])
def test_quick_command_runs_as_written(cmd, workdir, tmp_path):
    import os

    out = run(cmd, workdir, timeout=600, cache=os.environ["ST_SDK_CACHE_DIR"])
    assert out.returncode == 0, f"`{cmd.text}`: {out.stderr[-2000:]}"
    if "--json" in cmd.argv and not cmd.stdout:
        json.loads(out.stdout.strip().splitlines()[-1] if cmd.argv[1] == "generate" else out.stdout)
