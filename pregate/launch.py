"""`pregate serve`: load a trained checkpoint into an engine (`load_engine`) and run the HTTP app
(`pregate.server.build_app`) under uvicorn (`serve`), with an exit status a supervisor can act on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pregate.engine import Engine
from pregate.engine_loop import EngineStopped
from pregate.errors import PregateError
from pregate.http_timeouts import READ_TIMEOUT_S, read_timeout_protocol
from pregate.scheduler import SchedulerConfig
from pregate.server import LOOPBACK_HOSTS, ServerLimits, build_app

GRACEFUL_S = 10  # seconds open requests get to finish on shutdown (SIGTERM, Ctrl-C)
KEEP_ALIVE_S = 5  # seconds an idle connection stays open between requests
MAX_HEADER_BYTES = 16 * 1024  # request line + headers
ENGINE_HISTORY = 4096  # finished requests, steps and failures a serving engine remembers (bounded memory)


def uvicorn_config(
    app,
    host: str,
    port: int,
    timeout_keep_alive: float = KEEP_ALIVE_S,
    timeout_graceful: float = GRACEFUL_S,
    log_level: str = "warning",
    timeout_read: float = READ_TIMEOUT_S,
):
    """The uvicorn configuration every pregate server runs under (`serve`, `bench server`, the tests):
    bounded request heads, a deadline for reading each request, idle and graceful-shutdown timeouts."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=read_timeout_protocol(timeout_read),
        timeout_graceful_shutdown=timeout_graceful,
        timeout_keep_alive=timeout_keep_alive,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


def load_engine(
    model_dir: str,
    config: SchedulerConfig | None = None,
    router_dir: str | None = None,
    dtype: str = "bfloat16",
    resident_experts: int | None = None,
    prefetch: bool = False,
    quantize: str | None = None,
    native: bool = False,
    tiles: bool | None = None,
) -> Engine:
    """The engine over a trained pregate MoE (`pregate train` output: MoE + router), as `serve` runs it.

    resident_experts k: keep at most k whole routed experts in memory (Belady eviction over the running
    step, the rest read from the checkpoint file when needed; `prefetch` loads the next layers' slices
    while a layer computes). The model then computes in the checkpoint's dtype.
    quantize "int8": weight-only int8 (pregate.quantize); with resident_experts the routed experts stay in
    the checkpoint's dtype (the store serves them) and the rest is int8.
    native: decode rows through the native layers (pregate.native; bfloat16 or int8, experts resident);
    tiles: with native, its bfloat16 weights tiled (pregate.native_layout); None:
    where pregate.native.default_tiles says, False: never."""
    from transformers import AutoTokenizer

    from pregate.checkpoint import parse_dtype
    from pregate.moe import load_moe
    from pregate.router import PreGatingRouter, load_router

    store, weights_dtype = None, parse_dtype(dtype)
    if native and resident_experts is not None:  # before any loading: the two options exclude each other
        raise PregateError("--native needs every routed expert resident; drop --resident-experts")
    if tiles is not None and not native:
        flag = "--native-tiles" if tiles else "--no-native-tiles"
        raise PregateError(f"{flag} lays out the native layers' weights; add --native")
    if resident_experts is not None:
        from pregate.store import ExpertStore, StoreConfig

        store = ExpertStore(model_dir, StoreConfig(capacity=resident_experts, prefetch=prefetch))
        if store.dtype != weights_dtype:
            print(
                f"note: with --resident-experts the model computes in the checkpoint's {store.dtype}, not "
                f"{dtype}"
            )
        weights_dtype = store.dtype
    moe = load_moe(model_dir, weights_dtype, routed_experts=store is None)  # offloaded: never all in memory
    router = load_router(router_dir or model_dir) if moe.num_experts else None
    if router is not None and not isinstance(router, PreGatingRouter):
        raise PregateError(
            f"{router_dir or model_dir} holds a layer-wise gate; pre-gating serving needs a router trained "
            "without --layerwise"
        )
    from pregate.packed import cpu_packs_bfloat16, serving_layout

    serving_layout(moe, router, quantize, native, tiles=tiles)  # int8, or packed bfloat16 (pregate.packed)
    if weights_dtype == torch.bfloat16 and not (quantize or native or cpu_packs_bfloat16()):
        print(
            "note: this CPU's oneDNN cannot pack bfloat16 (no avx_ne_convert or AVX-512), so torch's "
            "bfloat16 products run on plain weights, far slower; --native serves this model faster "
            "(docs/serving.md)"
        )
    if native:
        from pregate.native import products

        print(f"native decode layers: bfloat16 and int8 products on {products()} (pregate.native)")
        if moe.native.tiling is not None:
            print("native weights: tiled, each call streams one run of memory (pregate.native_layout)")
        elif tiles:
            print("note: --native-tiles could not tile this model's weights in place; the kernels read rows")
    if store is not None:
        on_disk = store.slice_bytes * store.num_experts * store.num_layers
        print(
            f"expert offloading: {store.capacity} of {store.num_experts} experts resident, "
            f"{on_disk / 2**20:.0f} MiB of routed-expert weights read from disk as needed"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(
        moe, tokenizer, router, config or SchedulerConfig(), expert_store=store, history=ENGINE_HISTORY
    )
    return engine


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: SchedulerConfig | None = None,
    router_dir: str | None = None,
    dtype: str = "bfloat16",
    model_name: str | None = None,
    resident_experts: int | None = None,
    prefetch: bool = False,
    limits: ServerLimits | None = None,
    timeout_keep_alive: float = KEEP_ALIVE_S,
    timeout_graceful: float = GRACEFUL_S,
    quantize: str | None = None,
    timeout_read: float = READ_TIMEOUT_S,
    native: bool = False,
    tiles: bool | None = None,
) -> None:
    """Serve a trained pregate MoE (`load_engine`) until interrupted.

    limits: see ServerLimits; bound to a loopback address, only loopback Host headers are accepted.
    timeout_keep_alive: seconds an idle connection stays open; timeout_graceful: seconds open requests
    get to finish on shutdown; timeout_read: seconds a client gets to send a whole request."""
    import socket

    import uvicorn

    with socket.socket() as probe:  # fail before loading the model, with a message that says what to do
        # as uvicorn binds: a restart right after a stop must not trip over the old TIME_WAIT connections
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise PregateError(
                f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host"
            ) from None
    engine = load_engine(
        model_dir, config, router_dir, dtype, resident_experts, prefetch, quantize, native, tiles
    )
    store = engine.store
    name = model_name or Path(model_dir).resolve().name
    print(
        f"serving {model_dir} as {name!r} on http://{host}:{port}/v1 (policy "
        f"{engine.scheduler_config.policy}, "
        f"{torch.get_num_threads()} torch threads); Ctrl-C stops",
        flush=True,
    )
    limits = limits or ServerLimits()
    if host in LOOPBACK_HOSTS and limits.allowed_hosts is None:  # a web page's DNS rebinding cannot reach us
        limits = replace(limits, allowed_hosts=LOOPBACK_HOSTS)
    app = build_app(engine, name, limits)
    server = uvicorn.Server(
        uvicorn_config(app, host, port, timeout_keep_alive, timeout_graceful, timeout_read=timeout_read)
    )
    runner = app.state.runner
    runner.on_death = lambda: setattr(server, "should_exit", True)  # a supervisor restarts us on exit 1
    try:
        server.run()
    finally:
        if store is not None:
            store.close()
    if runner.error is not None:
        raise EngineStopped(
            f"{runner.error}; the server stopped (exit status 1 so a supervisor can restart it)"
        )
