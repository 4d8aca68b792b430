"""``ingest sandbox``: the sandbox provider in the foreground, for a service to download from."""

from __future__ import annotations

import click

from sandbox.provider import SandboxConfig, SandboxProvider
from sandbox.server import make_sandbox_server


@click.command()
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--url-lifetime", default=300.0, show_default=True, help="Signed URL lifetime, s.")
@click.option("--latency-ms", default=0.0, show_default=True, help="Added to every request.")
@click.option("--bandwidth", type=int, default=None, help="Download bytes per second.")
@click.option("--quiet", is_flag=True, help="No access log (benchmarks: it costs CPU per request).")
def sandbox(
    port: int,
    host: str,
    url_lifetime: float,
    latency_ms: float,
    bandwidth: int | None,
    quiet: bool,
) -> None:
    """Run a local stand-in for the WhatsApp media provider (Graph, 360dialog, CDN).

    Prints the INGEST_* settings a service needs to download from it. Control it over HTTP:
    POST /_sandbox/numbers, /_sandbox/media, /_sandbox/faults, /_sandbox/reset; GET
    /_sandbox/stats.
    """
    config = SandboxConfig(
        url_lifetime_seconds=url_lifetime, latency_ms=latency_ms, bandwidth=bandwidth
    )
    server = make_sandbox_server(SandboxProvider(config), host, port, quiet=quiet)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    base = f"http://{shown}:{server.port}"
    click.echo(f"INGEST_GRAPH_URL={base}/{config.graph_version}")
    click.echo(f"INGEST_D360_URL={base}/d360")
    click.echo(f"INGEST_MEDIA_HOSTS={shown}" + (",127.0.0.1" if shown == "localhost" else ""))
    click.echo(f"sandbox provider at {base} (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


COMMANDS = (sandbox,)
