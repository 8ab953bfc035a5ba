"""`tinyllm calc memory --zero-table`: the notes' ZeRO table and the corrected ZeRO-3 communication bytes."""

from __future__ import annotations

import json

import pytest

from tinyllm import cli
from tinyllm.calc.memory import GB, transfer_seconds, zero_communication_bytes


def test_zero_table_reproduces_the_notes(capsys) -> None:
    assert cli.main(["calc", "memory", "--params", "7.5B", "--gpus", "64", "--zero-table"]) == 0
    out = capsys.readouterr().out
    for text in ("120.0 GB", "31.4 GB", "16.6 GB", "1.9 GB", "45.0 GB (3Ψ fp16)"):
        assert text in out, out
    assert cli.main(["calc", "memory", "--params", "7.5B", "--gpus", "64", "--zero-table", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    got = [s["model_states"] / GB for s in data["stages"]]
    assert got == pytest.approx([120, 31.406, 16.641, 1.875], abs=1e-3)


def test_zero3_communication_bytes_correct_the_notes() -> None:
    # the notes: 65B under ZeRO-3 moves "195 GB per step per card (3x params)" -> 1560 Gb -> 156 s on 10 Gb/s;
    # 3Ψ = 195e9 *elements*; in fp16 that is 390 GB, 312 s
    b = zero_communication_bytes(65e9, 3)
    assert b == pytest.approx(390 * GB)
    assert transfer_seconds(b, 10) == pytest.approx(312)
    assert zero_communication_bytes(65e9, 3, bytes_per_elem=1) == pytest.approx(195 * GB)  # the notes' convention
