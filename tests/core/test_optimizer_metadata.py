"""Optimizer metadata (issue 11, item 9): ``param_names[i]`` names optimizer parameter ``i``.

The optimizer numbers its parameters in ``param_groups[*]["params"]`` order, group after group;
names sorted as text put ``layers.10`` before ``layers.2`` (and ``bias`` before ``weight``), so
anyone remapping optimizer state by name got the wrong tensors. The class test runs ``save_state``
over 1..25 layers and several ways of passing the model.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from weightstore import tensorio
from weightstore.client import Client
from weightstore.formats import OPTIMIZER_STATE


class Stack(torch.nn.Module):
    """``layers.{i}.proj.{weight,bias}``: names whose text order differs from model order past 10 layers."""

    def __init__(self, layers: int, width: int = 3) -> None:
        super().__init__()
        torch.manual_seed(layers)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(width, width)}) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["proj"](x))
        return x


def _trained(layers: int, grouping: str) -> tuple[Stack, torch.optim.Optimizer]:
    model = Stack(layers)
    named = list(model.named_parameters())
    if grouping == "one-group":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    elif grouping == "bias-group-first":  # index order is neither model order nor text order
        biases = [p for n, p in named if n.endswith("bias")]
        weights = [p for n, p in named if n.endswith("weight")]
        opt = torch.optim.AdamW([{"params": biases, "weight_decay": 0.0}, {"params": weights}], lr=1e-2)
    else:  # "reversed"
        opt = torch.optim.AdamW([p for _, p in reversed(named)], lr=1e-2)
    model(torch.randn(4, 3, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    return model, opt


def _saved_optimizer_file(c: Client, monkeypatch: pytest.MonkeyPatch, *args: Any, **kw: Any) -> bytes:
    """What ``save_state`` would upload (no server: ``upload`` is replaced by a capture)."""
    captured: dict[str, Any] = {}

    def upload(run_id: str, kind: str, name: str, files: dict[str, Any], **_: Any) -> dict[str, Any]:
        captured.update(files)
        return {"tinker_path": f"tinker://{run_id}/weights/{name}"}

    monkeypatch.setattr(c, "upload", upload)
    c.save_state("run", "step", *args, adapter_config={"r": 1, "lora_alpha": 1}, **kw)
    return bytes(captured[OPTIMIZER_STATE])


def _index_order(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """The truth, by identity: name of the parameter at each optimizer index."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("grouping", ["one-group", "bias-group-first", "reversed"])
@pytest.mark.parametrize("layers", range(1, 26))
def test_param_names_follow_optimizer_index_order(layers, grouping, monkeypatch):
    """issue 11, item 9 (class test): for every layer count and parameter grouping, name ``i`` is the
    name of optimizer parameter ``i``, and the state at index ``i`` has that parameter's shape."""
    model, opt = _trained(layers, grouping)
    expected = _index_order(opt, model)
    c = Client("http://127.0.0.1:9", "k", hash_cache=False)
    data = _saved_optimizer_file(c, monkeypatch, model.state_dict(), opt)  # views of the parameters
    names = tensorio.optimizer_param_names(data)
    assert names == expected
    params = dict(model.named_parameters())
    state = tensorio.load_optimizer(data)["state"]
    assert all(state[i]["exp_avg"].shape == params[name].shape for i, name in enumerate(names))
    assert all(torch.equal(state[i]["exp_avg"], opt.state[params[name]]["exp_avg"]) for i, name in enumerate(names))


def test_names_come_from_the_model_or_the_optimizer_when_weights_are_copies(monkeypatch):
    """Copies of the weights cannot be matched (values are never compared): with ``model=`` the
    names come by identity; an optimizer built from ``named_parameters()`` names them itself; with
    neither, no names are written rather than wrong ones."""
    model, opt = _trained(12, "bias-group-first")
    copies = {k: v.clone() for k, v in model.state_dict().items()}
    c = Client("http://127.0.0.1:9", "k", hash_cache=False)
    assert tensorio.optimizer_param_names(_saved_optimizer_file(c, monkeypatch, copies, opt)) == []
    with_model = _saved_optimizer_file(c, monkeypatch, copies, opt, model=model)
    assert tensorio.optimizer_param_names(with_model) == _index_order(opt, model)

    named_opt = torch.optim.AdamW(reversed(list(model.named_parameters())), lr=1e-3)
    from_dict = _saved_optimizer_file(c, monkeypatch, copies, named_opt.state_dict())  # a plain state dict
    assert tensorio.optimizer_param_names(from_dict) == [n for n, _ in reversed(list(model.named_parameters()))]

    with pytest.raises(ValueError, match="not parameters of the model"):
        _saved_optimizer_file(c, monkeypatch, copies, opt, model=Stack(12))


def test_a_names_list_that_does_not_line_up_is_refused():
    _, opt = _trained(3, "one-group")
    with pytest.raises(ValueError, match="5 names for 6 optimizer parameters"):
        tensorio.optimizer_bytes(opt.state_dict(), param_names=["a", "b", "c", "d", "e"])


def test_legacy_text_sorted_names_are_not_read_as_a_mapping():
    """Files written before the fix carry sorted names without ``param_names_order``: the reader
    does not hand them out as positional (unless the param groups name the parameters)."""
    model, opt = _trained(12, "one-group")
    data = tensorio.optimizer_bytes(opt.state_dict())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].pop("param_names_order", None)
    header["__metadata__"]["param_names"] = json.dumps(sorted(dict(model.named_parameters())))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    legacy = len(raw).to_bytes(8, "little") + raw + data[8 + n :]
    assert tensorio.optimizer_param_names(legacy) == []
    restored = tensorio.load_optimizer(legacy)  # the state never depended on the names
    assert torch.equal(restored["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_twelve_layers_through_the_server_names_and_bit_exact_state(server, keys):
    """issue 11, item 9 end to end: save_state of a 12-layer model, names read back from the stored
    optimizer file, and load_state restores the optimizer bit-exactly (next step identical)."""
    model, opt = _trained(12, "one-group")
    c = Client(server.url, keys.trainer)
    run = c.create_run("tiny-mlp", lora_rank=1)["run_id"]
    path = c.save_state(run, "step-1", model.state_dict(), opt, adapter_config={"r": 1, "lora_alpha": 1})
    names = tensorio.optimizer_param_names(c.read_file(path, OPTIMIZER_STATE))
    assert names[8] == "layers.4.proj.weight" and names == [n for n, _ in model.named_parameters()]

    weights, opt_state = c.load_state(path)
    model2 = Stack(12)
    model2.load_state_dict(weights)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=99.0)
    assert opt_state is not None
    opt2.load_state_dict(opt_state)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))
