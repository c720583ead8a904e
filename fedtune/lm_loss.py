"""The training loss: next-token cross-entropy over the labelled positions, computed a chunk of positions at a time.

The straightforward way (models.labelled_logits, then cross_entropy) holds the float32 logits of every labelled
position over the whole vocabulary, [n, vocab], and autograd keeps them and their log-softmax for the backward pass,
passing over them four or five times. Here each chunk's logits are made, turned into the chunk's loss and into the
gradient with respect to the hidden states (softmax − one-hot, projected back through the head) in the same pass,
and dropped: the backward pass only scales the stored [n, hidden] gradient. The loss and its gradients are the same
as the straightforward way's, to float rounding (tests/unit/test_train_speed_paths.py).
"""

from __future__ import annotations

import torch

from fedtune import models

# Positions × vocabulary entries of float32 logits held at once (128 MiB): a few hundred positions of a 100k-token
# vocabulary, a few thousand of a 32k one.
CHUNK_ELEMENTS = 1 << 25


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `target`, with its gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk: int):
        wants = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], target[start:start + chunk]
            # Under autocast the projection runs in its lower precision, as the model's own head would.
            logits = torch.nn.functional.linear(h, weight, bias).float()
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not any(wants):
                continue
            # d(loss)/d(logits) = softmax − one-hot, made in place in the logits' own memory.
            grad = logits.sub_(norm[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            if wants[0]:
                grad_hidden[start:start + chunk] = grad.to(weight.dtype) @ weight
            if wants[1]:
                grad_weight += grad.T @ h.float()
            if wants[2]:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.wants = wants
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (next(saved) * grad_output if want else None for want in ctx.wants)
        return grad_hidden, grad_weight, grad_bias, None, None


def labelled_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions (float32), and how many there are.

    Plain-head models (models.PLAIN_HEAD_MODELS) take the chunked path; others the model's full logits.
    """
    plain = models.labelled_hidden(model, input_ids, labels)
    if plain is None:
        logits, target = models.labelled_logits(model, input_ids, labels)
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum"), target.numel()
    hidden, target, head = plain
    if target.numel() == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph: backward still runs, with zero gradients
    chunk = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, target, chunk), target.numel()
