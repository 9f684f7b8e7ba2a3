"""rga.exported: reading an exported file (a truncated .pt2 or ONNX file is named, not a raw
BadZipFile or runtime error)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit import tiny_exported_program


def test_a_truncated_export_is_named_not_a_raw_badzipfile(tmp_path):
    from rga.export import ExportError, load_exported, read_metadata

    pt2 = tmp_path / "t.pt2"
    torch.export.save(tiny_exported_program(), str(pt2))
    pt2.write_bytes(pt2.read_bytes()[:300])
    with pytest.raises(ExportError, match="not a complete .pt2 archive"):
        read_metadata(pt2)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["images", "w"], ["features"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 64])], [weight])
    data = helper.make_model(graph).SerializeToString()
    # the positive control: the whole model is a valid one, so the errors below come from the cut
    onnx.checker.check_model(onnx.load_from_string(data))
    onnx_file = tmp_path / "t.onnx"
    onnx_file.write_bytes(data[: len(data) // 2])  # the truncated file a full disk used to leave
    Path(str(onnx_file) + ".json").write_text(json.dumps({"format": "onnx", "input": "images"}))
    with pytest.raises(ExportError, match="cannot be loaded by ONNX Runtime .truncated or damaged"):
        load_exported(onnx_file)
    Path(str(onnx_file) + ".json").unlink()  # the embedded metadata: the file itself is read
    with pytest.raises(ExportError, match="not a complete ONNX model"):
        read_metadata(onnx_file)
