"""A local BitGo for CI and demos: client and partner routes, signed calls, fault injection."""

from sandbox.app import create_sandbox_app

__all__ = ["create_sandbox_app"]
