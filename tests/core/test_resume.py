"""Full-state resume: AdamW restored bit-exactly continues with the same next loss."""

from __future__ import annotations

import torch

from weightstore.client import Client


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_adamw_resume_is_bit_exact(server, keys):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)) for _ in range(6)]
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for x, y in batches[:3]:
        _step(model, opt, x, y)

    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-mlp", lora_rank=4)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = c.save_state(run["run_id"], "step-3", weights, opt, adapter_config={"r": 4, "lora_alpha": 4})
    uninterrupted = [_step(model, opt, x, y) for x, y in batches[3:]]

    restored_w, restored_opt = c.load_state(path)
    assert set(restored_w) == set(weights) and all(torch.equal(restored_w[k], weights[k]) for k in weights)
    model2 = _model()
    model2.load_state_dict(restored_w)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=123.0)  # hyperparameters come from the checkpoint
    opt2.load_state_dict(restored_opt)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99) and opt2.param_groups[0]["lr"] == 1e-2
    resumed = [_step(model2, opt2, x, y) for x, y in batches[3:]]
    assert resumed == uninterrupted  # exact float equality, every step
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)
