"""Model shape, configs, vocabulary checks, FLOPs and the peak-FLOP/s table (CPU, real torch)."""

from __future__ import annotations

import pytest
import torch

from tplr.comms.manifest import Manifest, ManifestEntry
from tplr.errors import ConfigError
from tplr.train.config import ModelConfig, TrainConfig, build_config
from tplr.train.errors import TrainConfigError, VocabMismatchError
from tplr.train.model.flops import flops_per_token, matmul_parameters, mfu, peak_flops_for
from tplr.train.model.gpt import GPT, count_parameters
from tplr.train.model.vocab import DataVocab, check_vocab, vocab_from_manifest


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # robust on a loaded 2-core box (no OpenMP barriers)


def test_presets_match_published_sizes():
    small = ModelConfig.preset("gpt2", vocab_size=50257)
    assert small.padded_vocab_size == 50304
    with torch.device("meta"):
        assert 123e6 < count_parameters(GPT(small)) < 125.5e6  # GPT-2 small: 124M
        big = GPT(ModelConfig.preset("1b", vocab_size=50257))
    assert big.head is not None and 1.0e9 < count_parameters(big) < 1.3e9
    assert ModelConfig.preset("medium", vocab_size=50257).n_layer == 24


def test_vocab_padded_to_multiple_of_128():
    config = ModelConfig.preset("tiny", vocab_size=130)
    assert config.padded_vocab_size == 256
    model = GPT(config)
    assert model.embed.weight.shape[0] == 256


def test_config_errors_name_field_flag_and_range():
    with pytest.raises(TrainConfigError) as info:
        build_config(TrainConfig, {"micro_batch_size": 0})
    text = str(info.value)
    assert "micro_batch_size=0" in text and "--micro-batch-size" in text
    assert "greater than or equal to 1" in text
    assert isinstance(info.value, ConfigError)
    with pytest.raises(TrainConfigError, match=r"lr=-1\.0 \(flag --lr\): Input should be greater"):
        TrainConfig(lr=-1.0)  # direct construction is typed too
    with pytest.raises(TrainConfigError, match=r"warmup_steps \(20\) must not exceed"):
        TrainConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(TrainConfigError, match=r"d_model .* divisible by n_head"):
        ModelConfig.preset("tiny", vocab_size=64, n_head=3)
    with pytest.raises(TrainConfigError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge", vocab_size=64)


def test_accumulation_steps_from_global_batch():
    config = TrainConfig(micro_batch_size=4, global_batch_size=64)
    assert config.accumulation_steps(1) == 16
    assert config.accumulation_steps(8) == 2
    with pytest.raises(TrainConfigError, match="not divisible") as info:
        config.accumulation_steps(3)
    assert "--global-batch-size" in info.value.hint and "72" in info.value.hint


def test_causal_and_batch_independent():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=64, max_seq_len=16)).eval()
    idx = torch.randint(0, 64, (3, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    changed[2] = torch.randint(0, 64, (16,))
    with torch.no_grad():
        a, b = model.logits(idx), model.logits(changed)
    assert a.shape == (3, 16, 128)
    torch.testing.assert_close(a[:2, :10], b[:2, :10])  # the future does not leak backwards
    assert not torch.allclose(a[:2, 10:], b[:2, 10:])
    torch.testing.assert_close(a[:2], model.logits(idx[:2]).detach())  # rows do not interact


def test_untied_head_and_gelu_variant_train_step():
    config = ModelConfig.preset(
        "tiny", vocab_size=64, tie_embeddings=False, activation="gelu", qk_norm=False
    )
    model = GPT(config)
    idx = torch.randint(0, 64, (2, 8))
    loss = model(idx, idx)
    loss.backward()
    assert model.head is not None and model.head.weight.grad is not None
    assert model.embed.weight.data_ptr() != model.head.weight.data_ptr()


def test_vocab_check_against_manifest():
    model = ModelConfig.preset("tiny", vocab_size=50257)
    manifest = Manifest(
        files={
            "a.bin": ManifestEntry(size=10, parts=[], max_token_id=50256, vocab_size=50257),
            "b.bin": ManifestEntry(size=10, parts=[], max_token_id=100),
        }
    )
    data = vocab_from_manifest(manifest)
    assert data == DataVocab(vocab_size=50257, max_token_id=50256)
    check_vocab(model, data)
    small = ModelConfig.preset("tiny", vocab_size=50000)
    with pytest.raises(VocabMismatchError, match="token id 50256") as info:
        check_vocab(small, data, source="shards in /data")
    assert "--vocab-size" in info.value.hint and "50257" in info.value.hint
    assert isinstance(info.value, ConfigError)
    with pytest.raises(VocabMismatchError, match="vocabulary of 100000"):
        check_vocab(model, DataVocab(vocab_size=100000))
    prepared = Manifest(files={}, dataset={"tokenizer": "gpt2", "vocab_size": 50257})
    assert vocab_from_manifest(prepared) == DataVocab(vocab_size=50257)  # `shards prepare`
    assert vocab_from_manifest(Manifest()).required_vocab_size is None


def test_flops_per_token_and_mfu():
    small = ModelConfig.preset("small", vocab_size=50257)
    per_layer = 12 * 768 * 768
    assert matmul_parameters(small) == 12 * per_layer + 50304 * 768
    expected = 6 * (12 * per_layer + 50304 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(small, 1024) == expected
    assert 8.5e8 < expected < 8.9e8  # ~0.87 GFLOP per token for GPT-2 small at T=1024
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA A10") == 125e12
    assert peak_flops_for("Some Future GPU") is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None
