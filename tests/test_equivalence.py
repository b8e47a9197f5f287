"""DDP and DiLoCo against single-process references, over real gloo processes under torchrun."""

import json

import pytest
from dist_utils import torchrun


def _run(tmp_path, which: str, nproc: int) -> dict:
    out = tmp_path / f"{which}.json"
    proc = torchrun(nproc, ["tests/scripts/equivalence.py", which, str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(200)
def test_ddp_equals_single_process_on_concatenated_batch(tmp_path):
    res = _run(tmp_path, "ddp", 3)
    assert res["moved"] > 1e-3  # training really changed the weights
    assert res["max_abs_diff"] < 1e-12  # float64: same update up to summation order
    assert res["torch_ddp_diff"] < 1e-12  # and the same weights as torch's DistributedDataParallel
    # one fused all-reduce per step, nothing else
    assert res["window"]["collectives"] == res["steps"]


@pytest.mark.timeout(200)
def test_diloco_outer_sgd_lr1_no_momentum_is_parameter_averaging(tmp_path):
    res = _run(tmp_path, "diloco", 3)
    assert res["moved"] > 1e-3
    assert res["max_abs_diff"] < 1e-12
    # DiLoCo's collectives during training: exactly steps / H
    assert res["window"]["collectives"] == res["steps"] // res["H"]
    # each all-reduce moves 2(N-1)/N of the model per worker (ring cost model)
    n_params = 8 * 16 + 16 + 16 + 1
    assert res["window"]["bytes_sent"] == (res["steps"] // res["H"]) * -(-2 * (res["world_size"] - 1) * n_params * 8 // res["world_size"])
