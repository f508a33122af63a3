"""Steering library: the steering rule, the hook's lifetime, and baseline-vs-steered generation.

Models: tiny Llama (A, d=64, steered at layer 1) and tiny Qwen3 (B, d=48, layer 2); feature
ids 0..5 are A-exclusive, 6..11 B-exclusive, 12..63 shared (see `steer_fixtures.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from steer_fixtures import SCALE_A, SCALE_B, STEER_LAYER_A, STEER_LAYER_B, make_steerable_run, s_max_of

from xdiff_cli.errors import XdiffError
from xdiff_cli.findings.steering import (
    Steerer,
    SteerResult,
    decode,
    encode_prompt,
    steer,
    steering_vector,
)

A_EXCLUSIVE, B_EXCLUSIVE, SHARED = 3, 8, 20
PROMPT = "Tell me about the cat"


@pytest.fixture(scope="module")
def steerer(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Steerer:
    """One run and one Steerer (models cached) for the module; tests must leave no hooks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIFF_HOME", str(tmp_path_factory.mktemp("steer-home")))
        run = make_steerable_run(tiny_models, tmp_path_factory.mktemp("steer-run"))
    steerer = Steerer(run)
    yield steerer
    steerer.close()


def _layer_output(loaded, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The output of decoder layer `layer` for `ids` (after any hooks registered earlier)."""
    captured = []
    handle = loaded.adapter.layer(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        handle.remove()
    output = captured[0]
    return (output[0] if isinstance(output, tuple) else output).clone()


def _prompt_ids(loaded) -> list[int]:
    return encode_prompt(loaded.tokenizer, PROMPT, raw=False)[0]


def _all_hooks(loaded) -> int:
    return sum(len(m._forward_hooks) for m in loaded.model.modules())


# --- the steering rule -------------------------------------------------------------------


def test_steering_vector_is_decoder_row_unnormalised_by_hand(steerer: Steerer) -> None:
    cc = steerer.crosscoder
    by_hand_b = -3.0 * 2.5 * cc.W_dec_FB[B_EXCLUSIVE].detach() / SCALE_B
    by_hand_a = 4.0 * 1.5 * cc.W_dec_FA[SHARED].detach() / SCALE_A
    assert torch.allclose(steering_vector(cc, B_EXCLUSIVE, "b", 2.5, -3.0), by_hand_b, rtol=1e-6, atol=0)
    assert torch.allclose(steering_vector(cc, SHARED, "a", 1.5, 4.0), by_hand_a, rtol=1e-6, atol=0)
    # One element fully by hand: α · s_max · d / scale.
    element = float(cc.W_dec_FB[B_EXCLUSIVE, 5].detach())
    assert float(steering_vector(cc, B_EXCLUSIVE, "b", 2.5, -3.0)[5]) == pytest.approx(-3.0 * 2.5 * element / 2.0)
    assert steering_vector(cc, B_EXCLUSIVE, "b", 2.5, -3.0).shape == (48,)


def test_steering_vector_refuses_a_feature_the_model_does_not_own(steerer: Steerer) -> None:
    with pytest.raises(XdiffError, match="exclusive to model B"):
        steering_vector(steerer.crosscoder, B_EXCLUSIVE, "a", 1.0, 1.0)
    with pytest.raises(XdiffError, match="out of range"):
        steering_vector(steerer.crosscoder, 64, "a", 1.0, 1.0)


def test_hooked_layer_output_is_plain_output_plus_vector_at_every_position(steerer: Steerer) -> None:
    loaded = steerer.load("b")
    ids = torch.tensor([_prompt_ids(loaded)])
    vector = steering_vector(steerer.crosscoder, B_EXCLUSIVE, "b", s_max_of(B_EXCLUSIVE), 2.0)
    plain_TD = _layer_output(loaded, STEER_LAYER_B, ids)[0]
    plain_first_TD = _layer_output(loaded, 0, ids)[0]
    with steer(loaded, STEER_LAYER_B, vector):
        steered_TD = _layer_output(loaded, STEER_LAYER_B, ids)[0]
        steered_first_TD = _layer_output(loaded, 0, ids)[0]
    assert plain_TD.shape[0] == ids.shape[1] > 5
    assert torch.allclose(steered_TD - plain_TD, vector.expand_as(plain_TD), atol=1e-5)
    # Layers before the steered one are untouched.
    assert torch.equal(steered_first_TD, plain_first_TD)


def test_steerer_vector_sums_several_features(steerer: Steerer) -> None:
    features = [(SHARED, -4.0), (40, 2.0), (A_EXCLUSIVE, 1.0)]
    total, notes = steerer.vector(features, "a")
    expected = sum(steering_vector(steerer.crosscoder, f, "a", s_max_of(f), s) for f, s in features)
    assert torch.allclose(total, expected)
    assert notes == []


# --- the hook's lifetime -----------------------------------------------------------------


def test_hook_is_removed_after_normal_exit_and_after_an_exception(steerer: Steerer) -> None:
    loaded = steerer.load("a")
    layer = loaded.adapter.layer(STEER_LAYER_A)
    prompt_ids = _prompt_ids(loaded)
    before, _ = decode(loaded, prompt_ids, max_new_tokens=8)
    vector = torch.full((64,), 5.0)
    with steer(loaded, STEER_LAYER_A, vector):
        assert len(layer._forward_hooks) == 1
        steered, _ = decode(loaded, prompt_ids, max_new_tokens=8)
    assert steered != before
    assert len(layer._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="boom"), steer(loaded, STEER_LAYER_A, vector):
        raise RuntimeError("boom")
    assert _all_hooks(loaded) == 0
    after, _ = decode(loaded, prompt_ids, max_new_tokens=8)
    assert after == before


def test_generate_leaves_no_hook_when_cancelled_midway(steerer: Steerer) -> None:
    calls = []

    def stop_on_third_poll() -> bool:
        calls.append(1)
        return len(calls) > 3

    result = steerer.generate(PROMPT, [(SHARED, 3.0)], side="a", max_new_tokens=20, should_stop=stop_on_third_poll)
    assert result.stopped
    assert result.steered == ""  # stopped during the baseline: the steered run never started
    assert _all_hooks(steerer.load("a")) == 0


# --- generation --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["a", "b"])
def test_scale_zero_reproduces_plain_generation_exactly(steerer: Steerer, side: str) -> None:
    loaded = steerer.load(side)
    layer = STEER_LAYER_A if side == "a" else STEER_LAYER_B
    prompt_ids = _prompt_ids(loaded)
    plain, _ = decode(loaded, prompt_ids, max_new_tokens=16)
    zero = steering_vector(steerer.crosscoder, SHARED, side, s_max_of(SHARED), 0.0)
    with steer(loaded, layer, zero):
        steered, _ = decode(loaded, prompt_ids, max_new_tokens=16)
    assert steered == plain and len(plain) > 0
    result = steerer.generate(PROMPT, [(SHARED, 0.0)], side=side, max_new_tokens=16, measure=True)
    assert result.steered == result.baseline
    assert result.kl == 0.0 and result.kl_random == 0.0  # a zero-norm random direction too


def test_scale_zero_with_sampling_reproduces_the_sampled_baseline(steerer: Steerer) -> None:
    result = steerer.generate(PROMPT, [(SHARED, 0.0)], side="a", max_new_tokens=12, temperature=1.0, seed=7)
    again = steerer.generate(PROMPT, [(SHARED, 0.0)], side="a", max_new_tokens=12, temperature=1.0, seed=7)
    greedy = steerer.generate(PROMPT, [(SHARED, 0.0)], side="a", max_new_tokens=12)
    assert result.steered == result.baseline == again.baseline
    assert result.baseline != greedy.baseline


def test_nonzero_scale_changes_the_next_token_distribution(steerer: Steerer) -> None:
    loaded = steerer.load("b")
    ids = torch.tensor([_prompt_ids(loaded)])
    vector = steering_vector(steerer.crosscoder, B_EXCLUSIVE, "b", s_max_of(B_EXCLUSIVE), 4.0)
    with torch.no_grad():
        plain_V = loaded.model(input_ids=ids).logits[0, -1]
        with steer(loaded, STEER_LAYER_B, vector):
            steered_V = loaded.model(input_ids=ids).logits[0, -1]
    assert (plain_V - steered_V).abs().max() > 1e-2
    result = steerer.generate(PROMPT, [(B_EXCLUSIVE, 4.0)], side="b", max_new_tokens=16, measure=True)
    assert result.steered != result.baseline
    assert result.kl is not None and result.kl > 1e-3
    opposite = steerer.generate(PROMPT, [(B_EXCLUSIVE, 0.5)], side="b", max_new_tokens=16, measure=True)
    assert 0.0 < opposite.kl < result.kl  # a smaller push moves the distribution less
    assert result.kl_random is not None and result.kl_random > 0  # the same push, random direction


def test_random_baseline_direction_has_the_steering_vectors_norm_and_is_seeded() -> None:
    from xdiff_cli.findings.steering import random_direction_like

    vector = torch.tensor([3.0, 4.0, 0.0, 0.0])
    first, again = random_direction_like(vector, seed=1), random_direction_like(vector, seed=1)
    assert torch.allclose(first, again) and float(first.norm()) == pytest.approx(5.0)
    assert abs(float(torch.nn.functional.cosine_similarity(first, vector, dim=0))) < 0.999


def test_streamed_pieces_add_up_to_the_answers(steerer: Steerer) -> None:
    pieces: dict[str, str] = {"baseline": "", "steered": ""}

    def on_token(stream: str, piece: str) -> None:
        pieces[stream] += piece

    result = steerer.generate(PROMPT, [(SHARED, -4.0)], side="a", max_new_tokens=16, on_token=on_token)
    assert pieces == {"baseline": result.baseline, "steered": result.steered}
    assert result.baseline and result.steered


def test_steering_a_b_exclusive_feature_never_loads_or_touches_model_a(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    run = make_steerable_run(tiny_models, tmp_path)
    steerer = Steerer(run)
    assert steerer.sides_for([(B_EXCLUSIVE, 2.0)]) == ["b"]
    steerer.generate(PROMPT, [(B_EXCLUSIVE, 2.0)], side="b", max_new_tokens=4)
    assert set(steerer._models) == {"b"}
    # A shared feature steered on B only: model A's outputs stay those of a plain model.
    loaded_a = steerer.load("a")
    ids = torch.tensor([_prompt_ids(loaded_a)])
    with torch.no_grad():
        before = loaded_a.model(input_ids=ids).logits
    steerer.generate(PROMPT, [(SHARED, 4.0)], side="b", max_new_tokens=4)
    with torch.no_grad():
        assert torch.equal(loaded_a.model(input_ids=ids).logits, before)
    assert _all_hooks(loaded_a) == 0


def test_sides_follow_the_feature_partition(steerer: Steerer) -> None:
    assert steerer.sides_for([(A_EXCLUSIVE, 1.0)]) == ["a"]
    assert steerer.sides_for([(B_EXCLUSIVE, 1.0)]) == ["b"]
    assert steerer.sides_for([(SHARED, 1.0)]) == ["a", "b"]
    assert steerer.sides_for([(SHARED, 1.0)], model="b") == ["b"]
    assert steerer.sides_for([(SHARED, 1.0), (B_EXCLUSIVE, 1.0)]) == ["b"]
    with pytest.raises(XdiffError, match="exclusive to model B; it cannot steer model A"):
        steerer.sides_for([(B_EXCLUSIVE, 1.0)], model="a")
    with pytest.raises(XdiffError, match="exclusive to different models"):
        steerer.sides_for([(A_EXCLUSIVE, 1.0), (B_EXCLUSIVE, 1.0)])


def test_result_json_has_the_contract_shape() -> None:
    one = SteerResult([(12, -4.0)], "a", "p", "x", "y")
    assert one.to_json() == {"feature": 12, "model": "a", "scale": -4.0, "prompt": "p", "baseline": "x", "steered": "y"}
    many = SteerResult([(12, -4.0), (40, 2.0)], "b", "p", "x", "y", kl=0.5)
    assert many.to_json()["feature"] == [12, 40]
    assert many.to_json()["scale"] == [-4.0, 2.0]
    assert many.to_json()["kl"] == 0.5


# --- errors ------------------------------------------------------------------------------


def test_out_of_range_feature_is_a_one_line_error(steerer: Steerer) -> None:
    with pytest.raises(XdiffError) as info:
        steerer.generate(PROMPT, [(999, 1.0)], side="a")
    assert str(info.value) == "feature 999 is out of range — valid ids are 0..63"


def test_unanalysed_run_says_to_run_analyze(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    run = make_steerable_run(tiny_models, tmp_path, analysed=False)
    with pytest.raises(XdiffError, match="not been analysed yet.*xdiff analyze"):
        Steerer(run).sides_for([(SHARED, 1.0)])


def test_missing_model_says_how_to_download_it(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    run = make_steerable_run(tiny_models, tmp_path)
    run.set_model("a", {"spec": "org/name", "repo_id": "org/name", "path": str(tmp_path / "cleared-cache")})
    with pytest.raises(XdiffError) as info:
        Steerer(run).generate(PROMPT, [(SHARED, 1.0)], side="a")
    assert str(info.value) == "model A (org/name) is not downloaded — run `xdiff pull org/name`"


def test_prompt_longer_than_the_context_is_an_error(steerer: Steerer) -> None:
    with pytest.raises(XdiffError, match="exceeds model A's context of 512 tokens"):
        steerer.generate("the cat sat " * 200, [(SHARED, 1.0)], side="a", max_new_tokens=8)
    with pytest.raises(XdiffError, match="exceeds"):
        steerer.generate(PROMPT, [(SHARED, 1.0)], side="a", max_new_tokens=600)


def test_layer_comes_from_the_store_manifest_then_run_record_then_middle(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    run = make_steerable_run(tiny_models, tmp_path)
    assert (Steerer(run).layer("a"), Steerer(run).layer("b")) == (STEER_LAYER_A, STEER_LAYER_B)
    (run.store_dir / "manifest.json").unlink()
    run.set_model("a", {**run.models["a"].to_json(), "layer": 3})
    steerer = Steerer(run)
    assert steerer.layer("a") == 3
    assert steerer.layer("b") == 2  # tiny Qwen3 has 4 layers: the middle one


def test_tokenizer_without_chat_template_falls_back_to_raw_with_a_note(steerer: Steerer) -> None:
    tokenizer = steerer.load("a").tokenizer
    template = tokenizer.chat_template
    chat_ids, chat_notes = encode_prompt(tokenizer, PROMPT, raw=False)
    raw_ids, _ = encode_prompt(tokenizer, PROMPT, raw=True)
    try:
        tokenizer.chat_template = None
        ids, notes = encode_prompt(tokenizer, PROMPT, raw=False)
    finally:
        tokenizer.chat_template = template
    assert chat_notes == [] and chat_ids != raw_ids
    assert ids == raw_ids
    assert notes == ["this model's tokenizer has no chat template; the prompt is used as raw text"]
