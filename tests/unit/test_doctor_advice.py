"""The doctor's communication advice (gptforge.launch.doctor.comm) with fixed numbers: bytes per setting,
seconds on a link, the settings that keep communication under 10%, and the report lines."""

import io

import pytest

from gptforge.launch.doctor import comm
from gptforge.launch.doctor.advice import compression
from gptforge.launch.doctor.report import Report

# a 1024 x 4096 matrix (4,194,304 numbers), a 4096 vector, a 3 x 8 matrix too small to compress
SHAPES = [(1024, 4096), (4096,), (3, 8)]


def test_wire_bytes_per_setting():
    n = 1024 * 4096 + 4096 + 24
    assert comm.wire_bytes(SHAPES) == 4 * n == 16_793_696
    assert comm.wire_bytes(SHAPES, "bf16") == 2 * n
    # rank 4: the matrix sends 4 x (1024 + 4096) = 20,480 numbers; the vector and the 3 x 8 go whole
    assert comm.wire_bytes(SHAPES, "powersgd", rank=4) == 4 * (20_480 + 4096 + 24) == 98_400
    # rank 512: 2 x 512 x 5120 = 5.2M >= 4.19M numbers: not worth compressing, sent whole
    assert comm.wire_bytes(SHAPES, "powersgd", rank=512) == 4 * n
    assert comm.matrix_view((8, 2, 3)) == (8, 6) and comm.matrix_view((5,)) is None


def test_seconds_and_thresholds():
    # 2 ranks, 10 MB/s bus bandwidth, 1 ms latency: ring factor 2 (W-1)/W = 1
    assert comm.comm_seconds(10e6, 2, 10e6, 1e-3) == pytest.approx(1.0 + 0.002)
    assert comm.comm_seconds(10e6, 4, 10e6, 0.0) == pytest.approx(1.5)
    c = comm.setting_comm(SHAPES, 2, 10e6, 1e-3)
    assert c["none"] == pytest.approx(16_793_696 / 10e6 + 0.002)
    assert c["bf16"] == pytest.approx(16_793_696 / 2 / 10e6 + 0.002)
    assert c["powersgd"] == pytest.approx(98_400 / 10e6 + 0.006)  # vectors, P, Q: 3 all-reduces
    # comm 1 s, compute 0.5 s per micro-batch: accumulation 18 gives 1 / (9 + 1) = 10%
    assert comm.min_accum(1.0, 0.5) == 18 and comm.fraction(1.0, 0.5, 18) == pytest.approx(0.10)
    assert comm.fraction(1.0, 0.5, 17) > 0.10
    # with accumulation 4 (2 s of compute), sync_every=5 leaves 0.2 s: 0.2 / 2.2 = 9.1%
    assert comm.min_sync_every(1.0, 0.5, 4) == 5 and comm.fraction(1.0, 0.5, 4, 5) == pytest.approx(0.2 / 2.2)
    assert comm.min_accum(0.01, 1.0) == 1 and comm.min_sync_every(0.01, 1.0, 1) == 1


def test_paste_options_and_report_lines():
    comms = {"none": 1.0, "bf16": 0.5, "powersgd": 0.1}
    opts = comm.paste_options(comms, 0.5, 4, 8)
    assert [o for o, _ in opts] == ["--train.grad_accum=18 --train.micro_batch=8",
                                    "--parallel.strategy=ddp --parallel.grad_compression=powersgd "
                                    "--parallel.powersgd_rank=4",  # bf16: 0.5 / 2.5 = 20%, left out
                                    "--parallel.strategy=ddp --parallel.sync_every=5"]
    assert [round(f, 4) for _, f in opts] == [0.1, round(0.1 / 2.1, 4), round(0.2 / 2.2, 4)]
    out = io.StringIO()
    compression(Report(0, out), comms, 0.5, 4, 8)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[WARN] communication: communication share of a step with accumulation 4: "
                               "none 33%, bf16 20%, powersgd 5%; each of these keeps it under 10%: "
                               "--train.grad_accum=18 --train.micro_batch=8 (10%) | ")
    assert "--parallel.sync_every=5 (9%)" in lines[0] and lines[1].strip().startswith("fix: paste one")
    out = io.StringIO()
    compression(Report(0, out), {"none": 0.1, "bf16": 0.05, "powersgd": 0.01}, 0.5, 4, 8)
    assert out.getvalue().strip() == ("[PASS] communication: communication share of a step with accumulation 4: "
                                      "none 5%, bf16 2%, powersgd 0%; exact DDP already stays under 10%")
