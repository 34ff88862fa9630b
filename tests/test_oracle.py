"""pdmix's quantizer against msModelSlim 26.1.0's own checkpoint of a tiny dense Qwen3
(tests/fixtures/qwen3_dense_tiny: head_dim 64, three layers, made by tests/fixtures/make_oracle.py;
the MoE fixture's comparison is in test_moe.py)."""

from pathlib import Path

import torch

from pdmix.quant.config import QuantConfig
from pdmix.quant.pipeline import quantize
from test_moe import labels, tensors

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_dense_tiny"
FLOAT, ORACLE = FIXTURE / "float", FIXTURE / "msmodelslim"


def test_every_tensor_equals_msmodelslims(tmp_path):
    """Bit for bit, deeper layers' static activation parameters included: the calibration forward is
    msModelSlim's (pdmix/quant/calib_forward.py). A float forward of the current layer put layer 2's
    down_proj input_scale 5.2% away; the runtime's fp32 attention, 2.6%; the saved int8 weight in
    place of msModelSlim's calibration-time weight (-128 where it saves -127), 1.3%."""
    ours = quantize(FLOAT, tmp_path / "w8a8", QuantConfig(calib_file=str(FLOAT / "calib.jsonl"), quiet=True))
    assert labels(ours) == labels(ORACLE)
    a, b = tensors(ours), tensors(ORACLE)
    assert a.keys() == b.keys()
    assert [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
