"""`st-sdk generate`, `chat` and `demo` through st_sdk.cli.main, on a tiny synthetic model file."""
import io
import json

import pytest

from st_sdk.cli import main

BASE = ["--backend", "numpy", "--seed", "3"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep every command away from the real user cache directory."""
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    """The tiny preset written by conftest (HF directory; an f32 GGUF of the same weights inside)."""
    return tiny_dir["hf"]


@pytest.fixture(scope="module")
def model(model_dir):
    import st_sdk

    return st_sdk.load(model_dir, backend="numpy")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_matches_the_api(capsys, model_dir, model):
    code, out, _ = run(capsys, "generate", model_dir, "-p", "Hello there", "-n", 7, "--ignore-eos", "--json", *BASE)
    assert code == 0
    d = json.loads(out)
    want = model.generate("Hello there", max_new_tokens=7, ignore_eos=True, seed=3)
    assert d["text"] == want.text and d["token_ids"] == want.token_ids
    assert d["finish_reason"] == "length" and d["backend"] == "numpy"
    assert d["timings"]["prompt_tokens"] == len(want.prompt_ids) and d["timings"]["decode_tokens_per_s"] > 0
    assert "logprobs" not in d
    code, out, _ = run(capsys, "generate", model_dir, "-p", "Hello there", "-n", 3, "--json", "--logprobs", 2, *BASE)
    d = json.loads(out)
    assert len(d["logprobs"]) == len(d["token_ids"]) and all(len(row) == 2 for row in d["top_logprobs"])


def test_generate_from_gguf_gives_the_same_tokens(capsys, tiny_dir):
    args = ["-p", "Hello", "-n", 6, "--ignore-eos", "--json", *BASE]
    hf = json.loads(run(capsys, "generate", tiny_dir["hf"], *args)[1])
    gg = json.loads(run(capsys, "generate", tiny_dir["gguf"], *args)[1])
    assert gg["prompt_ids"] == hf["prompt_ids"] and gg["token_ids"] == hf["token_ids"]


def test_generate_chat_flag_applies_the_template(capsys, model_dir, model):
    code, out, _ = run(capsys, "generate", model_dir, "-p", "Hello", "--chat", "-n", 4, "--json", *BASE)
    want = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=4, seed=3)
    assert code == 0 and json.loads(out)["token_ids"] == want.token_ids
    assert json.loads(out)["prompt_ids"] == want.prompt_ids


def test_generate_streams_text_and_reports_on_stderr(capsys, model_dir, model):
    want = model.generate("Hi", max_new_tokens=6, ignore_eos=True, seed=3, temperature=0.9, top_k=5)
    args = ["generate", model_dir, "-p", "Hi", "-n", 6, "--ignore-eos", "--temperature", 0.9, "--top-k", 5, *BASE]
    code, out, err = run(capsys, *args)
    assert code == 0 and out == want.text + "\n"
    assert "6 tokens" in err and "finish: length" in err
    code, out2, _ = run(capsys, *args, "--no-stream")
    assert code == 0 and out2 == out


def test_generate_stop_strings(capsys, model_dir, model):
    full = model.generate("Hi", max_new_tokens=12, ignore_eos=True, seed=3)
    stop = full.text[4:6]
    code, out, _ = run(capsys, "generate", model_dir, "-p", "Hi", "-n", 12, "--ignore-eos", "--json",
                       "--stop", "NEVER", "--stop", stop, *BASE)
    d = json.loads(out)
    assert d["text"] == full.text[:full.text.index(stop)] and d["finish_reason"] == "stop"


def test_generate_reads_the_prompt_from_stdin(capsys, model_dir, model, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there"))
    code, out, _ = run(capsys, "generate", model_dir, "-n", 3, "--ignore-eos", "--json", *BASE)
    assert code == 0 and json.loads(out)["prompt_ids"] == model.tokenizer.encode("Hello there")


@pytest.mark.parametrize("extra, word", [(["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"),
                                         (["-n", "0"], "max_new_tokens")])
def test_generate_bad_arguments_exit_with_a_message(capsys, model_dir, extra, word):
    code, out, err = run(capsys, "generate", model_dir, "-p", "x", *extra, *BASE)
    assert code == 1 and word in err and out == ""


def test_generate_missing_model_is_an_error(capsys, tmp_path):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "-p", "x", *BASE)
    assert code == 1 and "nope" in err


def test_chat_reads_lines_keeps_the_conversation_and_resets(capsys, model_dir, model, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you?\n/reset\nhello\n/exit\nnever read\n"))
    opts = dict(max_new_tokens=5, temperature=0, ignore_eos=True)
    code, out, _ = run(capsys, "chat", model_dir, "-n", 5, "--temperature", 0, "--ignore-eos", *BASE)
    assert code == 0
    a1 = model.chat([{"role": "user", "content": "hi"}], **opts)
    a2 = model.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": a1.text},
                     {"role": "user", "content": "how are you?"}], **opts)
    a3 = model.chat([{"role": "user", "content": "hello"}], **opts)
    assert out == f"{a1}\n{a2}\n{a3}\n"


def test_chat_ends_at_end_of_input(capsys, model_dir, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    code, out, _ = run(capsys, "chat", model_dir, "-n", 2, "--ignore-eos", *BASE)
    assert code == 0 and out.endswith("\n")


def test_demo_preset_synthesises_once_then_reuses(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path))   # overrides private_cache: check where it writes
    code, out, _ = run(capsys, "demo", "--preset", "tiny", "-n", 8, "--backend", "numpy")
    assert code == 0
    assert "RANDOM weights" in out and "meaningless" in out
    assert "synthesised" in out and str(tmp_path) in out and "backend: numpy" in out
    assert "8 tokens" in out and "tokens/s" in out
    assert (tmp_path / "demo" / "tiny-seed0" / "config.json").is_file()
    code, out2, _ = run(capsys, "demo", "--preset", "tiny", "-n", 8, "--backend", "numpy")
    assert code == 0 and "reused" in out2
    # same weights and seed: the same text
    assert out.split("---")[1] == out2.split("---")[1]


def test_demo_without_the_shipped_model_falls_back_to_random_weights(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ST_SDK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("st_sdk.data.MODEL", tmp_path / "missing.gguf")
    code, out, _ = run(capsys, "demo", "-n", 4, "--backend", "numpy")
    assert code == 0
    assert "missing from this installation" in out and "RANDOM weights" in out and "Once upon a time" in out
    code, _, err = run(capsys, "demo", "--layers", 2)
    assert code == 2 and "--layers needs --preset" in err


def test_a_closed_pipe_ends_a_command_quietly(tiny_dir, tmp_path):
    """`st-sdk info MODEL | head -1`: the command stops when its reader does, with no traceback."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ST_SDK_CACHE_DIR=str(tmp_path))
    cli = [sys.executable, "-c", "import sys; from st_sdk.cli import main; sys.exit(main())"]
    for buffered in ("", "1"):   # stdout block-buffered (a pipe's default) and unbuffered
        env["PYTHONUNBUFFERED"] = buffered
        p = subprocess.Popen(cli + ["info", str(tiny_dir["gguf"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env)
        p.stdout.close()   # the reader is gone before the command writes
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
