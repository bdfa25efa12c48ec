"""`st-sdk chat MODEL`: an interactive chat that keeps its KV cache between turns.

Reads one user message per line from stdin (a TTY or a pipe); `/reset` starts over, `/exit` or end of
input ends. Answers stream to stdout; statistics go to stderr.
"""
from __future__ import annotations

import argparse
import sys

from .generate import add_model_args, add_sampling_args, generation_kwargs, load_model, stats_line, stream_to

HELP = "commands: /reset (forget the conversation), /exit (or end of input)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model (reads lines from stdin)",
        description="Chat with a model using its chat template. Each line of stdin is a user message; the "
                    "answer streams to stdout. The conversation's KV cache is kept, so each turn only reads "
                    f"its new tokens. {HELP}.")
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--stats", action="store_true", help="print tokens and speed of each answer to stderr")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    kw = generation_kwargs(args)
    conv = model.conversation(system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model.path} on {model.backend.name}; {HELP}", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:            # end of input
            break
        text = line.rstrip("\r\n")
        cmd = text.strip().lower()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            conv.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if cmd in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        stream = conv.send(text, stream=True, **kw)
        try:
            stream_to(sys.stdout, stream)
        except KeyboardInterrupt:    # Ctrl-C stops this answer, not the chat
            print("\n[interrupted]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            print(stats_line(stream.result, model.backend.name), file=sys.stderr)
    return 0
