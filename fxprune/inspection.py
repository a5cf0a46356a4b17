"""``fxprune.inspect``: look at a model's channel groups before pruning it (nothing is changed).

The ``Inspection`` it returns prints a summary (groups, channel counts, FLOPs share, pinned groups with
their reasons), converts to networkx, writes Graphviz DOT, a self-contained HTML page (inline SVG and a
few lines of inline JavaScript, no network access needed) and JSON, and ``explain``s why a node's or
module's channels are coupled or pinned.

FLOPs share of a group ``g`` is ``sum(F(n) for nodes n whose cost scales with g) / F(total)``: the part of
the model's compute that shrinks when ``g`` loses channels. Shares overlap (a conv scales with its input
and its output group), so they sum to more than 100%; the summary says so above the table.

Names: ``explain`` names a module call by the module's qualified name (``layer1.0.conv1``), a parameter read
(``get_attr``) by the attribute's qualified name, and any other node (``add``, ``cat_1``) by its fx node
name; the fx node name of a module call (``layer1_0_conv1``) appears once, in the title. Both kinds of name
are accepted as input.
"""

from __future__ import annotations

import html
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from fxprune.data import META_CHANNELS, META_COST_DIMS, META_FLOPS, META_VALUE, ChannelDim, ChannelGroup
from fxprune.errors import InputError
from fxprune.passes.dependency import DependencyResult
from fxprune.stages import ANALYSE, CompileOptions, CompileState

__all__ = ["Inspection", "NodeInfo", "inspect"]

#: ops whose operands' channels are unified (the usual coupling points); used to explain couplings
_JOIN_NAMES = ("add", "sub", "mul", "div", "where", "cat", "concat", "stack", "iadd", "truediv")


@dataclass(frozen=True)
class NodeInfo:
    """One graph node as the inspector shows it."""

    name: str
    op: str
    target: str
    module_type: str | None
    shape: tuple[int, ...] | None
    flops: int
    groups: tuple[int, ...]  # groups whose channels flow through the node's output (in layout order)
    channel_dim: int | None
    inputs: tuple[str, ...]


def _target_str(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    return f"{mod}.{name}".lstrip(".") if mod not in ("_operator", "operator") else f"operator.{name}"


def _dims(ch: Any) -> list[ChannelDim]:
    if isinstance(ch, ChannelDim):
        return [ch]
    if isinstance(ch, tuple):
        return [d for c in ch for d in _dims(c)]
    return []


def _pct(share: float) -> str:
    """A share as a percentage, one decimal; a small non-zero share reads ``<0.1%`` rather than ``0.0%``."""
    return "<0.1%" if 0 < share < 0.0005 else f"{100 * share:.1f}%"


def _colour(i: int) -> str:
    """Distinct colours by the golden angle (HSL, converted to hex for DOT)."""
    h = (i * 137.508) % 360 / 360
    s, lum = 0.62, 0.58
    import colorsys

    r, g, b = colorsys.hls_to_rgb(h, lum, s)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


class Inspection:
    """Channel groups of a model, with the per-node view that explains them. Built by ``fxprune.inspect``."""

    def __init__(self, gm: fx.GraphModule, dependency: DependencyResult, model: torch.nn.Module) -> None:
        self.dependency = dependency
        self.groups: tuple[ChannelGroup, ...] = dependency.groups
        # id(user's module) -> (weak reference, qualified name): the weak reference tells a live submodule
        # from a new object that reuses the id of a freed one, without keeping the user's model alive.
        self._module_names = {id(m): (weakref.ref(m), n) for n, m in model.named_modules()}
        modules = dict(gm.named_modules())
        self.nodes: dict[str, NodeInfo] = {}
        self._module_node: dict[str, str] = {}  # module qualified name -> its first call's node
        self._calls: dict[str, list[str]] = {}  # module qualified name -> the nodes that call it
        self._node_inputs: dict[str, list[tuple[int, ...]]] = {}
        envgroups: dict[str, tuple[int, ...]] = {}
        for n in gm.graph.nodes:
            dims = _dims(n.meta.get(META_CHANNELS))
            groups = tuple(dict.fromkeys(g for d in dims for g, _ in d.segments))
            envgroups[n.name] = groups
            v = n.meta.get(META_VALUE)
            shape = tuple(v.shape) if hasattr(v, "shape") else None
            mtype = (
                type(modules[n.target]).__name__ if n.op == "call_module" and n.target in modules else None
            )
            ins = tuple(a.name for a in n.all_input_nodes)
            self.nodes[n.name] = NodeInfo(
                n.name, n.op, _target_str(n), mtype, shape, int(n.meta.get(META_FLOPS, 0) or 0), groups,
                dims[0].dim if dims else None, ins,
            )  # fmt: skip
            self._node_inputs[n.name] = [envgroups.get(a, ()) for a in ins]
            if n.op == "call_module":
                self._module_node.setdefault(str(n.target), n.name)
                self._calls.setdefault(str(n.target), []).append(n.name)
        self.total_flops = sum(i.flops for i in self.nodes.values())
        share: dict[int, int] = {}
        for n in gm.graph.nodes:
            touched = {g for segs in n.meta.get(META_COST_DIMS, ()) for g, _ in segs}
            for g in touched:
                share[g] = share.get(g, 0) + int(n.meta.get(META_FLOPS, 0) or 0)
        self.flops_share: dict[int, float] = {
            g.id: share.get(g.id, 0) / self.total_flops if self.total_flops else 0.0 for g in self.groups
        }

    # ------------------------------------------------------------------ queries
    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return self.dependency.prunable

    @property
    def pinned(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.pinned)

    def group(self, gid: int) -> ChannelGroup:
        for g in self.groups:
            if g.id == gid:
                return g
        raise InputError(f"no channel group {gid}; groups are numbered 0..{len(self.groups) - 1}")

    def display_name(self, node: str) -> str:
        """How ``explain`` names graph node ``node``: a module call by the module's qualified name (with the
        node name in parentheses when the module is called more than once), a ``get_attr`` by the
        attribute's qualified name, anything else by its fx node name."""
        info = self.nodes.get(node)
        if info is None or info.op not in ("call_module", "get_attr"):
            return node
        calls = self._calls.get(info.target, ())
        return f"{info.target} (node {node})" if len(calls) > 1 else info.target

    def _names(self, nodes: Sequence[str], limit: int) -> str:
        shown = ", ".join(self.display_name(n) for n in nodes[:limit])
        return shown + (f" ... (+{len(nodes) - limit} more)" if len(nodes) > limit else "")

    def _node_of(self, what: str) -> str | None:
        """The graph node a module qualified name (its first call) or an fx node name refers to."""
        if what in self._module_node:
            return self._module_node[what]
        return what if what in self.nodes else None

    def _resolve(self, what: Any) -> tuple[str, list[int], list[int]]:
        """(title, output groups, input groups) of a node name, module name/instance or group id."""
        if isinstance(what, bool):
            raise InputError(f"cannot explain {what!r}; pass a node name, module name, module or group id")
        if isinstance(what, int):
            g = self.group(what)
            return f"group {g.id}", [g.id], []
        if isinstance(what, fx.Node):
            what = what.name
        if isinstance(what, torch.nn.Module):
            ref, name = self._module_names.get(id(what), (None, None))
            if ref is None or ref() is not what or name is None:
                raise InputError(
                    f"{type(what).__name__} instance is not a submodule of the inspected model; "
                    "pass one of its submodules, or a qualified name such as 'layer1.0.conv1'"
                )
            what = name
        if not isinstance(what, str):
            raise InputError(
                f"cannot explain a {type(what).__name__}; pass a node name, module name or group id"
            )
        node = self._node_of(what)
        if node is None:
            known = [*self._module_node, *(n for n, i in self.nodes.items() if i.op != "call_module")]
            close = [n for n in known if what in n or what.replace(".", "_") in n.replace(".", "_")][:5]
            if any(name == what for _, name in self._module_names.values()):
                inner = [n for n in self._module_node if n.startswith(f"{what}.") or not what][:5]
                raise InputError(
                    f"'{what}' is a module of the model but no single traced op (a container, or traced "
                    f"through); explain one of the modules it calls, e.g. {inner}"
                )
            hint = f"; did you mean one of {close}?" if close else "; see .nodes for the node names"
            raise InputError(f"'{what}' is neither a traced module nor a graph node{hint}")
        info = self.nodes[node]
        if info.op == "call_module":
            calls = self._calls[info.target]
            which = f", call {calls.index(node) + 1} of {len(calls)}" if len(calls) > 1 else ""
            alias = f"; fx node '{node}'" if node != info.target else ""
            title = f"module '{info.target}' ({info.module_type}{alias}{which})"
        elif info.op == "get_attr":
            title = f"attribute '{info.target}' (get_attr; fx node '{node}')"
        else:
            title = f"node '{node}' ({info.op} {info.target})"
        ins = list(dict.fromkeys(g for gs in self._node_inputs[node] for g in gs))
        return title, list(info.groups), ins

    def _coupling_points(self, gid: int) -> list[str]:
        """Nodes whose operands carry the group from two or more inputs: where spaces were unified."""
        out = []
        for name, info in self.nodes.items():
            ins = self._node_inputs[name]
            hits = sum(1 for gs in ins if gid in gs)
            tail = info.target.rsplit(".", 1)[-1].strip("_")
            if hits >= 2 or (hits >= 1 and len(ins) >= 2 and tail in _JOIN_NAMES and gid in info.groups):
                out.append(name)
        return out

    def explain_group(self, gid: int) -> str:
        """Size, FLOPs share, pinned reasons, producers, consumers and norms of group ``gid`` (names as
        ``display_name``)."""
        g = self.group(gid)
        lines = [f"group {g.id}: {g.size} channels, {_pct(self.flops_share[g.id])} of FLOPs scale with it"]
        if g.pinned:
            lines.append("  PINNED (never pruned) because:")
            lines.extend(f"    - {r}" for r in g.pinned)
        else:
            lines.append("  prunable: every op it flows through has a channel rule")
        prods = g.producers
        if len(prods) > 1:
            pts = self._coupling_points(g.id)
            joined = ", ".join(
                self.display_name(p) if self.nodes[p].op == "call_module" else f"{p} ({self.nodes[p].target})"
                for p in pts[:6]
            )
            lines.append(
                f"  coupled: {len(prods)} producers must keep the same channels: {self._names(prods, 8)}"
                + (f"; joined at {joined}{' ...' if len(pts) > 6 else ''}" if pts else "")
            )
        elif prods:
            lines.append(f"  produced by: {self.display_name(prods[0])}")
        if g.consumers:
            lines.append(f"  consumers (input columns cut): {self._names(g.consumers, 8)}")
        norms = sorted({s.param.rpartition(".")[0] or s.param for s in g.sites if s.role == "norm"})
        if norms:
            lines.append(f"  norms sliced: {', '.join(norms[:8])}{' ...' if len(norms) > 8 else ''}")
        stats = sorted({s.param.rpartition(".")[0] or s.param for s in g.sites if s.role == "stats"})
        if stats:
            lines.append(
                f"  norms with statistics over these channels (renormalised over the kept ones): "
                f"{', '.join(stats[:8])}{' ...' if len(stats) > 8 else ''}"
            )
        return "\n".join(lines)

    def explain(self, node_or_module: Any) -> str:
        """Why the channels at a node / module / group are coupled with others, or pinned.

        Accepts an fx node name (``'layer1_0_conv1'``), a module qualified name (``'layer1.0.conv1'``: its
        first call), a submodule of the inspected model, an ``fx.Node`` or a group id; the two names of one
        module call give the same text. Modules are named by qualified name, other nodes by fx node name
        (see the module docstring).
        """
        title, outs, ins = self._resolve(node_or_module)
        lines = [title]
        if isinstance(node_or_module, int):
            return self.explain_group(node_or_module)
        if not outs and not ins:
            lines.append("  no tracked channels flow through it (nothing to prune here)")
        for label, gs in (("output channels", outs), ("input channels", [g for g in ins if g not in outs])):
            for gid in gs:
                lines.append(f"{label}:")
                lines.extend("  " + ln for ln in self.explain_group(gid).splitlines())
        return "\n".join(lines)

    # ------------------------------------------------------------------ views
    def summary(self) -> str:
        n_pr = len(self.prunable)
        prunable_ch = sum(g.size for g in self.prunable)
        all_ch = sum(g.size for g in self.groups)
        total_share = sum(self.flops_share.values())
        lines = [
            f"fxprune inspection: {len(self.nodes)} nodes, {self.total_flops:,} FLOPs",
            f"{len(self.groups)} channel groups: {n_pr} prunable ({prunable_ch} of {all_ch} channels), "
            f"{len(self.groups) - n_pr} pinned",
            "",
            "FLOPs%: share of the model's FLOPs in ops whose cost scales with the group's channels (what shrinks",
            "as it loses channels). Shares overlap: a conv counts for its input and its output group, so the",
            f"column sums to {_pct(total_share)} here, not 100%. ch: channels. prod, cons: nodes that produce,"
            " consume the channels.",
            f"{'group':>5} {'ch':>6} {'FLOPs%':>7} {'prod':>4} {'cons':>4}  status",
        ]
        for g in self.groups:
            status = "prunable" if g.prunable else "PINNED: " + g.pinned[0] + (
                f" (+{len(g.pinned) - 1} more)" if len(g.pinned) > 1 else "")  # fmt: skip
            lines.append(
                f"{g.id:>5} {g.size:>6} {_pct(self.flops_share[g.id]):>7} {len(g.producers):>4} "
                f"{len(g.consumers):>4}  {status}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"Inspection({len(self.groups)} groups, {len(self.prunable)} prunable, {len(self.nodes)} nodes)"
        )

    def to_networkx(self) -> nx.DiGraph:
        """Data-flow graph of the traced nodes; each node has op, target, shape, flops, groups, pinned."""
        g = nx.DiGraph()
        pinned = {grp.id for grp in self.pinned}
        for name, info in self.nodes.items():
            g.add_node(
                name, op=info.op, target=info.target, module_type=info.module_type, shape=info.shape,
                flops=info.flops, groups=info.groups, pinned=any(x in pinned for x in info.groups),
            )  # fmt: skip
        for name, info in self.nodes.items():
            for a in info.inputs:
                g.add_edge(a, name)
        return g

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: groups (size, producers, consumers, FLOPs share, pinned reasons) and nodes."""
        return {
            "total_flops": self.total_flops,
            "groups": [
                {"id": g.id, "channels": g.size, "prunable": g.prunable, "pinned": list(g.pinned),
                 "flops_share": self.flops_share[g.id], "producers": list(g.producers),
                 "consumers": list(g.consumers), "nodes": list(g.nodes)}
                for g in self.groups
            ],
            "nodes": [
                {"name": i.name, "op": i.op, "target": i.target, "module_type": i.module_type,
                 "shape": list(i.shape) if i.shape else None, "flops": i.flops, "groups": list(i.groups),
                 "inputs": list(i.inputs)}
                for i in self.nodes.values()
            ],
        }  # fmt: skip

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def _label(self, info: NodeInfo) -> str:
        kinds = {"placeholder": "input", "output": "output", "get_attr": "parameter"}
        kind = info.module_type or kinds.get(info.op) or info.target.rsplit(".", 1)[-1]
        return f"{info.name}\n{kind}"

    def _tooltip(self, info: NodeInfo) -> str:
        parts = [f"{info.name}: {info.op} {info.module_type or info.target}"]
        if info.shape is not None:
            parts.append(f"shape {list(info.shape)}")
        for gid in info.groups:
            g = self.group(gid)
            parts.append(f"group {gid}: {g.size} ch, {'prunable' if g.prunable else 'pinned'}")
        share = info.flops / self.total_flops if self.total_flops else 0.0
        parts.append(f"FLOPs {info.flops:,} ({share:.1%})")
        return "\n".join(parts)

    def to_dot(self) -> str:
        """Graphviz DOT: one box per node, filled with its output group's colour (grey: no channels);
        pinned groups have a dashed border. ``tooltip`` holds group, channels and FLOPs."""

        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

        pinned = {g.id for g in self.pinned}
        lines = [
            "digraph fxprune {",
            "  rankdir=TB;",
            '  node [shape=box, style="filled,rounded", fontsize=10];',
        ]
        for name, info in self.nodes.items():
            colour = _colour(info.groups[0]) if info.groups else "#e0e0e0"
            style = "filled,rounded,dashed" if any(g in pinned for g in info.groups) else "filled,rounded"
            lines.append(
                f"  {q(name)} [label={q(self._label(info))}, fillcolor={q(colour)}, style={q(style)}, "
                f"tooltip={q(self._tooltip(info))}];"
            )
        for name, info in self.nodes.items():
            for a in info.inputs:
                lines.append(f"  {q(a)} -> {q(name)};")
        lines.append("}")
        return "\n".join(lines)

    def _layout(self) -> dict[str, tuple[int, int]]:
        """Layered layout: rank = longest path from an input; order within a rank by first parent's slot."""
        rank: dict[str, int] = {}
        for name, info in self.nodes.items():  # nodes are in topological order
            rank[name] = 1 + max((rank[a] for a in info.inputs if a in rank), default=-1)
        slots: dict[int, list[str]] = {}
        pos: dict[str, tuple[int, int]] = {}
        for name in self.nodes:
            row = slots.setdefault(rank[name], [])
            row.append(name)
            pos[name] = (len(row) - 1, rank[name])
        return pos

    def to_html(self, title: str = "fxprune inspection") -> str:
        """A self-contained page: inline SVG graph (one colour per group), legend, click/hover details."""
        pos = self._layout()
        w, h, gx, gy = 150, 34, 175, 58
        width = (max((x for x, _ in pos.values()), default=0) + 1) * gx + 40
        height = (max((y for _, y in pos.values()), default=0) + 1) * gy + 40
        pinned = {g.id for g in self.pinned}
        svg = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
            '<defs><marker id="arr" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
            '<path d="M0,0 L8,4 L0,8 z" fill="#888"/></marker></defs>',
        ]

        def centre(n: str) -> tuple[float, float]:
            x, y = pos[n]
            return 20 + x * gx + w / 2, 20 + y * gy + h / 2

        for name, info in self.nodes.items():
            x2, y2 = centre(name)
            for a in info.inputs:
                x1, y1 = centre(a)
                my = (y1 + y2) / 2
                svg.append(
                    f'<path d="M{x1:.0f},{y1 + h / 2:.0f} C{x1:.0f},{my:.0f} {x2:.0f},{my:.0f} {x2:.0f},'
                    f'{y2 - h / 2 - 2:.0f}" fill="none" stroke="#aaa" marker-end="url(#arr)"/>'
                )
        for name, info in self.nodes.items():
            cx, cy = centre(name)
            x0, y0 = cx - w / 2, cy - h / 2
            gids = " ".join(f"g{g}" for g in info.groups)
            dash = ' stroke-dasharray="4,2"' if any(g in pinned for g in info.groups) else ""
            svg.append(f'<g class="node {gids}" data-node="{html.escape(name)}">')
            svg.append(f"<title>{html.escape(self._tooltip(info))}</title>")
            if info.groups:  # one stripe per group whose channels flow through the output
                sw = w / len(info.groups)
                for k, gid in enumerate(info.groups):
                    svg.append(
                        f'<rect x="{x0 + k * sw:.1f}" y="{y0:.0f}" width="{sw:.1f}" height="{h}" '
                        f'fill="{_colour(gid)}"/>'
                    )
            else:
                svg.append(f'<rect x="{x0:.0f}" y="{y0:.0f}" width="{w}" height="{h}" fill="#eee"/>')
            svg.append(
                f'<rect class="frame" x="{x0:.0f}" y="{y0:.0f}" width="{w}" height="{h}" rx="4" fill="none" '
                f'stroke="#333"{dash}/>'
            )
            label = self._label(info).split("\n")
            for k, text in enumerate(label):
                svg.append(
                    f'<text x="{cx:.0f}" y="{y0 + 14 + 12 * k:.0f}" text-anchor="middle">'
                    f"{html.escape(text[:26])}</text>"
                )
            svg.append("</g>")
        svg.append("</svg>")
        legend = []
        for g in self.groups:
            status = "prunable" if g.prunable else "pinned: " + "; ".join(g.pinned)
            legend.append(
                f'<li class="leg" data-group="{g.id}"><span class="sw" style="background:{_colour(g.id)}">'
                f"</span>group {g.id}: {g.size} ch, {_pct(self.flops_share[g.id])} of FLOPs scale with it — "
                f"{html.escape(status)}</li>"
            )
        details = {
            name: {"tooltip": self._tooltip(info), "explain": self.explain(name)}
            for name, info in self.nodes.items()
        }
        data = json.dumps(details).replace("</", "<\\/")
        return _HTML.format(
            title=html.escape(title),
            summary=html.escape(self.summary().split("\n\n")[0]),
            svg="\n".join(svg),
            legend="\n".join(legend),
            data=data,
        )

    def write(self, path: str, fmt: str | None = None) -> None:
        """Write ``text``, ``dot``, ``html`` or ``json`` (guessed from the suffix when ``fmt`` is None)."""
        from pathlib import Path

        p = Path(path)
        fmt = fmt or {".dot": "dot", ".gv": "dot", ".html": "html", ".htm": "html", ".json": "json"}.get(
            p.suffix.lower(), "text"
        )
        p.write_text(self.render(fmt), encoding="utf-8")

    def render(self, fmt: str) -> str:
        views = {"text": self.summary, "dot": self.to_dot, "html": self.to_html, "json": self.to_json}
        if fmt not in views:
            raise InputError(f"format {fmt!r} is not one of {sorted(views)}")
        return views[fmt]()


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; font-family: sans-serif; display: flex; height: 100vh; }}
#graph {{ flex: 1; overflow: auto; background: #fafafa; }}
#side {{ width: 420px; overflow: auto; padding: 10px; border-left: 1px solid #ccc; font-size: 12px; }}
pre {{ white-space: pre-wrap; }}
#info {{ white-space: pre-wrap; font-family: monospace; background: #f3f3f3; padding: 6px; min-height: 4em; }}
.sw {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }}
.leg {{ cursor: pointer; list-style: none; margin: 2px 0; }}
ul {{ padding-left: 0; }}
.node {{ cursor: pointer; }}
.node.dim {{ opacity: 0.15; }}
.node.sel .frame {{ stroke: #000; stroke-width: 3; }}
</style></head>
<body>
<div id="graph">{svg}</div>
<div id="side">
<h3>{title}</h3>
<pre>{summary}</pre>
<p>Hover a node for group, channels and FLOPs; click it for the explanation; click a group to highlight it.
Dashed border: pinned group. Link to a node with <code>#node=NAME</code>.</p>
<div id="info">(click a node)</div>
<h4>Groups</h4>
<ul>{legend}</ul>
</div>
<script>
var DATA = {data};
var info = document.getElementById('info');
var nodes = document.querySelectorAll('.node');
function show(el, full) {{
  var d = DATA[el.getAttribute('data-node')];
  info.textContent = full ? d.tooltip + '\\n\\n' + d.explain : d.tooltip;
}}
nodes.forEach(function (el) {{
  el.addEventListener('mouseenter', function () {{ show(el, false); }});
  el.addEventListener('click', function () {{
    nodes.forEach(function (o) {{ o.classList.remove('sel'); }});
    el.classList.add('sel'); show(el, true);
  }});
}});
// A link to a node: page.html#node=NAME opens with that node clicked (and scrolled into view).
var wanted = decodeURIComponent((location.hash.match(/^#node=(.+)$/) || [])[1] || '');
nodes.forEach(function (el) {{
  if (wanted && el.getAttribute('data-node') === wanted) {{
    el.dispatchEvent(new MouseEvent('click')); el.scrollIntoView();
  }}
}});
document.querySelectorAll('.leg').forEach(function (li) {{
  li.addEventListener('click', function () {{
    var cls = 'g' + li.getAttribute('data-group');
    nodes.forEach(function (o) {{ o.classList.toggle('dim', !o.classList.contains(cls)); }});
  }});
}});
</script>
</body></html>
"""


def inspect(
    model: torch.nn.Module,
    example_input: Any,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Inspection:
    """Trace ``model`` and analyse its channel groups without pruning anything; see ``Inspection``.

    Raises:
        InputError, TraceError: as ``fxprune.compile``.
    """
    options = CompileOptions(leaf_modules=leaf_modules, concrete_args=concrete_args)
    state = ANALYSE.run(CompileState(model=model, example_input=example_input, options=options))
    return Inspection(state.gm, state.dep, model)
