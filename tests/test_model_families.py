"""What each family's full model does outside its decoder blocks, the parts do too.

The shared equivalence tests (split logits, cut points, padding, KV caches, LoRA gradients,
adapter export) run over every tiny architecture; these tests pin the family details they
rely on: the registry's errors, Gemma's embedding scale, final soft-capping and norm gain,
Gemma 3's per-layer-type rotary frequencies, the tiny models really using sliding windows
and soft-capping, ``make-tiny`` for every family, and split generation through a trunk
server for every family.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SENTENCES, local_greedy_tokens, tokenize
from lora_helpers import trained_parts
from split_helpers import full_forward, run_split
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3Config, Gemma3TextConfig, GPTNeoXConfig

from splitcore import LoraSettings, export_parts_adapter, family_for, split_model
from splitcore.cli.main import main as splitcore_main
from splitcore.generation.local import GenerationSettings, encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.model.architectures import FAMILIES, FULL_ATTENTION, SLIDING_ATTENTION
from splitcore.model.architectures.gemma3 import Gemma3Family
from splitcore.model.tiny_models import TINY_ARCHS
from splitcore.remote.client import TrunkClient
from trunk_server.config import TrunkServerConfig
from trunk_server.host import TrunkHost
from trunk_server.server import create_server

NEW_FAMILIES = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                "phi3": "Phi3ForCausalLM"}
GEMMAS = ("gemma2", "gemma3")
RMS_NORM_ARCHS = [arch for arch in TINY_ARCHS if arch != "gpt2"]  # GPT-2's LayerNorm also shifts


# --- the registry ----------------------------------------------------------------------------


def test_an_unsupported_model_type_gets_an_error_naming_every_supported_family():
    with pytest.raises(ValueError) as error:
        family_for(GPTNeoXConfig())
    text = str(error.value)
    assert "unsupported architecture 'gpt_neox'" in text
    for family in FAMILIES:
        assert f"{family.name} ({', '.join(family.model_types)})" in text
    for named in ("qwen3 (qwen3)", "gemma2 (gemma2)", "gemma3 (gemma3_text)", "phi3 (phi3)"):
        assert named in text


def test_the_vision_language_gemma3_is_refused_with_a_pointer_to_the_text_model():
    with pytest.raises(ValueError) as error:
        family_for(Gemma3Config())
    text = str(error.value)
    assert "unsupported architecture 'gemma3'" in text
    assert "Gemma3ForConditionalGeneration" in text and "vision-language" in text
    assert "model_type 'gemma3_text'" in text and "Gemma3ForCausalLM" in text


def test_a_bidirectional_gemma_embedding_model_is_refused():
    with pytest.raises(ValueError, match="bidirectional attention .* only causal language models can be split"):
        family_for(Gemma3TextConfig(use_bidirectional_attention=True))


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_each_new_family_is_registered_under_its_model_type(load_model, arch):
    model, _ = load_model(arch)
    family = family_for(model.config)
    assert family.name == arch
    assert model.config.model_type in family.model_types
    assert type(model).__name__ == NEW_FAMILIES[arch]


# --- the tiny models use what makes each family different ------------------------------------


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_the_tiny_models_slide_within_the_test_sentences(load_model, arch):
    model, tokenizer = load_model(arch)
    config = model.config
    longest = max(len(tokenizer(s).input_ids) for s in SENTENCES)
    assert config.sliding_window is not None and config.sliding_window < longest
    kinds = set(family_for(config).layer_attention_types(config))
    # Phi-3 has no layer types: its window applies to every layer. The others alternate.
    assert kinds == ({SLIDING_ATTENTION} if arch == "phi3" else {SLIDING_ATTENTION, FULL_ATTENTION})
    if arch in GEMMAS:
        assert config.final_logit_softcapping is not None
        assert config.query_pre_attn_scalar != config.head_dim
    if arch == "gemma2":
        assert config.attn_logit_softcapping is not None


# --- Gemma's extras outside the blocks -------------------------------------------------------


@pytest.mark.parametrize("arch", GEMMAS)
def test_gemma_bottom_scales_the_embeddings_by_the_root_of_the_hidden_size(load_model, arch):
    model, tokenizer = load_model(arch)
    bottom, _, _ = split_model(model, 2, 2)
    input_ids, attention_mask, _ = tokenize(tokenizer)
    weight = model.get_input_embeddings().weight
    scale = torch.tensor(math.sqrt(model.config.hidden_size), dtype=weight.dtype)
    with torch.no_grad():
        embedded = bottom.embed(input_ids, attention_mask)  # (batch, seq, hidden)
    assert torch.equal(embedded, weight[input_ids] * scale)


@pytest.mark.parametrize("arch", GEMMAS)
def test_gemma_top_soft_caps_the_logits_like_the_full_model(load_model, arch):
    model, tokenizer = load_model(arch)
    model.eval()
    cap = model.config.final_logit_softcapping
    parts = split_model(model, 2, 2)
    input_ids, attention_mask, _ = tokenize(tokenizer)
    raw = {}
    hook = parts[2].lm_head.register_forward_hook(lambda module, inputs, output: raw.update(logits=output))
    try:
        with torch.no_grad():
            logits = run_split(parts, input_ids, attention_mask).logits
    finally:
        hook.remove()
    assert torch.allclose(logits, torch.tanh(raw["logits"] / cap) * cap, atol=1e-6)
    assert logits.abs().max().item() < cap
    assert (raw["logits"] - logits).abs().max().item() > 1e-2, "the cap must bend these logits"


@pytest.mark.parametrize("arch", RMS_NORM_ARCHS)
def test_the_final_norm_gain_is_what_the_norm_multiplies_by(load_model, arch):
    """The gradient attack weighs the LM head by the norm's gain; Gemma's norms scale by 1 + weight."""
    model, _ = load_model(arch)
    top = split_model(model, 2, 2)[2]
    norm = getattr(top.backbone, top.family.final_norm_attr)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, norm.weight.numel()))
        unit = torch.randn(3, norm.weight.numel(), generator=torch.Generator().manual_seed(0))
        unit = unit / unit.pow(2).mean(-1, keepdim=True).sqrt()  # root mean square 1
        assert torch.allclose(norm(unit), unit * top.family.norm_gain(norm), atol=1e-4)
    if arch in GEMMAS:
        assert torch.allclose(top.family.norm_gain(norm), 1 + norm.weight)


def test_gemma3_local_and_global_layers_get_their_own_rotary_frequencies(load_model, monkeypatch):
    model, tokenizer = load_model("gemma3")
    model.eval()
    input_ids, attention_mask, _ = tokenize(tokenizer)
    parts = split_model(model, 2, 2)
    family, backbone = parts[0].family, parts[0].backbone
    hidden = torch.zeros(1, 8, model.config.hidden_size)
    positions = torch.arange(8)[None]
    local = family.block_kwargs(backbone, hidden, positions, SLIDING_ATTENTION)["position_embeddings"][0]
    full = family.block_kwargs(backbone, hidden, positions, FULL_ATTENTION)["position_embeddings"][0]
    assert (local - full).abs().max().item() > 1e-2
    with torch.no_grad():
        expected = full_forward(model, input_ids, attention_mask).logits
        assert (run_split(parts, input_ids, attention_mask).logits - expected).abs().max().item() <= 1e-5
        # One set of frequencies for every layer (the Llama way) does not give the full model's logits.
        one_set = Gemma3Family.block_kwargs
        monkeypatch.setattr(Gemma3Family, "block_kwargs",
                            lambda self, backbone, hidden, positions, kind: one_set(self, backbone, hidden, positions,
                                                                                    FULL_ATTENTION))
        wrong = run_split(parts, input_ids, attention_mask).logits
    assert (wrong - expected).abs().max().item() > 1e-3


def test_phi3_adapts_its_fused_projections(load_model):
    model, _ = load_model("phi3")
    family = family_for(model.config)
    assert family.lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    names = {name for name, _ in model.named_modules()}
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= names


# --- make-tiny -------------------------------------------------------------------------------


def test_make_tiny_lists_every_family_in_its_help(capsys):
    with pytest.raises(SystemExit) as done:
        splitcore_main(["make-tiny", "--help"])
    assert done.value.code == 0
    assert "{" + ",".join(TINY_ARCHS) + "}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_make_tiny_writes_each_new_family(tmp_path, capsys, arch):
    assert splitcore_main(["make-tiny", "--arch", arch, "--out", str(tmp_path / arch)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / arch)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    assert type(model).__name__ == NEW_FAMILIES[arch]
    assert family_for(model.config).name == arch
    assert model.config.num_hidden_layers == 6
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 400_000


# --- generation through a trunk server -------------------------------------------------------


@pytest.fixture
def trunk_for(tiny_dirs):
    """trunk_for(arch) -> the address of an in-process trunk server for that tiny model."""
    running = []

    def start(arch: str) -> str:
        config = TrunkServerConfig(model_dir=tiny_dirs[arch], n_bottom=2, n_top=2, token="t" * 32, port=0)
        server = create_server(config, TrunkHost(config))
        running.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for server in running:
        server.stop(grace_s=1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_split_generation_gives_the_greedy_tokens_of_the_unsplit_model(tiny_dirs, trunk_for, tmp_path, arch):
    model_dir = tiny_dirs[arch]
    settings = LoraSettings(r=4, alpha=8)
    family, parts = trained_parts(model_dir, settings)
    adapter = export_parts_adapter(parts, tmp_path / "adapter", family, settings, str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Longer than the sliding window, and 12 more tokens on top: the caches of every side must slide.
    input_ids = encode_prompt(tokenizer, "Split learning keeps the data with its owner. The quick", chat=False)
    assert input_ids.shape[1] > 6

    def local_tokens(with_adapter):
        return local_greedy_tokens(model_dir, input_ids, tokenizer.pad_token_id, 12,
                                   adapter if with_adapter else None)

    generation = GenerationSettings(max_new_tokens=12)
    with TrunkClient(trunk_for(arch), "t" * 32) as client:
        adapted = list(SplitGenerator.from_directory(model_dir, client, adapter).generate(input_ids, tokenizer,
                                                                                          generation))
        base = list(SplitGenerator.from_directory(model_dir, client).generate(input_ids, tokenizer, generation))
    assert adapted == local_tokens(True)
    assert base == local_tokens(False)
    assert adapted != base, "the adapter must change the answer for the comparison to mean something"
