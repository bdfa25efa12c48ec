"""st-sdk plugin: the C kernel backend (cffi; csrc/)."""
from st_sdk.plugins import hookimpl


@hookimpl
def st_sdk_backends():
    from .backend import CBackend

    return [CBackend]
