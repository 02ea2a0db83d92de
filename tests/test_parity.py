"""The parity rule (fastseg.parity) and `fastseg bench` in low precision: judged against an fp32
gold, never one low-precision run against another."""
import json

import pytest
import torch

from fastseg import parity
from fastseg.cli import main


def _logits(*shape):
    return torch.randn(*shape, dtype=torch.float64).float()


def test_errors_measure_max_rms_and_argmax():
    gold = _logits(2, 5, 7, 9)
    out = gold.clone()
    out[0, :, 0, 0] = gold[0, :, 0, 0].flip(0)  # one pixel's class order reversed
    e = parity.errors(out, gold)
    assert e["finite"] and 0 < e["max_rel_err"] and 0 < e["rms_rel_err"] < e["max_rel_err"]
    assert e["argmax_agreement"] == pytest.approx(1 - 1 / (2 * 7 * 9))
    with pytest.raises(ValueError, match="shapes"):
        parity.errors(out[:1], gold)


def test_nan_never_passes():
    gold = _logits(1, 3, 4, 4)
    bad = gold.clone()
    bad[0, 1, 2, 3] = float("nan")
    e = parity.errors(bad, gold)
    assert not e["finite"]
    assert parity.judge(e, None, low_precision=False) == (False, "non-finite output")
    assert not parity.judge(e, parity.errors(gold, gold), low_precision=True)[0]


def test_low_precision_is_held_to_twice_eagers_error_against_the_gold():
    gold = _logits(1, 19, 16, 16)
    noise = torch.randn_like(gold)
    eager = parity.errors(gold + 1e-2 * noise, gold)
    assert parity.judge(parity.errors(gold + 1.9e-2 * noise, gold), eager, low_precision=True)[0]
    ok, why = parity.judge(parity.errors(gold + 2.1e-2 * noise, gold), eager, low_precision=True)
    assert not ok and "2x" in why
    with pytest.raises(ValueError, match="eager"):
        parity.judge(eager, None, low_precision=True)


def test_fp32_uses_the_argmax_rule():
    gold = _logits(1, 4, 10, 10)
    flipped = gold.clone()
    flipped[0, :, :2, :] = -flipped[0, :, :2, :]  # 20 % of the pixels change class (almost surely)
    ok, why = parity.judge(parity.errors(flipped, gold), None, low_precision=False)
    assert not ok and "argmax" in why
    assert parity.judge(parity.errors(gold, gold), None, low_precision=False)[0]


def test_bench_bf16_is_judged_against_an_fp32_gold(tmp_path, capsys):
    code = main(["bench", "--height", "96", "--width", "64", "--dtype", "bf16", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path), "--quiet", "--no-plot"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "vs fp32 gold" in printed and "PARITY FAILED" not in printed
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "fp32 gold" in record["parity_rule"]
    modes = {r["mode"]: r for r in record["results"]}
    assert all(r["parity"] and r["finite"] for r in modes.values())
    # eager bf16 really differs from the gold: the rule compares two non-zero errors
    assert modes["eager"]["rms_rel_err"] > 1e-4
    assert modes["fused"]["rms_rel_err"] <= 2 * modes["eager"]["rms_rel_err"]
