"""Tests for vvtq.analysis.oscillation: exact oscillation counts and EMAs, fractions, freezing, resume."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fakes import FakeQuantizer
from vvtq.analysis import OscillationTracker

# integer-code sequences (one per weight), one column per step
SEQS = [
    [0, 1, 0, 1, 1, 2, 1],  # oscillations at transitions 2, 3, 6
    [0, 0, 0, 0, 0, 0, 0],  # none
    [0, 1, 2, 3, 2, 1, 0],  # one, at transition 4
    [0, 0, 1, 1, 0, 0, 1],  # at 4 and 6
    [-1, -1, -2, -1, -2, -2, -3],  # at 3 and 4
    [2, 1, 2, 1, 2, 1, 2],  # at 2..6
]
EVENTS = [{2, 3, 6}, set(), {4}, {4, 6}, {3, 4}, {2, 3, 4, 5, 6}]


def reference(seq, m):
    """Direct per-weight reading of Nagel et al.'s definition; returns (events, freq, ema)."""
    events, f, e, last = set(), 0.0, float(seq[0]), 0
    for t in range(1, len(seq)):
        d = seq[t] - seq[t - 1]
        o = 0
        if d != 0:
            s = 1 if d > 0 else -1
            o = int(last != 0 and s != last)
            last = s
        if o:
            events.add(t)
        f = m * o + (1 - m) * f
        e = m * seq[t] + (1 - m) * e
    return events, f, e


def run_sequences(tracker, lin, scale=1.0, upto=None):
    cols = list(zip(*SEQS, strict=True))[:upto]
    for col in cols:
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(col, dtype=torch.float32).view(2, 3) * scale)
        tracker.step()


def make(bits=3, scale=1.0, **kw):
    lin = nn.Linear(3, 2, bias=False)
    q = FakeQuantizer(bits, scale, "blocks.0.fc1.weight_quant")
    return lin, q, OscillationTracker([(lin, q)], **kw)


def test_reference_events_match_hand_counts():
    for seq, ev in zip(SEQS, EVENTS, strict=True):
        assert reference(seq, 0.01)[0] == ev


@pytest.mark.parametrize("m", [0.25, 0.01])
def test_exact_frequency_and_ema(m):
    lin, q, tr = make(momentum=m, scale=0.1)
    run_sequences(tr, lin, scale=0.1)
    st = tr.layers["blocks.0.fc1.weight_quant"]
    freq, ema = st.freq.flatten().tolist(), st.ema.flatten().tolist()
    for i, seq in enumerate(SEQS):
        _, f, e = reference(seq, m)
        if m == 0.25:  # exact in binary floating point
            assert freq[i] == f and ema[i] == e
        else:
            assert freq[i] == pytest.approx(f, abs=1e-7) and ema[i] == pytest.approx(e, abs=1e-6)
    # with m = 0.25: w0 (events 2, 3, 6): f2 = .25, f3 = .4375, f4 = .328125, f5 = .24609375, f6 = .4345703125
    if m == 0.25:
        assert freq[0] == 0.4345703125
    assert st.prev.dtype == torch.int8 and st.last_sign.dtype == torch.int8
    assert st.prev.flatten().tolist() == [s[-1] for s in SEQS]
    assert tr.updates == len(SEQS[0])


def test_every_compares_codes_n_steps_apart():
    lin, q, tr = make(momentum=0.25, every=2)
    run_sequences(tr, lin)
    st = tr.layers["blocks.0.fc1.weight_quant"]
    assert tr.updates == 4 and tr.calls == 7
    for i, seq in enumerate(SEQS):
        assert st.freq.flatten()[i].item() == reference(seq[::2], 0.25)[1]


def test_fractions_overall_weighted_by_numel():
    torch.manual_seed(0)
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(4, 3, bias=False)  # 4 and 12 weights
    qa, qb = FakeQuantizer(4, 1.0, "a"), FakeQuantizer(4, 1.0, "b")
    tr = OscillationTracker([(a, qa), (b, qb)], momentum=0.01, threshold=0.005)
    osc_a = torch.tensor([1.0, 1, 0, 0]).view(2, 2)  # 2 of 4 oscillate
    osc_b = torch.zeros(12)
    osc_b[:3] = 1  # 3 of 12
    osc_b = osc_b.view(3, 4)
    for t in range(5):
        with torch.no_grad():
            a.weight.copy_(osc_a * (t % 2))
            b.weight.copy_(osc_b * (t % 2))
        tr.step()
    fr = tr.fractions()
    assert fr["a"] == 0.5 and fr["b"] == 0.25
    assert fr["overall"] == pytest.approx(5 / 16)
    assert fr["lowbit"] == fr["overall"]  # both layers are 4-bit
    m = tr.metrics()
    assert m["osc/overall"] == pytest.approx(5 / 16) and m["osc/a"] == 0.5 and "osc/frozen" not in m
    qb.bits = 8  # an 8-bit end: counted overall, not among the low-bit weights
    assert tr.fractions()["lowbit"] == 0.5 and tr.fractions()["overall"] == pytest.approx(5 / 16)


def test_no_state_before_first_step():
    lin, q, tr = make()
    assert tr.fractions() == {"overall": 0.0, "lowbit": 0.0}


def test_freezing_holds_weights_under_adamw():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    q = FakeQuantizer(3, 0.1, "w")
    tr = OscillationTracker([(lin, q)], momentum=0.25, threshold=0.005, freeze_threshold=0.3)
    base = torch.round(lin.weight.detach() / 0.1) * 0.1 + 0.01  # near the level, away from thresholds
    with torch.no_grad():
        lin.weight.copy_(base)
    # weights (0, 0) and (1, 2) oscillate between two codes; the EMA ends near the lower one
    for t in range(6):
        with torch.no_grad():
            w = base.clone()
            w[0, 0] += 0.1 * (t % 2)
            w[1, 2] -= 0.1 * (t % 2)
            lin.weight.copy_(w)
        tr.step()
    st = tr.layers["w"]
    assert st.n_frozen == 2 and st.frozen[0, 0] and st.frozen[1, 2]
    assert tr.metrics()["osc/frozen"] == pytest.approx(2 / 32)
    mask0 = st.frozen.clone()  # (more weights may freeze below; these must stay put)
    frozen_vals = lin.weight.detach()[mask0].clone()
    expected = torch.round(st.ema[st.frozen]) * 0.1
    torch.testing.assert_close(frozen_vals, expected)

    opt = torch.optim.AdamW(lin.parameters(), lr=0.05, weight_decay=0.5)
    x = torch.randn(16, 8)
    before = lin.weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        lin(x).pow(2).sum().backward()
        assert torch.all(lin.weight.grad[st.frozen] == 0)
        opt.step()
        tr.step()
        assert torch.equal(lin.weight.detach()[mask0], frozen_vals)
    moved = (lin.weight.detach() - before).abs()
    assert torch.all(moved[~st.frozen] > 0)
    tr.remove_hooks()


def test_state_dict_roundtrip_and_resume():
    lin, q, tr = make(momentum=0.25, freeze_threshold=0.4)
    run_sequences(tr, lin, upto=5)
    sd = copy.deepcopy(tr.state_dict())
    lin2 = copy.deepcopy(lin)
    with torch.no_grad():
        lin2.weight.add_(0.3)  # perturb: load must re-apply frozen values
    tr2 = OscillationTracker([(lin2, q)], momentum=0.25, freeze_threshold=0.4)
    tr2.load_state_dict(sd)
    st1, st2 = tr.layers[q.name], tr2.layers[q.name]
    assert st1.n_frozen == st2.n_frozen
    if st1.n_frozen:
        assert torch.equal(lin.weight[st1.frozen], lin2.weight[st2.frozen])
    for col in list(zip(*SEQS, strict=True))[5:]:
        for layer, t in ((lin, tr), (lin2, tr2)):
            with torch.no_grad():
                layer.weight.copy_(torch.tensor(col, dtype=torch.float32).view(2, 3))
            t.step()
    for k, v in st1.tensors().items():
        assert torch.equal(v, st2.tensors()[k]), k
    assert tr2.calls == tr.calls == 7
    with pytest.raises(KeyError):
        OscillationTracker([(lin, FakeQuantizer(3, 1.0, "other"))]).load_state_dict(sd)


def test_freezing_counted_in_state():
    lin, q, tr = make(momentum=0.25, freeze_threshold=0.3)
    run_sequences(tr, lin)
    st = tr.layers[q.name]
    # w5 (2,1,2,1,...) reaches f > 0.3 at transition 3; w0 at transition 3 (0.4375)
    assert st.frozen.flatten().tolist()[0] and st.frozen.flatten().tolist()[5]
    assert not st.frozen.flatten().tolist()[1]
