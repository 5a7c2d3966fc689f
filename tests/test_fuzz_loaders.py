"""Property-based fuzzing of the config and JSONL loaders: random and mutated input gets a valid
result or a ``UserError`` with a message, never a traceback from deep inside yaml, json or the
dataclasses. Derandomized with a fixed example budget, so CI time is bounded and a failure
reproduces."""

from __future__ import annotations

import json
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedoc.config import Config, EvalCfg, config_to_dict, load_config
from sparsedoc.data.schema import read_jsonl
from sparsedoc.errors import UserError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
TMP = Path(tempfile.mkdtemp(prefix="sparsedoc-fuzz-"))


def _keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        tp = f.type if not isinstance(f.type, str) else None
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default) or (tp is not None and is_dataclass(tp)):
            out += _keys(type(default), key + ".")
    return out


KEYS = _keys(Config)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["auto", "lora", "lora_moe", "ffn", "1e-4", "nan", "-1",
                                     "true", "", "[a, b]", "x=y"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "r", "1", "mode"]),
                                                 inner, max_size=3)), max_leaves=6)


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _load(text: str | bytes, overrides: list[str], cls=Config):
    path = TMP / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    try:
        return load_config(path, overrides, cls=cls)
    except UserError as e:
        assert str(e).strip(), "a refusal must say why"
        return None


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4),
       unknown=st.lists(st.tuples(st.text(min_size=1, max_size=8), values), max_size=1))
def test_mutated_configs_load_or_are_refused_cleanly(changes, unknown):
    tree = config_to_dict(Config())
    for key, value in changes + unknown:
        _set(tree, key, value)
    cfg = _load(yaml.safe_dump(tree, allow_unicode=True), [])
    if cfg is not None:  # accepted: it is a real, self-consistent Config
        assert isinstance(cfg, Config) and 1 <= cfg.adapter.moe.top_k <= \
            cfg.adapter.moe.num_experts and cfg.train.lr > 0


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["train", "a.b", ""]),
              st.text(max_size=10)),
    st.text(max_size=16)), max_size=4))
def test_random_overrides_apply_or_are_refused_cleanly(overrides):
    _load("", overrides)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.sampled_from([b"train: [1, 2", b"- a\n- b\n", b"!!python/object:os.system\n",
                                      b"train: &a [*a]\n", b"\xff\xfe t\x00", b"model: 5\n",
                                      b"? [a]\n: 1\n", b"1: 2\nnull: 3\n"])))
def test_random_bytes_as_a_config_file(raw):
    _load(raw, ["train.lr=1e-3"])
    _load(raw, [], cls=EvalCfg)


# ---- JSONL ------------------------------------------------------------------------------------
CHAT = {"id": "c1", "messages": [{"role": "user", "content": "胸痛三天"},
                                 {"role": "assistant", "content": "建议心电图。"}],
        "meta": {"source": "s", "task": "qa", "lang": "zh", "label": "cardiology"}}
MCQ = {"id": "m1", "question": "Which organ?", "options": {"A": "heart", "B": "skin"},
       "answer": "A", "meta": {"source": "s", "subject": "cardiology", "lang": "en"}}
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=8), st.sampled_from(["A", "AB", "BA", "", "user", "assistant"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=5)
PATHS = ["id", "messages", "messages.0", "messages.0.role", "messages.1.content", "messages.1",
         "meta", "meta.lang", "meta.label", "question", "options", "options.A", "options.Z",
         "answer", "explanation"]


def _mutate(record: dict, path: str, value, delete: bool) -> dict:
    rec = json.loads(json.dumps(record))
    parts = path.split(".")
    node = rec
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.get(p)
        if node is None or isinstance(node, (str, int, float)):
            return rec
    last = parts[-1]
    if isinstance(node, list):
        if int(last) < len(node):
            if delete:
                node.pop(int(last))
            else:
                node[int(last)] = value
    elif delete:
        node.pop(last, None)
    else:
        node[last] = value
    return rec


def _read(data: bytes, encoding: str = "utf-8"):
    path = TMP / "d.jsonl"
    path.write_bytes(data)
    try:
        return read_jsonl(path, encoding=encoding)
    except UserError as e:
        assert str(path) in str(e), f"the message names the file: {e}"
        return None


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from([CHAT, MCQ]), st.sampled_from(PATHS),
                                    json_values, st.booleans()), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_mutated_records_load_or_are_refused_cleanly(mutations, cut):
    lines = [json.dumps(_mutate(dict(rec, id=f"r{i}"), path, value, delete), ensure_ascii=False)
             for i, (rec, path, value, delete) in enumerate(mutations)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    records = _read(data[:cut] if cut is not None else data)
    if records is not None:  # accepted records satisfy what every consumer relies on
        from sparsedoc.data.tokenize import to_chat

        for r in records:
            chat = to_chat(r, True)
            assert chat["messages"][-1]["role"] in ("assistant", "user", "system")
            assert any(m["role"] == "assistant" for m in chat["messages"])


@FUZZ
@given(raw=st.binary(max_size=300), encoding=st.sampled_from(["utf-8", "gb18030", "latin-1"]))
def test_random_bytes_as_a_data_file(raw, encoding):
    _read(raw, encoding)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"id": "x", "messages": ' + "[" * 50_000])
def test_deeply_nested_json_is_a_record_error(text):
    assert _read(text.encode()) is None
