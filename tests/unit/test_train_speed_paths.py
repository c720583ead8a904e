"""The training loop's fast paths give the loss and gradients of the straightforward computation: the chunked
labelled-positions loss (fedtune.lm_loss) against the model's own `labels=` loss, and the optimizer settings."""

from __future__ import annotations

import pytest
import torch

from fedtune import lm_loss
from fedtune.train import causal_lm_loss


@pytest.fixture
def lora_model(tiny_model):
    """The tiny model wrapped in a LoRA with non-zero B, so every LoRA factor gets a gradient."""
    from peft import LoraConfig, get_peft_model

    from fedtune import models

    torch.manual_seed(0)
    return get_peft_model(models.load_base_model(str(tiny_model)),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _batch(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 15:] = -100
    labels[2] = -100  # a row with nothing to learn
    return ids, labels


def _lora_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_chunked_loss_and_gradients_equal_the_models_own(lora_model, monkeypatch, chunk):
    model = lora_model
    ids, labels = _batch(model)
    reference = model(input_ids=ids, labels=labels).loss
    want = _lora_grads(model, reference)
    if chunk is not None:  # several chunks, one position each, or a last chunk shorter than the rest
        monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", chunk * model.config.vocab_size)
    ours = causal_lm_loss(model, ids, labels)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    got = _lora_grads(model, ours)
    assert got.keys() == want.keys() and len(got) == 8
    for name in want:
        assert want[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_a_share_of_a_batch_divides_by_the_whole_batchs_labelled_positions(lora_model):
    """In a group each process's share sums its positions' losses over the whole batch's count."""
    model = lora_model
    ids, labels = _batch(model, seed=1)
    count = int((labels[:, 1:] != -100).sum())
    whole = causal_lm_loss(model, ids, labels)
    shares = causal_lm_loss(model, ids[:1], labels[:1], count) + causal_lm_loss(model, ids[1:], labels[1:], count)
    assert shares.item() == pytest.approx(whole.item(), rel=1e-6)


def test_a_batch_without_labels_has_zero_loss_and_zero_gradients(lora_model):
    model = lora_model
    ids, labels = _batch(model)
    loss = causal_lm_loss(model, ids, torch.full_like(labels, -100))
    assert loss.item() == 0.0
    grads = _lora_grads(model, loss)
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_cross_entropy_matches_autograd_for_hidden_weight_and_bias(chunk):
    """The head's weight and bias gradients too (a head that trains), against torch's own cross-entropy."""
    torch.manual_seed(2)
    hidden = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (10,))
    ours = lm_loss._ChunkedCrossEntropy.apply(hidden, weight, bias, target, chunk) * 0.37
    mine = torch.autograd.grad(ours, (hidden, weight, bias))
    theirs = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, target, reduction="sum") * 0.37
    want = torch.autograd.grad(theirs, (hidden, weight, bias))
    torch.testing.assert_close(ours, theirs.float())
    for got, expected in zip(mine, want):
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_without_gradients_only_the_loss_is_computed(lora_model):
    model = lora_model
    ids, labels = _batch(model)
    with torch.no_grad():
        loss = causal_lm_loss(model, ids, labels)
        reference = model(input_ids=ids, labels=labels).loss
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
