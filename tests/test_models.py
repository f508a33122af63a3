"""Loading (precision, devices, rejections), the architecture adapter, and the memory planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xdiff_cli.errors import XdiffError

CONFIGS = Path(__file__).parent / "data" / "configs"
GB = 10**9

# --- architecture adapter ------------------------------------------------------------------

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "gpt_neox": {"num_key_value_heads": None},
    "gpt2": {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64},
}


def _tiny_random_model(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in {**_COMMON, **_FAMILIES[model_type]}.items() if v is not None}
    if model_type == "gpt2":  # GPT-2 names its sizes differently
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
        }
        kwargs.update(_FAMILIES["gpt2"])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


@pytest.mark.parametrize("model_type", sorted(_FAMILIES))
def test_adapter_finds_layers_width_and_residual_of_each_family(model_type: str):
    import torch

    from xdiff_cli.models.arch import ArchAdapter, layer_output_tensor

    model = _tiny_random_model(model_type)
    adapter = ArchAdapter(model)
    assert (adapter.num_layers, adapter.hidden_size, adapter.default_layer) == (3, 32, 1)
    seen = []
    handle = adapter.layer(1).register_forward_hook(
        lambda mod, args, out: seen.append(layer_output_tensor(out))
    )
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True)
    handle.remove()
    # The hooked layer's output is the residual stream after layer 1 = hidden_states[2].
    assert seen[0].shape == (1, 4, 32)
    torch.testing.assert_close(seen[0], out.hidden_states[2])


def test_adapter_rejects_out_of_range_layer():
    from xdiff_cli.models.arch import ArchAdapter

    with pytest.raises(XdiffError, match="out of range"):
        ArchAdapter(_tiny_random_model("llama")).layer(3)


def test_layer_output_helpers_handle_tensor_and_tuple():
    import torch

    from xdiff_cli.models.arch import layer_output_tensor, replace_layer_output

    hidden, extra, new = torch.zeros(2), torch.ones(1), torch.full((2,), 7.0)
    assert layer_output_tensor(hidden) is hidden
    assert layer_output_tensor((hidden, extra)) is hidden
    assert replace_layer_output(hidden, new) is new
    replaced = replace_layer_output((hidden, extra), new)
    assert isinstance(replaced, tuple) and replaced[0] is new and replaced[1] is extra


def test_steering_hook_works_on_layers_that_return_tuples():
    """Older/other families return (hidden, attn, ...): a hook that edits the residual must keep that shape."""
    import torch

    from xdiff_cli.models.arch import ArchAdapter, layer_output_tensor, replace_layer_output

    model = _tiny_random_model("llama")
    layers = ArchAdapter(model).layers

    class TupleLayer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return (self.inner(*args, **kwargs), None)

    original = layers[1]
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
    layers[1] = TupleLayer(original)
    # Downstream layers need a tensor: unwrap the tuple as transformers 4.x did.
    handle_unwrap = layers[1].register_forward_hook(lambda mod, args, out: layer_output_tensor(out))
    with torch.no_grad():
        same = model(ids).logits
    handle_unwrap.remove()
    shift = torch.ones(32)
    handle = layers[1].register_forward_hook(
        lambda mod, args, out: layer_output_tensor(
            replace_layer_output(out, layer_output_tensor(out) + shift)
        )
    )
    with torch.no_grad():
        steered = model(ids).logits
    handle.remove()
    torch.testing.assert_close(same, before)
    assert not torch.allclose(steered, before)


def test_adapter_general_fallback_finds_an_unknown_family():
    import torch

    from xdiff_cli.models.arch import ArchAdapter

    class Config:
        model_type = "mystery"
        hidden_size = 16
        num_hidden_layers = 4

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.decoder = torch.nn.Module()
            self.decoder.heads = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
            self.decoder.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(4)])

    model = Mystery()
    adapter = ArchAdapter(model)
    assert adapter.layers is model.decoder.blocks and adapter.num_layers == 4


# --- loading ---------------------------------------------------------------------------------


def _reference_and_ids(path: Path):
    import torch

    from xdiff_cli.models.loading import load_model

    ref = load_model(path, quant="none", device="cpu")
    ids = ref.tokenizer("The red cat saw a dog near the river quietly.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref.model(ids, output_hidden_states=True)
    return ref, ids, out


def _relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_full_precision_load_is_eval_no_grad_on_cpu(tiny_models):
    from xdiff_cli.models.loading import load_model

    loaded = load_model(tiny_models["qwen3"], device="cpu")
    assert (loaded.quant, loaded.device, loaded.dtype) == ("none", "cpu", "float32")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.adapter.num_layers == loaded.model.config.num_hidden_layers


@pytest.mark.parametrize(
    ("quant", "layer_class", "bound"), [("8bit", "Linear8bitLt", 0.02), ("4bit", "Linear4bit", 0.1)]
)
def test_quantised_load_on_cpu_is_close_to_fp32(tiny_models, quant: str, layer_class: str, bound: float):
    import torch

    from xdiff_cli.models.loading import load_model

    ref, ids, want = _reference_and_ids(tiny_models["llama"])
    loaded = load_model(tiny_models["llama"], quant=quant, device="cpu")
    assert loaded.quant == quant
    assert type(loaded.adapter.layer(0).mlp.down_proj).__name__ == layer_class
    with torch.no_grad():
        got = loaded.model(ids, output_hidden_states=True)
    middle = loaded.adapter.default_layer + 1
    hidden_error = _relative_error(got.hidden_states[middle], want.hidden_states[middle])
    logit_error = _relative_error(got.logits, want.logits)
    assert 0 < hidden_error < bound  # quantised (not identical), yet close
    assert 0 < logit_error < bound


def test_loading_a_bert_encoder_says_not_a_causal_lm(tmp_path: Path):
    from xdiff_cli.models.loading import load_model

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(XdiffError, match="not a causal LM"):
        load_model(tmp_path, device="cpu")


def test_custom_code_model_needs_trust_remote_code(tmp_path: Path):
    from xdiff_cli.models.loading import inspect_model_dir

    config = {
        "architectures": ["OddForCausalLM"],
        "model_type": "odd_lm",
        "auto_map": {
            "AutoConfig": "configuration_odd.OddConfig",
            "AutoModelForCausalLM": "modeling_odd.OddLM",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(XdiffError, match="--trust-remote-code"):
        inspect_model_dir(tmp_path)
    assert inspect_model_dir(tmp_path, trust_remote_code=True).model_type == "odd_lm"


def test_unknown_model_type_without_code_says_upgrade(tmp_path: Path):
    from xdiff_cli.models.loading import inspect_model_dir

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["NewForCausalLM"], "model_type": "brand_new"})
    )
    with pytest.raises(XdiffError, match="upgrade transformers"):
        inspect_model_dir(tmp_path)


def test_pre_quantised_config_is_detected():
    from xdiff_cli.models.loading import inspect_model_dir

    assert inspect_model_dir(_config_dir("gpt-oss-20b")).prequantized == "mxfp4"
    assert inspect_model_dir(_config_dir("Qwen3-8B")).prequantized is None


def test_asking_for_cuda_without_a_gpu_is_a_user_error():
    import torch

    from xdiff_cli.models.loading import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(XdiffError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == "cpu"


# --- planner ---------------------------------------------------------------------------------

_DIRS: dict[str, Path] = {}


def _config_dir(name: str) -> Path:
    """A directory holding only the published config.json (as `fetch_metadata` would give)."""
    import tempfile

    if name not in _DIRS:
        folder = Path(tempfile.mkdtemp(prefix=f"cfg-{name}-"))
        (folder / "config.json").write_bytes((CONFIGS / f"{name}.json").read_bytes())
        _DIRS[name] = folder
    return _DIRS[name]


def _footprint(name: str):
    from xdiff_cli.models.planner import footprint_from_dir

    return footprint_from_dir(_config_dir(name), name)


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("Llama-3.1-8B-Instruct", 8.03),
        ("Qwen3-8B", 8.19),
        ("DeepSeek-R1-0528-Qwen3-8B", 8.19),
        ("gpt-oss-20b", 20.91),
    ],
)
def test_parameter_estimate_matches_published_sizes(name: str, billions: float):
    assert _footprint(name).n_params / 1e9 == pytest.approx(billions, rel=0.005)


def test_gpt_oss_is_planned_at_its_mxfp4_size():
    fp = _footprint("gpt-oss-20b")
    assert (fp.hidden_size, fp.num_layers, fp.prequantized) == (2880, 24, "mxfp4")
    # The published checkpoint is ~13.8 GB: experts in 4.25 bits, the rest bf16.
    assert fp.disk_bytes / GB == pytest.approx(13.76, rel=0.02)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral", "gpt_oss", "gpt_neox"])
def test_parameter_estimate_matches_real_tiny_models(model_type: str):
    from xdiff_cli.models.planner import estimate_parameters

    model = _tiny_random_model(model_type)
    actual = sum(p.numel() for p in model.parameters())
    estimated, _ = estimate_parameters(model.config.to_dict())
    assert estimated == pytest.approx(actual, rel=0.03)


def test_safetensors_index_total_size_is_used(tmp_path: Path):
    from xdiff_cli.models.planner import footprint_from_dir

    (tmp_path / "config.json").write_bytes((CONFIGS / "Qwen3-8B.json").read_bytes())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 16381470720}})
    )
    assert footprint_from_dir(tmp_path).disk_bytes == 16381470720


def _plan(a: str, b: str, gigabytes: float, **kwargs):
    from xdiff_cli.models.planner import plan_memory

    return plan_memory([_footprint(a), _footprint(b)], free_bytes=int(gigabytes * GB), **kwargs)


@pytest.mark.parametrize(
    ("gigabytes", "quant", "dict_size"),
    [(80, "none", 131072), (24, "8bit", 26624), (16, "4bit", 17408)],
)
def test_llama_vs_qwen_plan_per_gpu_size(gigabytes: float, quant: str, dict_size: int):
    plan = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", gigabytes, native_prequantized=False)
    assert plan.quants == [quant, quant]  # same treatment for both models
    assert plan.dict_size == dict_size  # the paper's 32x when it fits, else the largest that trains
    assert plan.fits and plan.check() is plan
    assert plan.peak_bytes <= plan.budget_bytes


def test_qwen_vs_gpt_oss_plans():
    r1, oss = "DeepSeek-R1-0528-Qwen3-8B", "gpt-oss-20b"
    roomy = _plan(r1, oss, 80, native_prequantized=True)
    assert roomy.quants == ["none", "none"] and roomy.models[1].label == "mxfp4 (as shipped)" and roomy.fits
    # Without MXFP4 kernels transformers dequantises GPT-OSS to bf16 (~42 GB): still fits 80 GB.
    dequantised = _plan(r1, oss, 80, native_prequantized=False)
    assert dequantised.models[1].weight_bytes / GB == pytest.approx(41.8, rel=0.02) and dequantised.fits
    assert _plan(r1, oss, 24, native_prequantized=True).quants == ["4bit", "none"]
    assert _plan(r1, oss, 24, native_prequantized=True).fits
    small = _plan(r1, oss, 16, native_prequantized=True)
    assert not small.fits
    with pytest.raises(XdiffError, match="do not fit"):
        small.check()


def test_forced_quant_is_respected_even_when_none_would_fit():
    assert _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 80, quant="4bit").quants == ["4bit", "4bit"]


def test_per_model_override_is_respected():
    plan = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 80, quant_per_model=["8bit", None])
    assert plan.quants == ["8bit", "none"]


def test_explicit_dict_size_too_big_for_training_says_which_size_fits():
    plan = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 24, dict_size=131072)
    with pytest.raises(XdiffError, match=r"training does not fit.*--dict-size \d+"):
        plan.check()


def test_cpu_plan_says_cpu_and_picks_float32():
    plan = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 128, device="cpu")
    assert (plan.device, plan.dtype, plan.quants) == ("cpu", "float32", ["none", "none"])
    assert any("CPU" in note for note in plan.notes)
    tight = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 48, device="cpu")
    assert tight.dtype == "bfloat16"


def test_crosscoder_training_estimate_counts_adam_state_and_batch_activations():
    from xdiff_cli.models.planner import crosscoder_parameters, crosscoder_training_bytes

    d_a = d_b = 4096
    dict_size = 131072
    params = crosscoder_parameters(d_a, d_b, dict_size)
    assert params == 2 * 131072 * 8192 + 131072 + 8192
    total = crosscoder_training_bytes(d_a, d_b, dict_size, batch_size=2048)
    assert total == params * 20 + 2048 * dict_size * 24 + 2048 * 8192 * 24
    assert total / GB == pytest.approx(49.6, rel=0.01)


def test_plan_describe_and_table_show_precision_and_phases():
    from rich.console import Console

    plan = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 24)
    text = plan.describe()
    assert "8-bit" in text and "harvest" in text and "train" in text and "steer" in text
    console = Console(record=True, width=120)
    console.print(plan.table())
    rendered = console.export_text()
    assert "Qwen3-8B" in rendered and "8.19B" in rendered and "fits" in rendered


def test_plan_command_on_local_config_dirs():
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    args = [
        "plan",
        str(_config_dir("Llama-3.1-8B-Instruct")),
        str(_config_dir("Qwen3-8B")),
        "--gpu-memory",
        "24",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "8-bit" in result.output and "fits" in result.output
    small = CliRunner().invoke(app, [*args[:3], "--gpu-memory", "6"])
    assert small.exit_code == 1 and "do not fit" in small.output


def test_planner_counts_the_training_shuffle_buffers_of_eight_lanes_in_host_memory():
    """The shuffle buffers (8 lanes × one 65,536-token shard, 16-bit) live in host memory:
    counted when the plan budgets RAM (CPU), not in a GPU's budget."""
    from xdiff_cli.data.harvest import DEFAULT_SHARD_TOKENS
    from xdiff_cli.dfc.training import DATA_LANES, TrainConfig
    from xdiff_cli.models.planner import CUDA_CONTEXT_BYTES, SHUFFLE_BUFFER_TOKENS, shuffle_buffer_bytes

    assert SHUFFLE_BUFFER_TOKENS == max(TrainConfig().buffer_tokens, DATA_LANES * DEFAULT_SHARD_TOKENS)
    assert shuffle_buffer_bytes(4096, 4096) == 524_288 * 8192 * 2  # 8.6 GB for two 8B-class models
    gpu = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 80, native_prequantized=False)
    cpu = _plan("Llama-3.1-8B-Instruct", "Qwen3-8B", 80, device="cpu", dict_size=gpu.dict_size)
    assert cpu.phases["train"] - gpu.phases["train"] == shuffle_buffer_bytes(4096, 4096) - CUDA_CONTEXT_BYTES
