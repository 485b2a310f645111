"""`selfspec serve`: the OpenAI-compatible HTTP server (selfspec/server/)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from selfspec.cli.options import DRAFTER, MODEL, SAMPLING, command, load, sampling_params, split_drafter
from selfspec.errors import SelfspecError


@command()
def serve(
    model=MODEL,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="SELFSPEC_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' under /v1 (/health and /metrics stay open).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the one generation worker; more get 429.")] = 8,
    request_timeout: Annotated[float, typer.Option(help="Seconds from arrival to the last token, queueing included; then 504 (or an error event mid-stream).")] = 300.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes; more gets 413.")] = 1 << 20,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="A web page origin (e.g. http://localhost:3000, or *) that may call /v1 from a browser besides the server's own playground; repeat for several. Requests with another Origin header get 403; requests without one (curl, SDKs) are not affected.")] = None,
    prefix_cache_mb: Annotated[int, typer.Option(help="Memory for the KV of recent sequences: a request sharing a prompt prefix with one of them (a conversation's next turn, a common system prompt) processes only the rest. 0 = off.")] = 512,
    sampling=SAMPLING,
    drafter=DRAFTER("draft", "skip_config", "draft_bits", "max_draft", "draft_model", "ngram_mode", "datastore",
                    "drafter_weights"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics). The sampling flags set the defaults of requests that omit them."""
    from dataclasses import replace

    defaults = sampling_params(sampling)
    # no --datastore check: a request may pick retrieval or auto, which use it
    draft, options = split_drafter(drafter, model.model, datastore_check=False)
    check_bind(host, port)  # before minutes of loading
    from selfspec.drafters.factory import build_drafter
    from selfspec.server.app import ServerSettings, choosable_drafts, run, warm_up

    settings = ServerSettings(model_id=model.model, api_key=api_key or None, max_queue=max_queue,
                              request_timeout=request_timeout, max_body=max_body, defaults=defaults,
                              prefix_cache_mb=prefix_cache_mb, cors_origins=tuple(cors_origin or ()))
    m = load(model)
    options.update(dtype=model.dtype, threads=model.threads)
    # model_id: what clients pass as "model"; draft_choices: what a request (the playground) may pick
    settings = replace(settings, model_id=m.name, draft_choices=choosable_drafts(m, options["skip_config"]),
                       draft_options=options)
    drafter = build_drafter(draft, m, **options)
    warm_up(m, drafter)
    run(m, drafter, settings, host=host, port=port)


def check_bind(host: str, port: int) -> None:
    """Bind (and release) a socket at host:port as uvicorn will, so that a bad port, an unknown
    host or a port in use is one error line now, not a traceback after the model has loaded."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise SelfspecError(f"--port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise SelfspecError(f"--host {host!r} is not an address of this machine: {getattr(e, 'strerror', e)}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SelfspecError(f"port {port} on {host} is already in use (another server?); choose another "
                                    f"with --port") from None
            raise SelfspecError(f"cannot listen on {host}:{port}: {e.strerror}") from None
