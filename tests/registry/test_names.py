"""Names are checked by one fullmatch-based validator: property tests over hostile text.

Tenant, adapter and alias names become store paths, URL parts and vLLM model names, so the
validator must accept exactly ``[a-z0-9][a-z0-9_-]{0,62}``: no control characters (a trailing
newline passed the old ``match``-with-``$`` check), no unicode look-alikes, no separators.
"""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.registry.names import NameError_, check_name, parse_ref, serve_name

ASCII_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# characters that look like allowed ones, or that separate, escape or end lines
HOSTILE = ["\n", "\r", "\t", "\x00", "\x7f", "\u2028", " ", ".", "/", "\\", "@", "%",
           "\u0430", "\u0435", "\u043e", "\u0131", "\uff41", "\u2010", "\u2011", "\u00a0", "A", "Z"]
names = st.text(alphabet=st.sampled_from(list(string.ascii_lowercase + string.digits + "_-") + HOSTILE),
                min_size=0, max_size=70)


@settings(max_examples=400, deadline=None)
@given(names)
def test_a_name_is_accepted_exactly_when_it_is_plain_ascii(text):
    accepted = True
    try:
        check_name("tenant", text)
    except NameError_:
        accepted = False
    assert accepted == bool(ASCII_NAME.fullmatch(text)), repr(text)
    if accepted:
        assert text.isascii() and text == text.strip() and "\n" not in text


@settings(max_examples=400, deadline=None)
@given(names, names, st.one_of(st.integers(min_value=-5, max_value=10**10), st.none()), names)
def test_references_parse_only_when_every_part_is_valid_and_round_trip(tenant, adapter, version, alias):
    text = serve_name(tenant, adapter, version) if version is not None else f"{tenant}.{adapter}@{alias}"
    valid = bool(ASCII_NAME.fullmatch(tenant) and ASCII_NAME.fullmatch(adapter)) and (
        (version is not None and 1 <= version <= 999_999_999) or
        (version is None and bool(ASCII_NAME.fullmatch(alias))))
    for suffix in ("", "\n", " ", "\x00", "/..", ".v1"):
        candidate = text + suffix
        try:
            ref = parse_ref(candidate)
        except NameError_:
            ref = None
        if suffix:
            # anything appended to a valid reference makes another, invalid or different one
            assert ref is None or str(ref) == candidate, repr(candidate)
        else:
            assert (ref is not None) == valid, repr(candidate)
            if ref is not None:
                assert str(ref) == candidate


@pytest.mark.parametrize("entry", ["publish", "alias", "spec"])
def test_every_entry_point_refuses_a_trailing_newline(entry, tmp_path, base_model_dir, adapter_dir):
    from farm.registry import open_registry
    from farm.spec import SpecError, parse_spec

    if entry == "spec":
        with pytest.raises((SpecError, ValueError), match="tenant"):
            parse_spec({"name": "s", "base_model": {"name_or_path": str(base_model_dir)},
                        "output_dir": str(tmp_path), "tenants": [{"name": "acme\n", "data": {"path": "x.jsonl"}}]})
        return
    registry = open_registry(str(tmp_path / "reg"))
    with pytest.raises(NameError_):
        if entry == "publish":
            registry.publish("acme", "nl\n", adapter_dir, base_model=str(base_model_dir))
        else:
            registry.publish("acme", "ok", adapter_dir, base_model=str(base_model_dir), aliases=("prod\n",))
    assert registry.search(status=None)[1] == 0
