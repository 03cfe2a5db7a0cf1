"""Llama-style layers (GQA, SwiGLU), the chunked head loss and activation checkpointing,
each checked against the plain computation on CPU (real torch, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tplr.train.config import ModelConfig
from tplr.train.model.gpt import GPT, count_parameters
from tplr.train.model.loss import IGNORE_INDEX, auto_chunk_tokens, head_cross_entropy

VOCAB = 200


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def llama_tiny(**overrides) -> ModelConfig:
    values = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "ffn_hidden": 96}
    values.update(overrides)
    return ModelConfig.preset("llama-1b", vocab_size=VOCAB, max_seq_len=32, **values)


def grads_of(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(idx, targets).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_llama_presets_have_the_published_sizes():
    expected = {"llama-1b": 1.2358e9, "llama-3b": 3.2127e9, "llama-8b": 8.0303e9}
    for name, size in expected.items():
        config = ModelConfig.preset(name, vocab_size=ModelConfig.default_vocab_size(name))
        assert config.kv_heads == 8 and config.activation == "swiglu" and not config.qk_norm
        with torch.device("meta"):
            assert count_parameters(GPT(config)) == pytest.approx(size, rel=1e-4), name
    assert ModelConfig.default_vocab_size("llama-8b") == 128256
    assert ModelConfig.default_vocab_size("gpt2") == 50257


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """K = 2 key/value heads shared by 4 query heads == 4 heads with each k/v repeated."""
    torch.manual_seed(0)
    gqa = GPT(llama_tiny()).eval()
    full = GPT(llama_tiny(n_kv_head=4)).eval()
    with torch.no_grad():
        for g_block, f_block in zip(gqa.blocks, full.blocks, strict=True):
            q, k, v = g_block.attn.qkv.weight.split((64, 32, 32))
            repeat = [w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64) for w in (k, v)]
            f_block.attn.qkv.weight.copy_(torch.cat([q, *repeat]))
            for name in ("attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"):
                f_block.get_parameter(name).copy_(g_block.get_parameter(name))
        full.embed.weight.copy_(gqa.embed.weight)
    idx = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(gqa.logits(idx), full.logits(idx), rtol=1e-5, atol=1e-5)


def test_swiglu_block_trains():
    model = GPT(llama_tiny())
    assert model.blocks[0].mlp.fc.weight.shape == (2 * 96, 64)
    idx = torch.randint(0, VOCAB, (2, 16))
    grads = grads_of(model, idx, idx)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_head_loss_equals_full_logits(reduction):
    torch.manual_seed(1)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (37,))
    targets[[3, 20, 36]] = IGNORE_INDEX  # padding of a fixed-shape batch
    plain = F.cross_entropy(
        F.linear(hidden, weight), targets, ignore_index=IGNORE_INDEX, reduction=reduction
    )
    plain.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = head_cross_entropy(hidden, weight, targets, chunk_tokens=8, reduction=reduction)
    (2.0 * chunked).backward()  # the stored gradients are scaled by the incoming one
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, 2.0 * expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2.0 * expected[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        again = head_cross_entropy(hidden, weight, targets, chunk_tokens=8, reduction=reduction)
    torch.testing.assert_close(again, plain.detach(), rtol=1e-5, atol=1e-5)


def test_chunked_loss_under_bf16_autocast_and_tied_embeddings():
    torch.manual_seed(2)
    model = GPT(llama_tiny(tie_embeddings=True))
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = grads_of(model, idx, idx)
        model.loss_chunk_tokens = 16
        chunked = grads_of(model, idx, idx)
    for name, grad in plain.items():
        torch.testing.assert_close(chunked[name], grad, rtol=0.05, atol=2e-3, msg=name)


def test_auto_chunking_only_for_large_logits():
    assert auto_chunk_tokens(2048, 50304, None) is None  # 0.4 GB of fp32 logits: one piece
    assert auto_chunk_tokens(16 * 1024, 50304, None) == 1280  # 3.3 GB: chunks of 0.26 GB
    chunk = auto_chunk_tokens(8192, 128256, None)
    assert chunk is not None and chunk % 64 == 0 and chunk * 128256 * 4 <= 256 << 20
    assert auto_chunk_tokens(8192, 128256, 0) is None
    assert auto_chunk_tokens(8192, 128256, 1024) == 1024


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(3)
    model = GPT(llama_tiny())
    idx = torch.randint(0, VOCAB, (2, 32))
    reference = grads_of(model, idx, idx)
    model.set_checkpointing(mode)
    checkpointed = grads_of(model, idx, idx)
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
