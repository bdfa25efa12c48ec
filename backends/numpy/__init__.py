"""st-sdk plugin: the NumPy reference backend."""
from st_sdk.plugins import hookimpl


@hookimpl
def st_sdk_backends():
    from .backend import NumpyBackend

    return [NumpyBackend]
