"""bench/memory_estimate.py: hand-computed bytes for toy models, the sharding arithmetic, and a smoke run.

The accounting lives in bench/memory_model.py (`mm`), the measurements in bench/memory_measure.py (`ms`),
the command in bench/memory_estimate.py (`me`).

The figures the estimate prints for SDXL are these same functions applied to the real UNet's shapes, so
the checks here are on sizes a reader can add up by hand: a 1,000-parameter model under AdamW at ZeRO 0
is 2 + 4 + 2 + 8 bytes per parameter held, plus the 4-byte AdamW step counter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import memory_estimate as me
from bench import memory_measure as ms
from bench import memory_model as mm

TOY = mm.Model("toy", {(1000,): 1})


def _parts(model: mm.Model, setup: mm.Setup) -> dict[tuple[str, str, str], int]:
    parts, _ = mm.estimate(model, setup, ms.OptimizerBytes(setup.optimizer))
    out: dict[tuple[str, str, str], int] = {}
    for p in parts:
        out[(p.what, p.device, p.when)] = out.get((p.what, p.device, p.when), 0) + p.nbytes
    return out


def _held(parts: dict[tuple[str, str, str], int], device: str = "gpu") -> int:
    return sum(v for (_, dev, when), v in parts.items() if dev == device and when == "held")


def test_adamw_zero0_is_the_hand_sum():
    parts = _parts(TOY, mm.Setup("adamw", 0, 1))
    # bf16 weights 2 B + fp32 master 4 B + bf16 grads 2 B + exp_avg 4 B + exp_avg_sq 4 B per parameter,
    # and AdamW's step counter (one fp32 scalar tensor).
    assert parts[("optimizer state", "gpu", "held")] == 8 * 1000 + 4
    assert _held(parts) == (2 + 4 + 2 + 8) * 1000 + 4
    # At the step: an fp32 copy of every gradient, and foreach AdamW's sqrt of exp_avg_sq.
    assert parts[("fp32 gradient copies", "gpu", "step")] == 4 * 1000
    assert parts[("optimizer temporaries", "gpu", "step")] == 4 * 1000
    t = mm.totals(list(mm.estimate(TOY, mm.Setup("adamw", 0, 1), ms.OptimizerBytes("adamw"))[0]))
    assert t["gpu_step_peak_gib"] * mm.GIB == pytest.approx(24 * 1000 + 4)
    assert t["cpu_held_gib"] == 0


def test_zero2_on_two_gpus_halves_the_sharded_parts():
    one, two = _parts(TOY, mm.Setup("adamw", 2, 1)), _parts(TOY, mm.Setup("adamw", 2, 2))
    for what in ("fp32 master partition", "bf16 gradient partition", "fp32 gradient partition"):
        key = next(k for k in one if k[0] == what)
        assert two[key] * 2 == one[key], what
    # State halves too, except AdamW's per-tensor step counter.
    state = ("optimizer state", "gpu", "held")
    assert one[state] == 8 * 1000 + 4 and two[state] == 8 * 500 + 4
    # Not sharded below ZeRO 3: every rank keeps all bf16 weights, and the reduce bucket has a fixed size.
    for what in ("bf16 weights (all, every rank)", "reduce bucket (bf16)"):
        key = (what, "gpu", "held")
        assert one[key] == two[key]
    assert one[("reduce bucket (bf16)", "gpu", "held")] == 2 * mm.REDUCE_BUCKET


def test_zero3_shards_the_weights_and_offload_moves_state_to_the_cpu():
    one, two = _parts(TOY, mm.Setup("adamw", 3, 1)), _parts(TOY, mm.Setup("adamw", 3, 2))
    key = ("bf16 weight partition", "gpu", "held")
    assert one[key] == 2 * 1000 and two[key] == 2 * 500
    off = _parts(TOY, mm.Setup("adamw", 3, 2, offload_optimizer=True, offload_param=True))
    assert off[("bf16 weight partition", "cpu", "held")] == 2 * 500
    # DeepSpeedCPUAdam replaces torch AdamW under offload: two fp32 moments, no step counter tensor.
    assert off[("optimizer state", "cpu", "held")] == 8 * 500
    assert off[("fp32 master partition", "cpu", "held")] == 4 * 500
    assert not any(what == "optimizer state" and dev == "gpu" for what, dev, _ in off)


def test_deepspeed_cpu_lion_keeps_an_unused_second_moment():
    off = _parts(TOY, mm.Setup("lion", 2, 1, offload_optimizer=True))
    assert off[("optimizer state", "cpu", "held")] == 8 * 1000


def test_8bit_optimizers_cannot_be_offloaded():
    parts, notes = mm.estimate(TOY, mm.Setup("adamw_8bit", 2, 1, offload_optimizer=True), ms.OptimizerBytes("adamw_8bit"))
    assert parts == [] and notes == ["refused"]


def test_measured_state_of_each_optimizer():
    n = 1 << 20
    per = {o: ms.OptimizerBytes(o).per_shape((n,))[0] / n for o in mm.OPTIMIZERS}
    assert per["adamw"] == pytest.approx(8, abs=1e-5)
    assert per["lion"] == 4
    assert per["prodigy"] == 16  # s, p0, exp_avg, exp_avg_sq
    # 8-bit blockwise: 1 byte per moment + one fp32 absmax per 256 elements per moment + 256-entry qmaps.
    assert per["adamw_8bit"] * n == 2 * n + 2 * 4 * (n // 256) + 2 * 256 * 4
    assert per["lion_8bit"] * n == n + 4 * (n // 256) + 256 * 4
    # Adafactor: one fp32 second moment on a 1-D tensor (plus its RMS scalar); row + column factors on 2-D.
    assert ms.OptimizerBytes("adafactor").per_shape((1000,))[0] == 4 * 1000 + 4
    assert ms.OptimizerBytes("adafactor").per_shape((40, 25))[0] == 4 * (40 + 25) + 4
    # Below bitsandbytes' min_8bit_size (4096) the "8-bit" optimizers keep fp32 state.
    assert ms.OptimizerBytes("adamw_8bit").per_shape((1000,))[0] == 8 * 1000


def test_meta_estimate_agrees_with_a_real_cpu_step():
    for name, c in ms.cross_check(1 << 12).items():
        assert c["cpu_step_bytes_per_param"] == pytest.approx(c["estimate_bytes_per_param"], rel=1e-6), name


def test_adafactor_is_flat_under_zero_and_factored_at_zero0():
    model = mm.Model("2d", {(100, 100): 1})
    z0, _ = mm.estimate(model, mm.Setup("adafactor", 0, 1), ms.OptimizerBytes("adafactor"))
    z2, notes = mm.estimate(model, mm.Setup("adafactor", 2, 1), ms.OptimizerBytes("adafactor"))
    state = {p.what: p.nbytes for p in z0}["optimizer state"]
    assert state == 4 * 200 + 4
    assert {p.what: p.nbytes for p in z2}["optimizer state"] == 4 * 10_000 + 4
    assert "flat" in notes


def test_bitsandbytes_element_count_overflow_is_flagged():
    big = mm.Model("big", {(1_000_000_000,): 3})  # 3e9 parameters: one 3e9-element partition on 1 GPU
    _, notes = mm.estimate(big, mm.Setup("lion_8bit", 2, 1), ms.OptimizerBytes("lion_8bit"))
    assert "int32" in notes
    _, notes = mm.estimate(big, mm.Setup("lion_8bit", 2, 2), ms.OptimizerBytes("lion_8bit"))
    assert "int32" not in notes


def test_fits_needs_room_for_activations_and_the_step():
    t = {"gpu_held_gib": 20.0, "gpu_step_peak_gib": 22.0}
    assert mm.fits(t, activations_gib=1.0, card_gib=24, reserve_gib=2.0)
    assert not mm.fits(t, activations_gib=1.0, card_gib=23.9, reserve_gib=2.0)
    assert not mm.fits(t, activations_gib=2.5, card_gib=24, reserve_gib=2.0)


@pytest.mark.slow
def test_lora_adapters_match_the_linear_shapes():
    cfg = ms.unet_config("smoke")
    base = ms.build_unet(cfg)
    rank = 16
    # peft matches a target by name suffix; each adapted Linear(in, out) gains A (rank x in) + B (out x rank).
    by_hand = sum(rank * (m.in_features + m.out_features) for name, m in base.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in ms.LORA_TARGETS))
    lora = ms.describe(ms.build_unet(cfg, rank), "lora")
    assert lora.n_trainable == by_hand
    assert lora.frozen == ms.describe(base, "base").n_trainable


@pytest.mark.slow
def test_activation_count_is_linear_in_batch_and_checkpointing_saves():
    cfg = ms.unet_config("smoke")
    one, two = ms.saved_for_backward(cfg, 1), ms.saved_for_backward(cfg, 2)
    assert 0 < one["checkpointing"] < one["no_checkpointing"]
    assert two["no_checkpointing"] == pytest.approx(2 * one["no_checkpointing"], rel=0.01)
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    with ms.flash_attention_on_meta():
        assert F.scaled_dot_product_attention is not original
    assert F.scaled_dot_product_attention is original


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "memory_estimate.json"
    assert me.main(["--size", "smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == len(me.setups()) + len(me.LORA_RANKS)
    for r in doc["rows"]:
        if r.get("refused"):
            continue
        assert math.isfinite(r["gpu_step_peak_gib"]) and r["gpu_step_peak_gib"] >= r["gpu_held_gib"] > 0
        assert set(r["fits"]) == {"24", "48", "80"}
    assert all(math.isfinite(x["value"]) for x in doc["table"])
    assert "ZeRO-3 x8 + offload opt+param" in capsys.readouterr().out
