"""st-sdk plugin: the JAX backend. jax is imported only when the backend is probed or used."""
from st_sdk.plugins import hookimpl


@hookimpl
def st_sdk_backends():
    from .backend import JaxBackend

    return [JaxBackend]
