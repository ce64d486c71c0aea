"""Loss terms of an increment: MLM cross-entropy, distillation KL, hidden-state distance, EWC.

Pure functions. Each returns a SUM (float32 scalar) rather than a mean, so the training loop can
divide by the number of target tokens across the whole accumulation window: micro-batches with
more masked tokens then weigh more, exactly as one large batch would. Math runs in float32 even
when the logits come out of bf16 autocast. Teacher inputs are detached: the teacher is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mlm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V), targets (N,) long -> scalar: summed cross-entropy over the N positions."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """student_logits, teacher_logits (N, V) -> scalar:
    sum over positions of T^2 * KL(softmax(teacher / T) || softmax(student / T)).

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (N, V)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    return kl * (temperature * temperature)


def hidden_loss_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    attention_mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """student_hidden, teacher_hidden (B, T, H); attention_mask (B, T) (1/True = real token)
    -> scalar: sum over non-pad tokens of the mean-over-H squared error ("mse") or of
    1 - cosine similarity ("cosine")."""
    student = student_hidden.float()
    teacher = teacher_hidden.detach().float()
    if kind == "mse":
        per_token = (student - teacher).pow(2).mean(dim=-1)  # (B, T)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # (B, T)
    else:
        raise ValueError(f"hidden_loss_sum: kind must be 'mse' or 'cosine', not {kind!r} (distill.hidden_loss)")
    # where, not multiply: a pad position's distance is dropped even if it is not finite.
    return torch.where(attention_mask.bool(), per_token, 0.0).sum()


def ewc_penalty(named_params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """-> scalar weight / 2 * sum_i F_i (theta_i - theta*_i)^2 over the parameters named in both
    ``named_params`` and ``fisher`` (frozen parameters left out of ``named_params`` add nothing).

    ``anchor`` (theta*) and ``fisher`` hold tensors shaped like the parameters, on their device.
    Raises ValueError when no name matches (e.g. a "module." prefix from DDP), since that would
    silently switch the penalty off.
    """
    names = [name for name in named_params if name in fisher]
    if fisher and not names:
        example = next(iter(fisher))
        raise ValueError(f"ewc_penalty: no parameter name matches the Fisher entries (e.g. {example!r}); "
                         "pass the unwrapped model's named_parameters()")
    total = torch.zeros((), dtype=torch.float32,
                        device=next(iter(named_params.values())).device if named_params else None)
    for name in names:
        delta = named_params[name].float() - anchor[name].detach().float()
        total = total + (fisher[name].detach().float() * delta.pow(2)).sum()
    return total * (weight / 2.0)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """logits (N, V), targets (N,) -> long scalar: how many targets are among the k highest logits
    (k = 1 is accuracy; k is capped by V)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # (N, k)
    return (top == targets.unsqueeze(-1)).any(dim=-1).sum()
