"""A compressed model exports to ONNX (both of torch's exporters) and ONNX Runtime computes what it computes."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from cpconv import CPConv2d
from cpconv.fused import fused_disabled

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")


def _compressed_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, (3, 5), stride=2, padding=(1, 2), groups=2), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=2, dilation=2, bias=False, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(24, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for i, rank in ((2, 6), (4, 7), (6, 4)):
        model[i] = CPConv2d.from_conv(model[i], rank=rank)
    return model.eval()


# torch.onnx's own warnings (about its TorchScript exporter, torch internals, constant folding); any
# other warning, e.g. a TracerWarning from CPConv2d, fails the test.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:Constant folding:UserWarning")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_compressed_model_runs_in_onnx_runtime(dynamo, grad):
    if dynamo:
        pytest.importorskip("onnxscript", reason="onnxscript is in the test extra")
    model = _compressed_model()
    x = torch.randn(2, 3, 17, 15)
    with torch.no_grad():
        expected = model(x)  # the fused kernel
        with fused_disabled():
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    buffer = io.BytesIO()
    with torch.set_grad_enabled(grad):
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: "batch"},), verbose=False)
            program.save(buffer)
        else:
            torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (x, torch.randn(1, 3, 17, 15)):
        got = session.run(None, {name: batch.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(batch).numpy(), rtol=1e-4, atol=1e-5)
    ops = {node.op_type for node in __import__("onnx").load_from_string(buffer.getvalue()).graph.node}
    assert "Conv" in ops and not any("cpconv" in op for op in ops)
