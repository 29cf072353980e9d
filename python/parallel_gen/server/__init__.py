"""An OpenAI-compatible HTTP server whose concurrent clients share one batch.

    from parallel_gen.server import create_app
    app = create_app(model, api_key="secret")     # an ASGI app; or `parallel-gen serve`

Needs the ``serve`` extra: ``pip install 'parallel_gen[serve]'``.
"""

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: `parallel-gen --help` imports server.cli, which must work without the extra.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'parallel_gen.server' has no attribute {name!r}")
