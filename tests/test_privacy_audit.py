"""The leakage audit: its attacks read an undefended cut, and each defense blunts its attack.

The noise defenses are measured on the tiny random Llama (64-dimensional hidden states,
so moderate noise already hides a token). A deeper cut does nothing against a random
network, so that effect is measured on the real default model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import PROJECT_ROOT
from peft import LoraConfig, PeftModel, get_peft_model

from splitcore.cli.main import main
from splitcore.data.formats import load_dataset_file
from splitcore.model.parts import split_model
from splitcore.privacy import PrivacySettings, attacks
from splitcore.privacy.audit import (
    ALIGNED_INVERSION,
    EXACT_SEARCH,
    GRADIENT_LABELS,
    GRADIENT_SEARCH,
    LEARNED_INVERSION,
    NETWORK_INVERSION,
    AttackResult,
    AuditConfig,
    AuditReport,
    audit_privacy,
)
from splitcore.privacy.public_text import public_token_chunks

DEMO = PROJECT_ROOT / "webapp" / "demo" / "lighthouse_keeper.jsonl"
FAST = AuditConfig(sample=4, max_tokens=64, candidates=8, public_tokens=2048, seed=0)
# The attacks that assume the public Bottom (the aligned map fits the states it receives instead).
PUBLIC_BOTTOM_ATTACKS = (LEARNED_INVERSION, EXACT_SEARCH)
HIDDEN_ATTACKS = (LEARNED_INVERSION, ALIGNED_INVERSION, EXACT_SEARCH)
GRADIENT_ATTACKS = (GRADIENT_LABELS, GRADIENT_SEARCH)
MOST = 0.8


@pytest.fixture(scope="module")
def demo_examples():
    return load_dataset_file(DEMO).examples


@pytest.fixture(scope="module")
def tiny_llama(load_model):
    return load_model("llama")


def run_audit(model_and_tokenizer, examples, n_bottom=1, config=FAST, **settings) -> AuditReport:
    model, tokenizer = model_and_tokenizer
    return audit_privacy(model, tokenizer, examples, PrivacySettings(**settings), n_bottom, 2, config)


@pytest.fixture(scope="module")
def undefended(tiny_llama, demo_examples) -> AuditReport:
    return run_audit(tiny_llama, demo_examples)


def test_every_attack_reads_most_tokens_of_an_undefended_one_block_cut(undefended):
    assert [result.name for result in undefended.results] == [*HIDDEN_ATTACKS, *GRADIENT_ATTACKS]
    assert not undefended.strong and NETWORK_INVERSION not in undefended.table()
    for result in undefended.results:
        assert result.total > 100, result
        assert result.rate > MOST, result
    # Labels are the next tokens of the trained (assistant) part only: fewer than all tokens.
    assert undefended.result(GRADIENT_LABELS).total < undefended.result(EXACT_SEARCH).total
    assert undefended.examples == FAST.sample


def test_hidden_state_noise_blunts_the_hidden_state_attacks_only(tiny_llama, demo_examples, undefended):
    report = run_audit(tiny_llama, demo_examples, hidden_noise=4.0)
    for name in HIDDEN_ATTACKS:
        assert report.result(name).rate < 0.5 < undefended.result(name).rate - 0.3, report.table()
    for name in GRADIENT_ATTACKS:
        assert report.result(name).rate > MOST, report.table()


def test_gradient_noise_blunts_the_gradient_attack_only(tiny_llama, demo_examples, undefended):
    report = run_audit(tiny_llama, demo_examples, grad_noise=4.0)
    for name in GRADIENT_ATTACKS:
        assert report.result(name).rate < 0.5 < undefended.result(name).rate - 0.3, report.table()
    for name in HIDDEN_ATTACKS:
        assert report.result(name).rate > MOST, report.table()


def test_a_bottom_the_public_weights_cannot_undo_hides_the_hidden_states(tiny_llama, demo_examples, tmp_path):
    model, tokenizer = tiny_llama
    # A LoRA drawn at random (B not zero), as a client could draw it from its secret.
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    private = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=8, lora_alpha=16, target_modules=projections, init_lora_weights=False, task_type="CAUSAL_LM"))
    private.save_pretrained(tmp_path / "adapter")
    report = audit_privacy(model, tokenizer, demo_examples, PrivacySettings(), 1, 2, FAST,
                           bottom_adapter=tmp_path / "adapter")
    for name in PUBLIC_BOTTOM_ATTACKS:
        assert report.result(name).rate < 0.5, report.table()
    # The same private Bottom handed over as a module (as a worker holds it) reads the same.
    adapted = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").base_model.model
    client_bottom, _, _ = split_model(adapted, 1, 2)
    from_module = audit_privacy(model, tokenizer, demo_examples, PrivacySettings(), 1, 2, FAST,
                                bottom_adapter=client_bottom)
    assert [r.recovered for r in from_module.results] == [r.recovered for r in report.results]


def test_the_audit_leaves_the_model_as_it_was(tiny_llama, demo_examples):
    model, tokenizer = tiny_llama
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    run_audit(tiny_llama, demo_examples, hidden_noise=1.0, grad_noise=1.0)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags
    assert all(param.grad is None for param in model.parameters())
    assert model.training
    assert not any(hasattr(module, "lora_A") for module in model.modules())
    model.eval()


def test_a_model_carrying_lora_is_refused(tiny_llama, demo_examples):
    model, tokenizer = tiny_llama
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carries adapter layers"):
        audit_privacy(peft_model, tokenizer, demo_examples, PrivacySettings(), 1, 2, FAST)


def test_report_round_trips_through_json_and_prints_a_table(undefended):
    data = json.loads(json.dumps(undefended.to_dict()))
    assert AuditReport.from_dict(data) == undefended
    assert data["cut"] == {"n_bottom": 1, "n_top": 2}
    assert data["worst_rate"] == undefended.worst_rate == max(r.rate for r in undefended.results)
    table = undefended.table()
    assert "Bottom 1 blocks, Top 2 blocks" in table
    for result in undefended.results:
        assert result.title in table and f"{result.recovered:>5}/{result.total:<5}" in table
    with pytest.raises(ValueError, match="not an audit report"):
        AuditReport.from_dict({"results": []})
    with pytest.raises(ValueError, match="impossible"):
        AttackResult(EXACT_SEARCH, recovered=5, total=4)


@pytest.mark.parametrize("field, value", [("sample", 0), ("max_tokens", 1), ("candidates", 0),
                                          ("public_tokens", 10), ("seed", -1), ("sample", True)])
def test_config_rejects_values_with_a_message(field, value):
    with pytest.raises(ValueError, match="must be a whole number"):
        AuditConfig(**{field: value})


def test_public_text_is_deterministic_and_sized(tiny_llama):
    _, tokenizer = tiny_llama
    chunks = public_token_chunks(tokenizer, 1000, 64)
    assert chunks == public_token_chunks(tokenizer, 1000, 64)
    assert 1000 <= sum(map(len, chunks)) < 1064 and max(map(len, chunks)) <= 64
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert any(chunk[0] == im_start for chunk in chunks)  # the chat template's own tokens are public too


def test_cli_prints_the_table(tiny_dirs):
    command = [sys.executable, "-m", "splitcore", "audit-privacy", "--model", str(tiny_dirs["llama"]),
               "--data", str(DEMO), "--bottom-layers", "1", "--sample", "2", "--max-tokens", "32",
               "--candidates", "4", "--public-tokens", "512", "--grad-noise", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Bottom 1 blocks, Top 2 blocks, hidden noise 0, gradient noise 0.5; 2 examples" in result.stdout
    assert "worst case" in result.stdout


def test_cli_explains_a_cut_that_does_not_fit(tiny_dirs, capsys):
    code = main(["audit-privacy", "--model", str(tiny_dirs["llama"]), "--data", str(DEMO),
                 "--bottom-layers", "5", "--top-layers", "2"])
    assert code == 2
    assert "leaves no layer for the Trunk" in capsys.readouterr().err


@pytest.mark.default_model
def test_a_deeper_cut_blunts_the_hidden_state_attacks_on_the_default_model(default_model_dir, demo_examples):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = AuditConfig(sample=3, max_tokens=48, candidates=8, public_tokens=2048, seed=0)
    shallow = run_audit((model, tokenizer), demo_examples, n_bottom=1, config=config)
    deep = run_audit((model, tokenizer), demo_examples, n_bottom=8, config=config)
    for name in PUBLIC_BOTTOM_ATTACKS:
        assert shallow.result(name).rate > MOST, shallow.table()
        assert deep.result(name).rate < shallow.result(name).rate - 0.1, (shallow.table(), deep.table())
    assert shallow.result(GRADIENT_LABELS).rate > MOST, shallow.table()


def test_a_private_bottom_blunts_the_hidden_state_attacks_and_the_candidate_search_runs_against_it(
        tiny_llama, demo_examples, undefended):
    # On the tiny model's one block, a change of 1x the weights still leaves each token nearest itself; 3x does not.
    report = run_audit(tiny_llama, demo_examples, private_bottom=3.0)
    for name in PUBLIC_BOTTOM_ATTACKS:
        assert report.result(name).rate < 0.5 < undefended.result(name).rate - 0.3, report.table()
    # The aligned map fits the states it receives: it reads more of the private Bottom than the public map does.
    assert report.result(ALIGNED_INVERSION).rate > report.result(LEARNED_INVERSION).rate, report.table()
    assert report.settings["private_bottom"] == 3.0
    assert report.result(GRADIENT_LABELS).rate > MOST, "the Top is public: the gradients still carry the labels"


def test_with_no_gradients_to_the_trunk_the_gradient_channel_reads_nothing(tiny_llama, demo_examples, undefended):
    report = run_audit(tiny_llama, demo_examples, gradients_to_trunk=False)
    assert report.result(GRADIENT_LABELS).recovered == 0
    assert report.result(GRADIENT_LABELS).total == undefended.result(GRADIENT_LABELS).total
    assert report.result(EXACT_SEARCH).rate > MOST


def _attack_inputs(model, tokenizer, length=12):
    """A Top, its input for ``length`` tokens of the demo, and the gradient its loss sends back."""
    bottom, trunk, top = split_model(model, 1, 2)
    ids = torch.tensor([tokenizer("The keeper climbed the lighthouse stairs at dusk, as every night.")["input_ids"]
                        [:length]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        trunk_output = trunk(bottom(ids, mask), mask)
    received = trunk_output.detach().clone().requires_grad_()
    logits = top(received, mask).logits.float()
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    return top, trunk_output, mask, received.grad, ids


def test_the_vocabulary_read_in_blocks_gives_the_guesses_of_one_block(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    top, trunk_output, mask, gradient, ids = _attack_inputs(model, tokenizer)
    embeddings = model.get_input_embeddings().weight.detach()
    vocab = embeddings.shape[0]
    # More rows than one score chunk, each a token's embedding blurred (the nearest is mostly that token).
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (attacks.VOCAB_SCORE_ROWS + 5,), generator=generator)
    predicted = embeddings[tokens] + torch.randn(len(tokens), embeddings.shape[1], generator=generator) \
        * embeddings.std()

    def run():
        return (attacks.nearest_tokens(predicted, embeddings, 8),
                attacks.gradient_labels(top, trunk_output, mask, gradient, k=5).candidates,
                attacks._top_readout(top, trunk_output, mask, mask.bool()).expected_head)

    assert vocab % 7
    monkeypatch.setattr(attacks, "VOCAB_BLOCK_ROWS", vocab + 1)
    whole = run()
    monkeypatch.setattr(attacks, "VOCAB_BLOCK_ROWS", 7)
    blocked = run()
    assert torch.equal(blocked[0], whole[0])
    assert torch.equal(blocked[1], whole[1])
    torch.testing.assert_close(blocked[2], whole[2])
    # The guesses compared are real readings.
    assert (whole[0][:, 0] == tokens).float().mean() > MOST
    assert (whole[1][0, :-1, 0] == ids[0, 1:]).float().mean() > MOST


class _LargestFloat(TorchDispatchMode):
    """Records the most elements of any float32 tensor an operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_a_bf16_head_and_embedding_are_never_copied_whole_to_float(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model).to(torch.bfloat16)
    top, trunk_output, mask, gradient, _ = _attack_inputs(model, tokenizer)
    embeddings = model.get_input_embeddings().weight.detach()
    whole_matrix = embeddings.numel()
    assert top.lm_head.weight.dtype == torch.bfloat16 and top.lm_head.weight.numel() == whole_matrix
    predicted = torch.randn(mask.shape[1], embeddings.shape[1])

    def largest_float(block_rows):
        monkeypatch.setattr(attacks, "VOCAB_BLOCK_ROWS", block_rows)
        with _LargestFloat() as seen:
            attacks.nearest_tokens(predicted, embeddings, 4)
            attacks.gradient_labels(top, trunk_output, mask, gradient, k=4)
        return seen.largest

    # One block is a float copy of the whole matrix, and the measurement sees it ...
    assert largest_float(embeddings.shape[0]) >= whole_matrix
    # ... blocks of 7 rows never make one: the largest float tensors are the (positions, vocab) scores.
    assert largest_float(7) <= max(mask.shape[1] * embeddings.shape[0], 7 * embeddings.shape[1]) < whole_matrix


def test_the_gradient_search_through_the_top_reads_at_least_what_the_identity_reading_does(tiny_llama,
                                                                                          demo_examples):
    """Behind a Top of four blocks, taking the blocks as the identity misreads labels the search through the
    public Top recovers from the same candidates."""
    model, tokenizer = tiny_llama
    report = audit_privacy(model, tokenizer, demo_examples, PrivacySettings(), 1, 4, FAST)
    identity, searched = report.result(GRADIENT_LABELS), report.result(GRADIENT_SEARCH)
    assert searched.total == identity.total
    assert searched.recovered >= identity.recovered, report.table()
    assert searched.rate > MOST, report.table()


def test_the_strong_audit_runs_the_inversion_network_and_says_so(tiny_llama, demo_examples):
    model, tokenizer = tiny_llama
    config = AuditConfig(sample=4, max_tokens=64, candidates=8, public_tokens=2048, seed=0, strong=True,
                         strong_public_tokens=4096)
    report = audit_privacy(model, tokenizer, demo_examples, PrivacySettings(), 1, 2, config)
    assert report.strong and report.config["strong"] is True
    network = report.result(NETWORK_INVERSION)
    assert network.rate > MOST, report.table()
    assert "strong attacks not run" not in report.table() and network.title in report.table()
    assert AuditReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
