"""Plugin markers for st-sdk. `st_sdk.hookimpl` marks a plugin's hook implementations (contract)."""
import pluggy

PROJECT = "st_sdk"
ENTRY_POINT_GROUP = "st_sdk.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
