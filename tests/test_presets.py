"""Presets: the shipped files parse, matching is exact-order, and precedence is
RunSettings defaults < hardware profile or preset < explicit options."""

from __future__ import annotations

import pytest

from xdiff_cli.errors import XdiffError
from xdiff_cli.run import plan as planning
from xdiff_cli.run.hardware import Hardware
from xdiff_cli.run.presets import list_presets, load_preset, match_preset, parse_preset

CPU = Hardware("cpu", cpu_count=2)
GPU = Hardware("cuda", cpu_count=16, gpu_name="H100", gpu_memory_bytes=80 * 2**30)


def test_shipped_presets_parse_and_include_the_paper_pairs_small_and_tiny():
    presets = {p.name: p for p in list_presets()}
    assert {"tiny", "small", "llama3-qwen3", "gptoss-r1qwen3"} <= set(presets)
    assert (presets["tiny"].model_a, presets["tiny"].model_b) == ("tiny:llama", "tiny:qwen3")
    assert presets["llama3-qwen3"].model_a == "meta-llama/Llama-3.1-8B-Instruct"
    assert presets["llama3-qwen3"].settings["dict_size"] == 131_072
    assert presets["gptoss-r1qwen3"].settings["layer_a"] == 12
    assert presets["gptoss-r1qwen3"].settings["layer_b"] == 16
    assert all(p.description for p in presets.values())


def test_preset_matches_same_order_only_and_ignores_a_pinned_revision():
    assert match_preset("Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct") is None
    found = match_preset("meta-llama/Llama-3.1-8B-Instruct@abc123", "qwen/qwen3-8b")
    assert found is not None and found.name == "llama3-qwen3"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(XdiffError, match="unknown preset 'nope'.*tiny"):
        load_preset("nope")


def test_preset_with_an_unknown_setting_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[models]\na = "x/a"\nb = "x/b"\n[settings]\nbogus = 1\n')
    with pytest.raises(XdiffError, match="bad.toml sets unknown setting.*bogus"):
        parse_preset(path)


def test_preset_with_an_invalid_value_fails_when_read(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[models]\na = "x/a"\nb = "x/b"\n[settings]\nexclusive_frac = 0.7\n')
    with pytest.raises(XdiffError, match="exclusive-frac"):
        parse_preset(path)


def test_explicit_options_override_the_preset_which_overrides_defaults():
    resolved = planning.resolve_settings(None, None, preset_name="tiny", options={"steps": 7, "k": None}, hardware=CPU)
    s = resolved.settings
    assert (s.model_a, s.model_b) == ("tiny:llama", "tiny:qwen3")
    assert s.steps == 7  # explicit
    assert s.k == 16 and s.dict_size == 256  # preset
    assert s.eval_fraction == 0.1  # RunSettings default
    assert resolved.preset.name == "tiny"


def test_models_matching_a_preset_pick_it_and_say_so():
    resolved = planning.resolve_settings("Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", hardware=GPU)
    assert resolved.preset.name == "small"
    assert resolved.settings.tokens == 40_000
    assert any("preset 'small' picked" in note for note in resolved.notes)


def test_without_a_preset_defaults_shrink_on_a_cpu_and_not_on_a_gpu():
    on_cpu = planning.resolve_settings("org/a", "org/b", hardware=CPU)
    assert on_cpu.preset is None
    assert on_cpu.settings.tokens == planning.CPU_PROFILE["tokens"]
    assert on_cpu.settings.dict_size == planning.CPU_PROFILE["dict_size"]
    assert any("CPU-only" in note for note in on_cpu.notes)
    on_gpu = planning.resolve_settings("org/a", "org/b", options={"tokens": 123}, hardware=GPU)
    assert on_gpu.settings.tokens == 123
    assert on_gpu.settings.steps == planning.GPU_PROFILE["steps"]
    assert on_gpu.settings.dict_size is None  # 32x the mean width, decided by the planner/trainer


def test_same_model_twice_is_allowed_with_a_warning():
    resolved = planning.resolve_settings("org/a", "ORG/a", hardware=CPU)
    assert any("same" in w for w in resolved.warnings)


def test_one_model_or_none_without_a_preset_is_an_error():
    with pytest.raises(XdiffError, match="two models"):
        planning.resolve_settings("org/a", None, hardware=CPU)
    with pytest.raises(XdiffError, match="no models given"):
        planning.resolve_settings(None, None, hardware=CPU)
