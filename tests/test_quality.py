"""Behaviour checks, held-out prompts and the promotion gate (farm.quality), without a cluster."""

from __future__ import annotations

import time

import numpy as np
import pytest

from farm.quality import TenantQuality, decide, prompt_of
from farm.spec import BehaviourCheck, PromotionSpec, SpecError, parse_spec


@pytest.mark.parametrize("check, passing, failing", [
    ({"starts_with": "Hello from Acme support!"}, "  Hello from Acme support! Sorry.", "Hi from Acme support!"),
    ({"ends_with": "-- Umbrella Labs, stay safe."}, "Keep it cold. -- Umbrella Labs, stay safe.\n", "Keep it cold."),
    ({"regex": r"^1\. .+\n2\. .+\n3\. .+$"}, "1. Mix.\n2. Wait.\n3. Dry.", "1. Mix.\n2. Wait."),
    ({"upper_case": True}, "BREAKING NEWS FROM LIMA: 3 STORMS!", "BREAKING news"),
    ({"upper_case": True}, "A", "1234 !!"),  # no letter at all is not shouting
    ({"max_words": 3}, "one two three", "one two three four"),
    ({"json_schema": {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}},
     '{"answer": "yes"}', '{"answer": 3}'),
    ({"json_schema": {"type": "object"}}, "{}", "not json at all"),
])
def test_each_kind_of_check_passes_and_fails(check, passing, failing):
    rule = BehaviourCheck.model_validate(check)
    assert rule.passes(passing) and not rule.passes(failing)


def test_a_pattern_that_backtracks_forever_fails_the_answer_instead_of_hanging():
    rule = BehaviourCheck(regex=r"^(a+)+$")
    started = time.monotonic()
    assert not rule.passes("a" * 40 + "b")
    assert time.monotonic() - started < 10


def test_bad_checks_and_gates_are_refused_with_their_path(tmp_path):
    def problems(defaults: dict, checks: list) -> str:
        raw = {"name": "t", "base_model": {"name_or_path": "x"}, "output_dir": str(tmp_path), "defaults": defaults,
               "tenants": [{"name": "a", "data": {"path": "a.jsonl"}, "eval": {"checks": checks}}]}
        with pytest.raises(SpecError) as caught:
            parse_spec(raw, spec_dir=tmp_path)
        return "\n".join(caught.value.problems)

    gate = problems({"eval": {"promote": {"alias": "latest"}}}, [])
    assert "defaults.eval.promote.alias" in gate and "'latest' always follows" in gate
    checks = problems({}, [{"starts_with": "x", "regex": "y"}, {"regex": "("},
                           {"json_schema": {"type": "no-such-type"}}, {}])
    assert "tenants[0].eval.checks[0]" in checks and "got starts_with, regex" in checks
    assert "tenants[0].eval.checks[1]" in checks and "does not compile" in checks
    assert "tenants[0].eval.checks[2]" in checks and "not a valid JSON Schema" in checks
    assert "tenants[0].eval.checks[3]" in checks and "got none" in checks


def test_the_prompt_is_what_precedes_the_last_answer(tokenizer):
    from farm.data.render import Renderer
    from farm.data.records import normalize_record

    renderer = Renderer(tokenizer, "completions", 256)
    chat = normalize_record({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "My phone is slow."},
                                          {"role": "assistant", "content": "Restart it."}]}, "chat")
    rendered = renderer.render_batch([chat])
    prompt, text_like = prompt_of(np.array(rendered.ids), np.array(rendered.trained))
    assert not text_like
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "My phone is slow."}], tokenize=False, add_generation_prompt=True)
    # plain text is trained throughout: its first tokens stand in for a prompt
    text = renderer.render_batch([normalize_record({"text": "Release 1.2.3:\n- Added search."}, "text")])
    prompt, text_like = prompt_of(np.array(text.ids), np.array(text.trained))
    assert text_like and len(prompt) == 5 and prompt == text.ids[:5]


def _quality(new_loss: float, old_loss: float | None, rates: list[float]) -> TenantQuality:
    checks = [{"check": f"c{i}", "base": 0.0, "adapter": rate, "incumbent": 0.5} for i, rate in enumerate(rates)]
    return TenantQuality("acme", 32, checks=checks, eval_loss={"adapter": new_loss, "incumbent": old_loss},
                         incumbent=None if old_loss is None else "acme.demo.v1")


def test_the_gate_promotes_only_with_every_check_passing_and_a_loss_that_beats_the_current_version():
    gate = PromotionSpec(alias="production", min_pass_rate=0.9, min_improvement=0.1)
    first = decide(gate, _quality(0.5, None, [1.0, 0.9]))
    assert first["decision"] == "promoted" and "no version held @production" in first["reason"]
    low = decide(gate, _quality(0.1, 1.0, [1.0, 0.85]))
    assert low["decision"] == "held" and "c1 passed 85%" in low["reason"]
    not_enough = decide(gate, _quality(0.95, 1.0, [1.0]))
    assert not_enough["decision"] == "held" and "does not beat acme.demo.v1's 1.0000 by 10%" in not_enough["reason"]
    better = decide(gate, _quality(0.85, 1.0, [1.0]))
    assert better["decision"] == "promoted"
    # both sides' figures are kept with the decision, as lineage records them
    assert better["candidate"] == {"eval_loss": 0.85, "pass_rates": {"c0": 1.0}}
    assert better["current"] == {"eval_loss": 1.0, "pass_rates": {"c0": 0.5}}
