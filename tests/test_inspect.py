"""``fxprune.inspect`` (issue 5): summary, networkx, DOT, self-contained HTML, explain."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from fxprune.models_zoo.toy import ResidualNet, SENet

import fxprune


class Unruled(nn.Module):
    """torch.cumsum over channels has no rule: its channels must be pinned, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cumsum(self.b(self.a(x)), 1))


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_summary_groups_flops_share_and_pins() -> None:
    model = ResidualNet().eval()
    ins = fxprune.inspect(model, X)
    dep = fxprune.dependency_graph(model, X)
    assert [g.size for g in ins.groups] == [g.size for g in dep.groups]
    text = str(ins)
    assert f"{len(ins.groups)} channel groups" in text
    assert "PINNED: reaches the graph output" in text
    # FLOPs share: the node FLOPs that scale with a group, over the total (a conv scales with in and out)
    assert all(0.0 <= s <= 1.0 for s in ins.flops_share.values())
    assert sum(ins.flops_share.values()) > 1.0  # shares overlap by construction
    assert ins.total_flops == fxprune.count_flops(model, (X,))


def test_explain_pinned_and_coupled() -> None:
    model = Unruled().eval()
    ins = fxprune.inspect(model, X)
    text = ins.explain("b")
    assert "PINNED" in text and "no rule for" in text and "cumsum" in text
    assert ins.explain(model.b) == text  # a module instance works like its name
    res = fxprune.inspect(ResidualNet().eval(), X)
    coupled = [g for g in res.groups if len(g.producers) > 1]
    assert coupled
    e = res.explain(coupled[0].id)
    assert "coupled" in e and "joined at" in e and "add" in e
    with pytest.raises(fxprune.InputError, match="neither a traced module nor a graph node"):
        res.explain("no_such_layer")
    with pytest.raises(fxprune.InputError, match="not a submodule"):
        res.explain(nn.Conv2d(1, 1, 1))


def test_networkx_dot_json_match_the_graph() -> None:
    ins = fxprune.inspect(SENet().eval(), X)
    g = ins.to_networkx()
    assert set(g.nodes) == set(ins.nodes)
    assert g.number_of_edges() == sum(len(i.inputs) for i in ins.nodes.values())
    dot = ins.to_dot()
    assert dot.count(" -> ") == g.number_of_edges()
    # every group its own colour: nodes of different output groups get different fill colours
    fills = {}
    for name, info in ins.nodes.items():
        if info.groups:
            m = re.search(rf'"{re.escape(name)}" \[.*?fillcolor="(#[0-9a-f]{{6}})"', dot)
            assert m is not None
            fills.setdefault(info.groups[0], set()).add(m.group(1))
    assert all(len(c) == 1 for c in fills.values())
    assert len({next(iter(c)) for c in fills.values()}) == len(fills)
    data = ins.to_dict()
    assert [d["id"] for d in data["groups"]] == [gr.id for gr in ins.groups]


def test_html_is_self_contained_with_details_per_node(tmp_path: Path) -> None:
    ins = fxprune.inspect(ResidualNet().eval(), X)
    page = ins.to_html()
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    assert page.count('class="node') == len(ins.nodes)
    assert page.count("<title>") >= len(ins.nodes)  # hover tooltips
    for g in ins.groups:
        assert f'data-group="{g.id}"' in page
    ins.write(str(tmp_path / "v.html"))
    assert (tmp_path / "v.html").read_text() == page


def _bench_module() -> object:
    path = Path(__file__).resolve().parents[1] / "bench" / "inspect_view.py"
    spec = importlib.util.spec_from_file_location("inspect_view", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["inspect_view"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_html_view_renders_in_headless_chromium(tmp_path: Path) -> None:
    view = _bench_module()
    if view.find_chromium() is None:  # type: ignore[attr-defined]
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    ins = fxprune.inspect(ResidualNet().eval(), X)
    html, png = tmp_path / "v.html", tmp_path / "v.png"
    ins.write(str(html))
    view.screenshot(html, png, size="800,600")  # type: ignore[attr-defined]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a rendered page, not a blank one
    # the page's own script: clicking a node (through #node=NAME) fills the side panel with its group,
    # FLOPs and explanation, as Chromium renders it
    node = next(n for n, i in ins.nodes.items() if i.module_type == "Conv2d" and i.groups)
    panel = view.clicked_panel(html, node)  # type: ignore[attr-defined]
    assert panel.startswith(f"{node}: call_module Conv2d"), panel
    assert (
        f"group {ins.nodes[node].groups[0]}:" in panel
        and "FLOPs" in panel
        and "consumers (input columns cut)" in panel
    )


def test_explain_names_layer_norms_that_renormalise() -> None:
    class LN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.norm, self.fc = nn.Conv2d(3, 8, 1), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.a(x).permute(0, 2, 3, 1)))

    ins = fxprune.inspect(LN().eval(), X)
    text = ins.explain("a")
    assert "statistics over these channels" in text and "norm" in text.split("statistics")[1]


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, torch.Tensor, fxprune.Inspection]:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return model, x, fxprune.inspect(model, x)


def test_flops_share_column_says_what_it_is_and_matches_torchs_counter(
    resnet18: tuple[nn.Module, torch.Tensor, fxprune.Inspection],
) -> None:
    """Issue 12: the column summed to ~193% with no word on why. The header now defines it: the share of the
    model's FLOPs in ops whose cost scales with the group. Reference: torch's FlopCounterMode per module, over
    the convs/linears whose weight rows or columns the group selects (no fxprune cost metadata)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x, ins = resnet18
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    per_module = {k.split(".", 1)[1]: sum(v.values()) for k, v in counts.items() if "." in k}
    text = ins.summary()
    assert "FLOPs%: share of the model's FLOPs in ops whose cost scales with the group's channels" in text
    assert "a conv counts for its input and its output group" in text
    rows = {int(ln.split()[0]): ln.split() for ln in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s", ln)}
    ref = {}
    for g in ins.groups:
        mods = {s.param.rpartition(".")[0] for s in g.sites if s.role in ("in", "out")}
        ref[g.id] = sum(per_module[m] for m in mods) / total
        assert ins.flops_share[g.id] == pytest.approx(ref[g.id], rel=1e-9, abs=1e-12), g.id
        assert rows[g.id][2] == f"{100 * ref[g.id]:.1f}%", rows[g.id]
    assert 1.8 < sum(ref.values()) < 2.0  # overlapping shares, as the header says
    assert f"column sums to {100 * sum(ref.values()):.1f}% here, not 100%" in text
    assert "of FLOPs scale with it" in ins.to_html()  # the page's legend says the same


def test_explain_names_modules_by_qualified_name_and_accepts_both_names(
    resnet18: tuple[nn.Module, torch.Tensor, fxprune.Inspection],
) -> None:
    """Issue 12: explain mixed fx node names (layer1_0_conv1) and qualified names (layer1.0.conv1)."""
    model, _, ins = resnet18
    text = ins.explain("layer1.0.conv1")
    assert text == ins.explain("layer1_0_conv1") == ins.explain(model.layer1[0].conv1)
    assert text.splitlines()[0] == "module 'layer1.0.conv1' (Conv2d; fx node 'layer1_0_conv1')"
    modules = {n for n, _ in model.named_modules()}
    body = "\n".join(
        "\n".join(ins.explain(w).splitlines()[1:])
        for w in ("layer1.0.conv1", "layer4.1.conv1", "fc", "add_3", 0)
    )
    for name, info in ins.nodes.items():  # no module call is named by its node name below the title
        if info.op == "call_module" and name != info.target:
            assert not re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", body), name
    listed = re.findall(r"(?:produced by|consumers \(input columns cut\)|coupled: .*?channels): (.*)", body)
    names = {n.strip() for line in listed for n in line.split(";")[0].split(", ")}
    assert names and names <= modules, names - modules
    assert "produced by: layer1.0.conv1" in body and "conv1, layer1.0.conv2, layer1.1.conv2" in body
    assert "joined at add (operator.add), add_1 (operator.add)" in body  # non-module nodes: fx node names
    assert ins.explain("add").splitlines()[0] == "node 'add' (call_function operator.add)"
    assert ins.explain("fc").splitlines()[0] == "module 'fc' (Linear)"  # one name: nothing in brackets
    # a module called twice: its qualified name is its first call; the node name picks either call
    assert ins.explain("layer1.0.relu").splitlines()[0] == (
        "module 'layer1.0.relu' (ReLU; fx node 'layer1_0_relu', call 1 of 2)"
    )
    assert ins.explain("layer1_0_relu_1").splitlines()[0] == (
        "module 'layer1.0.relu' (ReLU; fx node 'layer1_0_relu_1', call 2 of 2)"
    )
    with pytest.raises(fxprune.InputError, match="'layer1' is a module of the model but no single traced op"):
        ins.explain("layer1")


def test_cli_explain_takes_either_name(capsys: pytest.CaptureFixture[str]) -> None:
    from fxprune.cli import main

    argv = ["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32"]
    assert main([*argv, "--explain", "layer1.0.conv1", "--explain", "layer1_0_conv1", "--explain", "1"]) == 0
    out = capsys.readouterr().out.split("\n\n")
    assert out[-3] == out[-2] and out[-3].startswith(
        "module 'layer1.0.conv1' (Conv2d; fx node 'layer1_0_conv1')"
    )
    assert out[-1].startswith("group 1: 64 channels") and "produced by: layer1.0.conv1" in out[-1]


def test_explain_a_module_called_twice_and_a_top_level_parameter() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.c(self.b(y) + self.b(y * self.scale))

    ins = fxprune.inspect(Shared().eval(), X)
    text = ins.explain("b")
    assert text.splitlines()[0] == "module 'b' (Conv2d, call 1 of 2)"
    assert (
        "producers must keep the same channels: b (node b), b (node b_1); joined at add (operator.add)"
        in text
    )
    assert "consumers (input columns cut): b (node b), b (node b_1)" in text
    assert "norms sliced: scale" in text  # a top-level parameter is named, not left blank
    assert ins.explain("b_1").splitlines()[0] == "module 'b' (Conv2d; fx node 'b_1', call 2 of 2)"
