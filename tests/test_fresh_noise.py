"""Noise is never drawn twice: each evaluation and each generation request blurs the hidden states the trunk
receives with a draw of its own. Captured on the wire by a recording proxy in front of a real trunk server."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitcore import LoraSettings
from splitcore.data.formats import load_dataset_file
from splitcore.generation.local import GenerationSettings, encode_prompt
from splitcore.generation.split import SplitGenerator
from splitcore.privacy import ChannelNoise, ClientSecret, PrivacySettings
from splitcore.remote.client import TrunkClient
from splitcore.training import SplitEngine, SplitTrainer, TrainConfig
from splitcore.training.batches import prepare_training_data

SEED = 11
# |correlation| of two independent Gaussian draws of ~1000 values stays far below this.
INDEPENDENT = 0.2


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def relative_noise(sent: torch.Tensor, clean: torch.Tensor) -> float:
    """The mean norm of the noise per position over the median norm of the clean positions."""
    noise_norms = (sent - clean).float().norm(dim=-1)  # (batch, seq)
    return float(noise_norms.mean() / clean.float().norm(dim=-1).median())


def test_each_evaluation_draws_noise_of_its_own_never_a_training_steps(tiny_dirs, proxied_trunk,  # noqa: F811
                                                                       tmp_path):
    proxy, address, token = proxied_trunk
    data_path = tmp_path / "data.jsonl"
    data_path.write_text("".join(json.dumps({"text": f"note {i} that the owner keeps to themselves"}) + "\n"
                                 for i in range(8)))
    # No gradient to the trunk: the Bottom stays as it starts, so what the evaluations send differs by noise only.
    config = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), train_trunk_lora=False, max_steps=2,
                         batch_size=2, seq_len=24, seed=SEED, val_fraction=0.25, eval_every=1,
                         privacy=PrivacySettings(hidden_noise=0.5, gradients_to_trunk=False))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    data = prepare_training_data(tokenizer, load_dataset_file(data_path).examples, config)
    with TrunkClient(address, token) as client:
        engine = SplitEngine(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), config, client,
                             secret=ClientSecret.generate())
        trainer = SplitTrainer(engine, config, data, tokenizer.pad_token_id)
        trainer.run()
        engine.close()
    assert len(trainer.val_batches) == 1
    batch = trainer.val_batches[0]
    mask = batch.attention_mask
    engine.train(False)
    with torch.no_grad():
        clean = engine.bottom(batch.input_ids, mask)  # (batch, seq, hidden): what the Bottom computes

    evaluations = [values for request, values in proxy.hidden_states() if request.evaluate]
    assert len(evaluations) == 2, "one evaluation after each step"
    after_step_1, after_step_2 = evaluations
    noise = engine.noise
    assert torch.allclose(after_step_1, noise.on_eval_hidden(clean, mask, 1, 0), atol=1e-5)
    assert torch.allclose(after_step_2, noise.on_eval_hidden(clean, mask, 2, 0), atol=1e-5)
    # Really blurred, at the configured size, and independently each time.
    assert 0.35 < relative_noise(after_step_1, clean) < 0.65
    assert abs(correlation(after_step_1 - clean, after_step_2 - clean)) < INDEPENDENT
    # Not step 0's training draw (which the evaluations used to reuse), nor a training step's.
    for step in (0, 1):
        training = noise.on_hidden(clean, mask, step, 0)
        assert abs(correlation(after_step_1 - clean, training - clean)) < INDEPENDENT


def test_a_generation_blurs_what_it_sends_with_a_fresh_draw_per_request(tiny_dirs, proxied_trunk):  # noqa: F811
    proxy, address, token = proxied_trunk
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    input_ids = encode_prompt(tokenizer, "Q: what is 4 plus 4?\nA:", chat=False)  # (1, prompt)
    settings = GenerationSettings(max_new_tokens=4)
    key = ClientSecret.generate()

    def generate(noise: ChannelNoise | None) -> tuple[list[int], list[torch.Tensor], SplitGenerator]:
        with TrunkClient(address, token) as client:
            generator = SplitGenerator.from_directory(tiny_dirs["llama"], client)
            tokens = list(generator.generate(input_ids, tokenizer, settings, noise))
        sent = [values for _, values in proxy.hidden_states()]
        proxy.clear()
        return tokens, sent, generator

    def request_noise() -> ChannelNoise:
        return ChannelNoise(key.with_nonce(ClientSecret.fresh_nonce()), seed=SEED, hidden_scale=1.0)

    clean_tokens, clean_sent, generator = generate(None)
    first_tokens, first_sent, _ = generate(request_noise())
    second_tokens, second_sent, _ = generate(request_noise())

    def bottom_outputs(tokens: list[int]) -> torch.Tensor:
        """The Bottom's output at every position of the prompt and the tokens fed back, in one pass."""
        ids = torch.cat([input_ids, torch.tensor([tokens[:-1]])], dim=1)  # (1, prompt + new - 1)
        with torch.no_grad():
            return generator.bottom(ids, torch.ones_like(ids))  # (1, seq, hidden)

    prompt_length = input_ids.shape[1]
    for tokens, sent, blurred in ((clean_tokens, clean_sent, False), (first_tokens, first_sent, True),
                                  (second_tokens, second_sent, True)):
        assert len(sent) == len(tokens) == settings.max_new_tokens, "the prompt, then one Forward per token"
        expected = bottom_outputs(tokens)
        pieces = [expected[:, :prompt_length]] + [expected[:, i:i + 1]
                                                   for i in range(prompt_length, expected.shape[1])]
        for position, (received, clean) in enumerate(zip(sent, pieces, strict=True)):
            assert received.shape == clean.shape
            if blurred:  # the prompt and every new token, each at about its own norm
                assert 0.5 < relative_noise(received, clean) < 1.5, position
            else:
                assert torch.allclose(received, clean, atol=1e-4), position
    # Two requests for the same prompt: independent draws on the prompt's hidden states.
    assert abs(correlation(first_sent[0] - clean_sent[0], second_sent[0] - clean_sent[0])) < INDEPENDENT
