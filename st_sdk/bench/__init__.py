"""Benchmarks across backends and weight formats, with llama.cpp as the peer (`st-sdk bench`).

Every case (one backend and one weight format, or llama.cpp on the same GGUF file) runs in its own
child process (`worker`), so its peak RSS is measured, not estimated, and a crashing backend cannot
take the run down. `run` interleaves the cases round by round (A, B, A, B ...) so that noise from a
shared machine hits all of them alike, and reports medians, spreads and paired ratios (`report`).
Timing itself is `st_sdk.timing.time_round`, the harness the selection code and benchmarks/ use too.

Decode is memory-bound: each token reads the dense weights, k of E experts per layer and the LM
head (`traffic`). Those bytes over this machine's measured read bandwidth (`machine`) give a decode
ceiling, and every decode figure is also shown as a fraction of it.
"""
from .files import models_dir, synth_gguf
from .machine import machine_info, read_bandwidth
from .report import format_table, plot, to_json
from .run import DEFAULT_FORMATS, BenchOptions, Record, llama_cpp_missing, registered_backends, run_bench
from .traffic import bytes_per_token, gguf_bytes_per_token, gguf_format
from .worker import LLAMA, peak_rss

__all__ = ["models_dir", "synth_gguf", "machine_info", "read_bandwidth", "format_table", "plot",
           "to_json", "DEFAULT_FORMATS", "BenchOptions", "Record", "llama_cpp_missing", "registered_backends",
           "run_bench", "bytes_per_token", "gguf_bytes_per_token", "gguf_format", "LLAMA", "peak_rss"]
