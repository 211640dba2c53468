"""SSL method registry: each method is heads + loss + per-sample loss."""

from cba.ssl.base import SSLMethod
from cba.ssl.registry import METHODS, build_method
from cba.ssl import byol, mocov2, simclr, simsiam, supervised  # noqa: F401  (registration)

__all__ = ["METHODS", "SSLMethod", "build_method"]
