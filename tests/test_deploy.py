"""Deploy (issue 5): save -> load -> apply_plan round trip, and the pruned GraphModule in PyTorch's
deployment toolchains (torch.export, torch.jit, torch.compile, ONNX at opset >= 17)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomize_norms
from fxprune.models_zoo.digits import MobileNetV2Small, ResNet20

import fxprune
from fxprune.verify import export_onnx, ort_session


def _compile_resnet20(seed: int = 0) -> tuple[torch.nn.Module, fxprune.CompileResult]:
    torch.manual_seed(seed)
    model = randomize_norms(ResNet20()).eval()
    return model, fxprune.compile(model, torch.randn(1, 3, 32, 32), 0.5, latency_runs=0, verify=False)


def test_save_load_apply_plan_round_trip(tmp_path: torch.Tensor) -> None:
    model, r = _compile_resnet20()
    assert r.plan.removed_channels > 0
    out = fxprune.save(r, tmp_path / "saved")
    files = {p.name for p in out.iterdir()}
    assert {"plan.json", "state_dict.pt", "code.py", "graph_module.pt", "summary.json", "model.onnx"} <= files
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = r.graph_module(x)
        # 1. unpickled GraphModule
        assert torch.equal(fxprune.load(out)(x), ref)
        # 2. fresh instance (different random weights) + plan + saved weights, weights_only loading
        torch.manual_seed(123)
        fresh = ResNet20()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        assert not torch.equal(fresh.eval()(x), model(x))
        assert torch.equal(fxprune.load(out, fresh)(x), ref)
        # 3. apply_plan by hand then load_state_dict (the fine-tuning path)
        gm = fxprune.apply_plan(fresh, out / "plan.json")
        assert not torch.equal(gm(x), ref)  # fresh weights, same structure
        gm.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
        assert torch.equal(gm(x), ref)
        assert gm.code == r.graph_module.code
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()), "apply_plan mutated model"
    # a PrunePlan object works with an explicit example input
    gm2 = fxprune.apply_plan(ResNet20(), r.plan, torch.randn(1, 3, 32, 32))
    assert [p.shape for p in gm2.parameters()] == [p.shape for p in r.graph_module.parameters()]
    # the ONNX file written by save runs in ORT and matches eager
    sess = ort_session((out / "model.onnx").read_bytes())
    got = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    assert np.abs(got - ref[:1].numpy()).max() <= 1e-4 * np.abs(ref.numpy()).max()


@pytest.mark.parametrize("writer_ok", [True, False])
def test_save_writes_the_onnx_model_verification_checked(tmp_path: torch.Tensor, writer_ok: bool) -> None:
    """save's model.onnx comes from the exporter that verification reported: fxprune's writer, or torch's
    exporter when the writer's model failed the check (here a deliberately broken ReLU rule)."""
    import onnx
    from fxprune.passes import op_table
    from fxprune.passes.onnx_translate import unary

    from fxprune.stages import compile_pipeline

    broken = op_table.DEFAULT_TABLE.replace(torch.nn.ReLU, onnx=unary("Sigmoid"))
    pipeline = compile_pipeline(None if writer_ok else broken)  # its verify stage writes with the table
    torch.manual_seed(0)
    model = randomize_norms(ResNet20()).eval()
    x = torch.randn(1, 3, 32, 32)
    r = fxprune.compile(model, x, 0.5, latency_runs=0, progress=False, pipeline=pipeline)
    assert r.verification is not None and r.verification.passed
    assert r.verification.exporter == ("fxprune" if writer_ok else "torchscript")
    out = fxprune.save(r, tmp_path / "saved")
    blob = (out / "model.onnx").read_bytes()
    assert (onnx.load_from_string(blob).producer_name == "fxprune") == writer_ok
    sess = ort_session(blob)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = r.graph_module(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_apply_plan_rejects_other_architectures_and_bad_plans(tmp_path: torch.Tensor) -> None:
    _, r = _compile_resnet20()
    out = fxprune.save(r, tmp_path / "saved", onnx=False)
    with pytest.raises(fxprune.InputError, match="does not match this model's channel groups"):
        fxprune.apply_plan(MobileNetV2Small(), out)
    with pytest.raises(fxprune.InputError, match="does not match"):
        fxprune.apply_plan(ResNet20(width=8), out)
    with pytest.raises(fxprune.InputError, match="needs example_input"):
        fxprune.apply_plan(ResNet20(), r.plan)
    with pytest.raises(fxprune.InputError, match="no saved plan"):
        fxprune.apply_plan(ResNet20(), tmp_path / "nowhere")
    d = json.loads((out / "plan.json").read_text())
    d["format"] = "something/else"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(fxprune.InputError, match="not an fxprune plan"):
        fxprune.apply_plan(ResNet20(), tmp_path / "bad.json")
    d = json.loads((out / "plan.json").read_text())
    gid = next(iter(d["kept"]))
    d["kept"][gid] = [0, 0, 10_000]
    (tmp_path / "bad2.json").write_text(json.dumps(d))
    with pytest.raises(fxprune.InputError, match="invalid channel indices"):
        fxprune.apply_plan(ResNet20(), tmp_path / "bad2.json")


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def pruned_tv(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, fxprune.CompileResult]:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.get_model(request.param, weights=None)).eval()
    x = torch.randn(1, 3, 32, 32)
    return request.param, model, fxprune.compile(model, x, 0.5, latency_runs=0, verify=False)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


def test_torch_export_of_pruned_torchvision(
    pruned_tv: tuple[str, torch.nn.Module, fxprune.CompileResult],
) -> None:
    _, _, r = pruned_tv
    gm = r.graph_module
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(gm, (x,))
    with torch.no_grad():
        assert _close(ep.module()(x), gm(x))
    # the exported program carries the pruned (smaller) parameters, not the original ones
    assert sum(p.numel() for p in ep.parameters()) == r.params_after < r.params_before


@pytest.mark.parametrize("opset", [17, 18])
def test_onnx_export_of_pruned_torchvision(
    pruned_tv: tuple[str, torch.nn.Module, fxprune.CompileResult], opset: int
) -> None:
    import onnx

    _, _, r = pruned_tv
    x = torch.randn(1, 3, 32, 32)
    blob, _ = export_onnx(r.graph_module, (x,), opset)
    proto = onnx.load_from_string(blob)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= opset
    sess = ort_session(blob)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert _close(got, r.graph_module(x))


def test_jit_and_torch_compile_of_pruned_torchvision(
    pruned_tv: tuple[str, torch.nn.Module, fxprune.CompileResult],
) -> None:
    name, model, r = pruned_tv
    gm = r.graph_module
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = gm(x)
        assert _close(torch.jit.trace(gm, (x,))(x), ref)
        if name != "resnet18":  # script + dynamo on one model keep the suite fast (mobilenet_v2 passes too)
            return
        torch.jit.script(model)  # the original scripts, so the pruned model must
        assert _close(torch.jit.script(gm)(x), ref)
        compiled = torch.compile(
            gm, backend="aot_eager", fullgraph=True
        )  # dynamo capture without C++ codegen
        assert _close(compiled(x), ref)
