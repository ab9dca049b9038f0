import math

import torch

from llm_pretrain.config import ModelConfig
from llm_pretrain.evaluate import evaluate
from llm_pretrain.model import IGNORE_INDEX, build_model


def setup():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            name="t", hidden_size=32, intermediate_size=48, num_heads=2, num_layers=1, vocab_size=50
        )
    )
    x = torch.randint(0, 50, (10, 12))
    y = x.clone()
    for i in range(10):  # ragged documents, as in the paper layout
        y[i, 3 + i % 9 :] = IGNORE_INDEX
    return model, {"input_ids": x, "labels": y}


def test_token_weighted_perplexity():
    model, val = setup()
    out = evaluate(model, val, batch_size=3, device=torch.device("cpu"))
    with torch.no_grad():
        total = sum(
            float(model(val["input_ids"][i : i + 1], val["labels"][i : i + 1], reduction="sum"))
            for i in range(10)
        )
    n = int((val["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out["tokens"] == n
    assert math.isclose(out["loss"], total / n, rel_tol=1e-6)
    assert math.isclose(out["ppl"], math.exp(total / n), rel_tol=1e-6)


def test_galore_compat_is_the_mean_of_batch_means_over_n_plus_one():
    model, val = setup()
    out = evaluate(model, val, batch_size=4, device=torch.device("cpu"), compat="galore")
    with torch.no_grad():
        means = [
            float(model(val["input_ids"][i : i + 4], val["labels"][i : i + 4]))
            for i in range(0, 10, 4)
        ]
    assert math.isclose(out["loss"], sum(means) / (len(means) + 1), rel_tol=1e-6)
    exact = evaluate(model, val, batch_size=4, device=torch.device("cpu"))
    assert out["loss"] < exact["loss"]  # biased low, as documented
