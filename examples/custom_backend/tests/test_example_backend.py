"""The example backend's own conformance test: what every backend author runs in their suite."""
import pytest

testing = pytest.importorskip("st_sdk.testing", reason="st_sdk.testing (the conformance kit) is not installed")

from st_sdk_example_backend.backend import ExampleBackend  # noqa: E402


class TestExampleConformance(testing.ConformanceSuite):
    backend = ExampleBackend
    formats = ("f32", "q8_0")
