"""End-to-end prefill (128- and 512-token prompts) and decode (batch 1, after a 128-token prompt) for
every backend and weight format, llama.cpp alongside on the same GGUF file when it is installed."""
from __future__ import annotations

import pytest

from st_sdk.timing import prompt_ids

DECODE_CONTEXT = 128
DECODE_STEPS = 32


@pytest.mark.parametrize("prompt_len", [128, 512])
def test_prefill(benchmark, runner, case, preset, prompt_len):
    ids = prompt_ids(runner, prompt_len)
    benchmark.group = f"prefill {prompt_len} tokens ({preset})"
    benchmark.extra_info.update(backend=case[0], format=case[1], prompt_len=prompt_len)
    benchmark.pedantic(runner.prefill, args=(ids,), rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = prompt_len / benchmark.stats.stats.median


def test_decode(benchmark, runner, case, preset, bandwidth):
    """One timed call is one decoded token; the session keeps growing as in generation."""
    from st_sdk.timing import ModelRunner

    state = {"tok": runner.prefill(prompt_ids(runner, DECODE_CONTEXT))}

    def step():
        state["tok"] = runner.step(state["tok"])

    benchmark.group = f"decode after {DECODE_CONTEXT} tokens ({preset})"
    benchmark.extra_info.update(backend=case[0], format=case[1], context=DECODE_CONTEXT)
    benchmark.pedantic(step, rounds=DECODE_STEPS, warmup_rounds=2, iterations=1)
    if benchmark.stats:
        tps = 1.0 / benchmark.stats.stats.median
        benchmark.extra_info["tokens_per_s"] = tps
        from st_sdk.bench import bytes_per_token, gguf_bytes_per_token

        nbytes = (bytes_per_token(runner.model.params, runner.model.config) if isinstance(runner, ModelRunner)
                  else gguf_bytes_per_token(runner.llm.model_path))
        limit = bandwidth / nbytes
        benchmark.extra_info.update(bytes_per_token=nbytes, bandwidth_limit_tps=limit, fraction_of_limit=tps / limit)
