"""The fixed-seed slice of the fuzzer (tests/fuzz.py): every drawn model keeps the contract.

Longer runs: ``python -m tests.fuzz --minutes N``; one example: ``--spec 'Spec(...)'``.
"""

from __future__ import annotations

import torch

from tests.fuzz import (
    SIMPLEST,
    FuzzLM,
    Spec,
    draw_specs,
    failures,
    make_inputs,
    parse_spec,
    run_specs,
    summary,
)
from tests.fuzz import _simpler as simpler

CI_SEED = 0
CI_EXAMPLES = 10  # about a minute on 2 CPU cores; `python -m tests.fuzz` runs longer


def test_grammar_is_reproducible_and_builds() -> None:
    """The same seed draws the same specs; each repr parses back; each model runs in eager."""
    drawn = draw_specs(8, CI_SEED)
    assert drawn == draw_specs(8, CI_SEED)
    for spec in drawn:
        assert parse_spec(repr(spec)) == spec
        torch.manual_seed(spec.seed)
        out = FuzzLM(spec)(**make_inputs(spec, *spec.steps[0]))
        loss = out["loss"] if spec.output == "dict" else out[0] if spec.output == "tuple" else out
        loss.backward()
        assert torch.isfinite(loss), spec


def test_fuzz_slice() -> None:
    results = run_specs(draw_specs(CI_EXAMPLES, CI_SEED))
    assert len(results) == CI_EXAMPLES, summary(results)
    assert not [bad for bad in failures(results) if not bad["known"]], summary(results)


FOUND = {
    "Spec(mlp='moe', top_k=2, layers=2, world=3, steps=((2, 17),))": "exact",
    "Spec(world=2, heads=1, kv_heads=1, head_dim=12, attn_impl='eager', gqa='expand',"
    " mask='window', mask_dtype='float', window=1, pos_emb='rope', norm='rms', mlp='dense',"
    " mixer='conv1d', layout='seq_first', reduction='sum', output='tensor', steps=((2, 19),),"
    " seed=10383)": "gathered",
    "Spec(attn_impl='eager_fill', mask='padding', mask_dtype='float', gqa='repeat_interleave',"
    " world=3, steps=((2, 11),))": "exact",
    "Spec(world=4, attention='ring', load_balance=False, recognise_masks=False, heads=3,"
    " kv_heads=1, head_dim=12, layers=2, gqa='expand', causal=False, mask='documents',"
    " mask_dtype='float', norm='rms_manual', mlp='moe', experts=4, top_k=4, tie=True,"
    " layout='seq_first', shift='none', reduction='sum', steps=((3, 11),), seed=65536)": "exact",
}
"""Examples a longer run found, and what each must be now: a MoE router's gates
(``scatter`` along the experts, once gathered); a one-token window (the query weights' gradient
is zero: only rounding noise is left, which ``grad_errors`` must not call a mismatch; the conv
mixer's padding is gathered); nanoGPT's ``masked_fill(hidden, -inf)`` attention (refused as "no
attention found"); a loss near 0 (a tied head predicting its own input) through the chunked
loss, whose log-sum-exp once lost the loss's digits."""


def test_found_examples() -> None:
    want = {repr(parse_spec(text)): kind for text, kind in FOUND.items()}
    results = run_specs([parse_spec(text) for text in FOUND])
    assert {r["spec"]: r["kind"] for r in results} == want, summary(results)


def test_spec_checks_its_fields() -> None:
    bad = {"heads": 4, "kv_heads": 3}
    try:
        Spec(**bad)
    except ValueError as err:
        assert "kv_heads must divide heads" in str(err)
    else:
        raise AssertionError("Spec accepted kv_heads=3 with heads=4")


def test_shrink_steps_are_simpler() -> None:
    """Each shrink candidate is a valid spec one field closer to SIMPLEST (fewer features)."""
    for spec in draw_specs(8, CI_SEED):
        for candidate in simpler(spec):
            changed = [f for f in vars(spec) if getattr(spec, f) != getattr(candidate, f)]
            assert 1 <= len(changed) <= 2, changed  # heads moves kv_heads with it
            assert candidate != spec and candidate.world <= spec.world
    assert all(c.heads < SIMPLEST.heads for c in simpler(SIMPLEST))  # only fewer heads left
