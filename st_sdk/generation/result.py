"""`GenerationResult`: the generated text, with the ids, why it stopped, log-probabilities and timings."""
from __future__ import annotations

from typing import Any, Sequence

FINISH_REASONS = ("stop", "eos", "length", "cancelled", "error")


class GenerationResult(str):
    """The generated text (a str) carrying the token ids, why it stopped, log-probabilities and timings.

    token_ids: every sampled id, the end-of-sequence or stop-completing one included (the text excludes
    eos and ends before a stop string). finish_reason: "eos", "stop" (stop string), "length"
    (max_new_tokens or context full), "cancelled", or "error" (seen on a stream whose step raised).
    logprobs: when asked, the model's log-probability of each sampled id (raw logits, before the
    sampling transforms); top_logprobs: when logprobs=N, the N most likely ids per step as {id: logprob}.
    """

    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    timings: dict[str, float]

    def __new__(cls, text: str, token_ids: Sequence[int], prompt_ids: Sequence[int], finish_reason: str,
                logprobs: list[float] | None = None, top_logprobs: list[dict[int, float]] | None = None,
                timings: dict[str, float] | None = None):
        self = super().__new__(cls, text)
        self.token_ids = list(token_ids)
        self.prompt_ids = list(prompt_ids)
        self.finish_reason = finish_reason
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.timings = dict(timings or {})
        return self

    @property
    def text(self) -> str:
        return str.__str__(self)

    @property
    def prefill_tps(self) -> float:
        return self.timings.get("prefill_tokens_per_s", float("nan"))

    @property
    def decode_tps(self) -> float:
        return self.timings.get("decode_tokens_per_s", float("nan"))

    def to_dict(self) -> dict[str, Any]:
        d = dict(text=self.text, token_ids=self.token_ids, prompt_ids=self.prompt_ids,
                 finish_reason=self.finish_reason, timings=self.timings)
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.top_logprobs is not None:
            d["top_logprobs"] = [{str(k): v for k, v in row.items()} for row in self.top_logprobs]
        return d

    def __repr__(self) -> str:
        return (f"GenerationResult({self.text!r}, tokens={len(self.token_ids)}, "
                f"finish_reason={self.finish_reason!r})")

