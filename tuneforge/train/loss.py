"""The loss: cross-entropy on answer tokens only, without ever building the [tokens, vocab] logits tensor.

The model body gives hidden states for every position; only positions whose next token is a target matter. We gather
those rows, then run the output projection and cross-entropy in chunks. The gradient of a summed cross-entropy with
respect to the logits is `softmax - onehot`, which we compute in the same pass as the loss, so backward needs no
second projection and no stored logits: per chunk, one matmul for logits and one (two when the head itself trains)
for the gradients. Peak extra memory is one chunk of logits.

Gemma 2/3 cap the head's logits (`final_logit_softcapping` c: logits = c * tanh(z / c)); the gradient then gains the
factor 1 - tanh^2(z / c), applied in the same pass.
"""

from __future__ import annotations

import torch

# Logits per chunk: ~64 MB of fp32 whatever the vocabulary size.
CHUNK_ELEMENTS = 16 * 1024 * 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, softcap):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax in at least fp32, even under bf16
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            logits = (h @ weight.t()).to(acc)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            loss_sum += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden_grad or need_weight_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(sum CE)/d(logits)
                if softcap is not None:  # chain rule through c * tanh(z / c)
                    probs.mul_(1.0 - capped * capped)
                probs = probs.to(h.dtype)
                if need_hidden_grad:
                    grad_hidden[start : start + chunk_rows] = probs @ weight
                if need_weight_grad:
                    grad_weight += (probs.t() @ h).to(acc)
        # Intermediate results, not inputs: kept on ctx (no double backward through this function).
        ctx.grad_hidden, ctx.grad_weight, ctx.weight_dtype = grad_hidden, grad_weight, weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        dh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None


def answer_token_loss_sum(
    hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of cross-entropy over `targets` given the matching rows of `hidden` ([N, d]) and head weight [V, d];
    `softcap`: the model's final logit softcapping, if it has one."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph connected for an empty micro-batch
    if chunk_rows is None:
        chunk_rows = max(16, CHUNK_ELEMENTS // head_weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, head_weight, targets, chunk_rows, softcap)


def naive_loss_sum(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None = None) -> torch.Tensor:
    """Reference implementation (full logits); used by tests to check the chunked one."""
    logits = (hidden @ head_weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")



def _chunk_logp(h, weight, t, softcap, acc, with_gradient: bool):
    """log p(t) of one chunk's rows and, when asked, d(-log p)/d(logits) = softmax - onehot (through the softcap)."""
    logits = (h @ weight.t()).to(acc)
    capped = None
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, t[:, None]).squeeze(1) - lse
    if not with_gradient:
        return logp, None
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(t), device=t.device), t] -= 1.0
    if capped is not None:
        probs.mul_(1.0 - capped * capped)
    return logp, probs


class _ChunkedTargetLogProbs(torch.autograd.Function):
    """log p(target) for each row ([N]), chunked like the loss above; backward takes one gradient per row.

    Preference objectives are not linear in the per-token terms (DPO's sigmoid of a difference of sums), so the
    gradient cannot be folded in during the forward as the cross-entropy's is. What can: d logp / d hidden for each
    row, (onehot - softmax) @ W, the size of `hidden`; backward only scales it by each row's incoming gradient. The
    head's own gradient (full fine-tuning) needs that scale inside the vocabulary sum, so backward recomputes those
    chunks' logits: one extra head matmul, only when the head trains."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, softcap):
        need_hidden_grad = ctx.needs_input_grad[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        logps = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        dlogp_dhidden = torch.empty_like(hidden) if need_hidden_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logps[rows], minus_dlogits = _chunk_logp(hidden[rows], weight, targets[rows], softcap, acc,
                                                     need_hidden_grad)
            if need_hidden_grad:
                dlogp_dhidden[rows] = -(minus_dlogits.to(hidden.dtype) @ weight)
        ctx.dlogp_dhidden, ctx.chunk_rows, ctx.softcap = dlogp_dhidden, chunk_rows, softcap
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(hidden, weight, targets)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        dh = None
        if ctx.dlogp_dhidden is not None:
            dh = ctx.dlogp_dhidden * grad_logps[:, None].to(ctx.dlogp_dhidden.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            hidden, weight, targets = ctx.saved_tensors
            acc = torch.promote_types(hidden.dtype, torch.float32)
            dw = torch.zeros_like(weight, dtype=acc)
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                _, minus_dlogits = _chunk_logp(hidden[rows], weight, targets[rows], ctx.softcap, acc, True)
                scaled = (minus_dlogits * -grad_logps[rows, None].to(acc)).to(hidden.dtype)
                dw += (scaled.t() @ hidden[rows]).to(acc)
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None


def target_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                    chunk_rows: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for every row ([N]), never holding more than one chunk of logits."""
    if chunk_rows is None:
        chunk_rows = max(16, CHUNK_ELEMENTS // head_weight.shape[0])
    return _ChunkedTargetLogProbs.apply(hidden, head_weight, targets, chunk_rows, softcap)
