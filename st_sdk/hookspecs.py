"""Hook specifications of st-sdk, each documented where it is declared (contract).

Plugins implement these with `@st_sdk.hookimpl`. They are called on the control plane only (once per
model load or per CLI command), never per token.
"""
from __future__ import annotations

from .plugins import hookspec


@hookspec
def st_sdk_backends():
    """Return a list of `st_sdk.Backend` subclasses this plugin provides.

    Called by the plugin manager once, when backends are first enumerated (the first `st_sdk.load`,
    `st-sdk backends`, ...). Return classes, not instances: the SDK instantiates them with
    `n_threads` and `dtype`. Import heavy dependencies inside the backend's `is_available`, not here.
    """
