"""st-sdk plugin module: the entry point `example = "st_sdk_example_backend"` names this module.

Keep it light: st-sdk imports it while discovering backends. Import heavy dependencies in the
backend's `is_available()`, not here.
"""
from st_sdk import hookimpl


@hookimpl
def st_sdk_backends():
    from .backend import ExampleBackend

    return [ExampleBackend]
