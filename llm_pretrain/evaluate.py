"""Validation perplexity over a fixed, materialised evaluation set.

``compat="none"``: ppl = exp(sum of token losses / number of tokens), summed over all ranks.
``compat="galore"``: the GaLore/APOLLO scripts' estimator, kept to compare with paper numbers:
each rank averages *per-batch mean* losses and divides by ``n + 1`` (the counter starts at 1,
GaLore#77), then ranks are averaged. It is biased low (by ~0.5-1% in loss at ~100-200 batches,
2-4% in ppl at ppl 30), more so with fewer batches; never mix the two in one table.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from llm_pretrain import distributed
from llm_pretrain.model import IGNORE_INDEX


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    compat: str = "none",
    autocast: torch.autocast | None = None,
    lockstep: bool = False,
) -> dict[str, float]:
    """``lockstep``: every rank runs the same number of forwards (FSDP2's are collectives); a
    rank out of rows runs one on a row it does not count."""
    if compat not in ("none", "galore"):
        raise ValueError(f"eval.compat={compat!r}: use none or galore")
    was_training = model.training
    model.eval()
    inputs, labels = val["input_ids"][rank::world_size], val["labels"][rank::world_size]
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    batch_means, batches = 0.0, 1  # galore: counter starts at 1
    rows = -(-val["input_ids"].shape[0] // world_size) if lockstep else inputs.shape[0]
    for i in range(0, rows, batch_size):
        if i >= inputs.shape[0]:  # (lockstep only) a forward that is not counted
            with autocast if autocast is not None else nullcontext():
                model(val["input_ids"][:1].to(device), val["labels"][:1].to(device))
            continue
        x = inputs[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device)
        with autocast if autocast is not None else nullcontext():
            s = model(x, y, reduction="sum").double().cpu()
        n = float((y[:, 1:] != IGNORE_INDEX).sum())
        loss_sum += s
        tokens += n
        batch_means += float(s) / max(n, 1.0)
        batches += 1
    model.train(was_training)
    totals = distributed.all_reduce(torch.stack([loss_sum, tokens]).to(device)).cpu()
    if compat == "galore":
        per_rank = torch.tensor([batch_means / batches], dtype=torch.float64, device=device)
        loss = float(distributed.all_reduce(per_rank).cpu()) / world_size
    else:
        loss = float(totals[0] / totals[1])
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(totals[1])}
