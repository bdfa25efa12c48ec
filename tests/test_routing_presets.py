"""`st-sdk synth --routing uniform|skewed[:S]`: random weights whose routing spreads over the experts
as stated, for measuring the memory budget's expert cache on its worst case and on a skewed one."""
import numpy as np
import pytest

from conftest import routed_stats
from st_sdk.errors import InputError
from st_sdk.synth import synth_config, write_model, zipf_shares


def routed(spec: str, experts: int = 16, active: int = 2):
    cfg, _ = synth_config("tiny", layers=4, moe_num_primary_experts=experts, moe_num_active_primary_experts=active,
                          hidden_size=128)
    return routed_stats(cfg, spec, tokens=1024, seed=3)


def test_uniform_routing_uses_every_expert_about_equally():
    got = routed("uniform")
    for i, layer in enumerate(got.layers):
        share = np.asarray(layer.expert_share)
        assert share.min() > 0.5 / 16 and share.max() < 1.6 / 16, (i, share)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_skewed_routing_follows_the_stated_zipf_shares(s):
    """(A share cannot pass 1/k: a token picks an expert once; with 16 experts and k = 2, S <= 1 stays
    below that.)"""
    got = routed(f"skewed:{s:g}")
    want = zipf_shares(16, s)
    for i, layer in enumerate(got.layers):
        share = np.sort(layer.expert_share)[::-1]
        assert np.abs(share - want).max() < 0.05, (i, share, want)
    # more skew: the most popular expert takes more of the picks
    assert np.sort(got.layers[0].expert_share)[-1] > 1.5 / 16


def test_routing_spec_errors(tmp_path):
    with pytest.raises(InputError, match="S must be a number from 0 to 4"):
        write_model(tmp_path, routing="skewed:much")
    with pytest.raises(InputError, match="takes no parameter"):
        write_model(tmp_path, routing="uniform:3")
    assert not list(tmp_path.glob("*.gguf"))
