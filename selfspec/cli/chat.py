"""`selfspec chat`: a conversation in the terminal (selfspec/chat.py's ChatSession), streamed;
each turn processes only the new message."""
from __future__ import annotations

import re
import sys
from typing import TextIO

import typer

from selfspec.cli.options import DRAFTER, MODEL, PROMPTS, SAMPLING, command, load, sampling_params, split_drafter
from selfspec.errors import SelfspecError

HELP = "/reset starts over, /stats shows the last turn's numbers, /exit or Ctrl-D quits; Ctrl-C stops an answer."
COMMANDS = ("/reset", "/stats", "/help", "/?", "/exit", "/quit")


def run(session, out: TextIO = sys.stdout) -> int:
    """The terminal loop: `> ` prompts, streamed answers, commands; returns the exit status."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    mode = "chat template" if session.templated else "raw text: this model has no chat template"
    print(f"chatting with {session.model.name} ({mode}, draft {getattr(session.drafter, 'name', 'none')}). {HELP}",
          file=out, flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            print(file=out)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if text == "/stats":
            print(session.stats_line(), file=out, flush=True)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, file=out, flush=True)
            continue
        if text.startswith("//"):  # a message that starts with a slash
            line = text[1:]
        elif re.fullmatch(r"/[A-Za-z?]\w*", text.split()[0]):  # not sent to the model
            print(f"unknown command {text.split()[0]}; commands: {', '.join(COMMANDS)} (start a message with "
                  f"// to send one that begins with /)", file=out, flush=True)
            continue
        answer = session.ask(line)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            answer.close()
            out.write(" [stopped]")
        except SelfspecError as e:
            out.write(f"error: {e}")
        out.write("\n")
        out.flush()


@command(interrupted="interrupted")
def chat(
    model=MODEL,
    text=PROMPTS("max_new_tokens", "chat", "system", max_new_tokens=512),
    sampling=SAMPLING,
    drafter=DRAFTER,
) -> None:
    """Chat in the terminal: multi-turn, streamed; each turn processes only the new message (the
    conversation's KV is kept). /reset, /stats, /exit; Ctrl-D quits, Ctrl-C stops an answer."""
    sampling = sampling_params(sampling)
    draft, options = split_drafter(drafter, model.model)
    from selfspec.chat import ChatSession  # torch: only once every argument is checked
    from selfspec.drafters.factory import build_drafter

    m = load(model)
    drafter = build_drafter(draft, m, dtype=model.dtype, threads=model.threads, **options)
    session = ChatSession(m, drafter, sampling, **vars(text))
    raise typer.Exit(run(session))
