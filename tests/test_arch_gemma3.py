"""Gemma3 (the real pair's model B) through the architecture adapter: the hooked layer output
is the residual stream (hidden_states[layer + 1]), embedding scale included, and steering
writes exactly there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xdiff_cli.data.harvest import layer_activations
from xdiff_cli.findings.steering import steer
from xdiff_cli.models.arch import ArchAdapter


@pytest.fixture(scope="module")
def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


class _Loaded:
    def __init__(self, model):
        self.model, self.adapter = model, ArchAdapter(model)
        self.tokenizer = SimpleNamespace(pad_token_id=0)

    @property
    def input_device(self):
        return self.model.get_input_embeddings().weight.device


def test_gemma3_layer_output_is_the_residual_stream_with_scaled_embeddings(gemma3):
    adapter = ArchAdapter(gemma3)
    assert adapter.num_layers == 4 and adapter.hidden_size == 64 and adapter.layers is gemma3.model.layers
    ids = torch.randint(1, 300, (1, 20))
    with torch.no_grad():
        hidden = gemma3(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding times sqrt(d): Gemma's scale is inside the residual.
    raw = gemma3.model.embed_tokens.weight[ids]
    assert torch.allclose(hidden[0], raw * 64**0.5, atol=1e-4)
    got = layer_activations(_Loaded(gemma3), [ids[0].tolist()], 1)
    assert torch.allclose(got[0], hidden[2][0], atol=1e-5)


def test_gemma3_steering_adds_the_vector_to_that_residual(gemma3):
    ids = torch.randint(1, 300, (1, 12))
    vector = torch.randn(64)
    loaded = _Loaded(gemma3)
    plain = layer_activations(loaded, [ids[0].tolist()], 1)
    with steer(loaded, 1, vector):
        steered = layer_activations(loaded, [ids[0].tolist()], 1)
    assert torch.allclose(steered, plain + vector, atol=1e-5)
    after = layer_activations(loaded, [ids[0].tolist()], 1)  # the hook is gone afterwards
    assert torch.allclose(after, plain)
