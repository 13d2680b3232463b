"""Reading bulk JSONL input: every bad line is reported by number and skipped, none raises."""

import json

import pytest

from worker.documents import BadLine, Document, JobOptions, check_template, read_documents

GOOD = [json.dumps({"id": f"doc-{i}", "text": f"Document {i}."}).encode() for i in range(4)]

# (raw line, words the report must hold)
BAD = {
    "not utf-8": (b'{"id": "x", "text": "caf\xe9"}', ["not UTF-8", "0xe9"]),
    "truncated utf-8": (b'{"id": "x", "text": "\xe2\x82"}', ["not UTF-8"]),
    "encoded surrogate": (b'{"id": "x", "text": "\xed\xa0\x80"}', ["not UTF-8"]),
    "infinity": (b'{"id": "x", "text": "t", "temperature": Infinity}', ["Infinity"]),
    "minus infinity": (b'{"id": "x", "text": "t", "top_p": -Infinity}', ["-Infinity"]),
    "nan": (b'{"id": "x", "text": "t", "temperature": NaN}', ["NaN"]),
    "overflowing float": (b'{"id": "x", "text": "t", "temperature": 1e400}', ["1e400"]),
    "surrogate in prompt": (b'{"id": "x", "prompt": "a\\ud800"}',
                            ["prompt: contains a lone surrogate (\\ud800)"]),
    "surrogate in id": (b'{"id": "\\udfff", "text": "t"}', ["id:", "lone surrogate"]),
    "surrogate in a key": (b'{"id": "x", "text": "t", "\\ud800": 1}',
                           ["field name \\ud800", "lone surrogate"]),
    "nul in text": (b'{"id": "x", "text": "a\\u0000b"}', ["text: contains a NUL character"]),
    "nul in a stop string": (b'{"id": "x", "text": "t", "stop": ["ok", "\\u0000"]}',
                             ["stop.1: contains a NUL character"]),
    "nul in a nested key": (b'{"id": "x", "text": "t", "meta": {"a": [{"b\\u0000": 1}]}}',
                            ["field name meta.a.0.b\\u0000", "NUL"]),
    "unknown field": (b'{"id": "x", "text": "t", "max_token": 5}',
                      ["unknown field 'max_token'", "did you mean 'max_tokens'?"]),
    "unrelated field": (b'{"id": "x", "text": "t", "colour": "red"}', ["unknown field 'colour'"]),
    "nested too deeply": (b"[" * 100_000, ["nested too deeply"]),
    "not json": (b"{not json", ["not JSON"]),
    "not an object": (b"[1, 2]", ["not a JSON object"]),
    "missing template field": (b'{"id": "x", "text": "t"}', ["'title'", "missing"]),
    "template misfit": (b'{"id": "x", "text": "t", "title": 5}', ["template"]),
    "bad sampling value": (b'{"id": "x", "text": "t", "title": "T", "max_tokens": 0}',
                           ["max_tokens"]),
    "duplicate id": (b'{"id": "doc-0", "text": "again", "title": "T"}', ["duplicate"]),
    "message role": (b'{"id": "x", "messages": [{"role": "bot", "content": "c"}]}',
                     ["messages.0.role"]),
    "message without content": (b'{"id": "x", "messages": [{"role": "user"}]}',
                                ["messages.0.content"]),
    "messages beside text": (b'{"id": "x", "title": "T", "text": "t", "messages": []}',
                             ["messages:", "not beside"]),
    "no prompt at all": (b'{"id": "x", "title": "T"}', ["a prompt, a text or a messages"]),
}
TEMPLATE = "{title[0]}: {text}"


def read(tmp_path, lines, template=TEMPLATE):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return list(read_documents(path, JobOptions(template=template)))


def titled(line: bytes) -> bytes:
    return line[:-1] + b', "title": "T"}'


@pytest.mark.parametrize("name", BAD)
def test_a_bad_line_is_reported_and_the_rest_read(tmp_path, name):
    raw, words = BAD[name]
    good = [titled(line) for line in GOOD]
    items = read(tmp_path, [good[0], good[1], raw, good[2], good[3]])
    bad = [item for item in items if isinstance(item, BadLine)]
    assert [b.line for b in bad] == [3], bad
    for word in words:
        assert word in bad[0].message
    docs = [item for item in items if isinstance(item, Document)]
    assert [d.id for d in docs] == ["doc-0", "doc-1", "doc-2", "doc-3"]
    assert docs[0].request.prompt == "T: Document 0."


def test_every_kind_in_one_file(tmp_path):
    raws = [raw for raw, _ in BAD.values()]
    good = [titled(line) for line in GOOD]
    items = read(tmp_path, [good[0], *raws, b"", b"   ", *good[1:]])
    bad = [item for item in items if isinstance(item, BadLine)]
    assert [b.line for b in bad] == list(range(2, 2 + len(raws)))
    assert len(items) == len(raws) + len(good)


def test_valid_input_is_read_whole(tmp_path):
    items = read(tmp_path, [
        b'\xef\xbb\xbf{"id": "bom", "prompt": [1, 2]}',  # a byte order mark opens the file
        b'{"id": 7, "prompt": "emoji \\ud83d\\ude00 and caf\xc3\xa9", "priority": 3,'
        b' "temperature": 0.5, "seed": 1, "max_tokens": 4}',
        b'{"id": "w", "text": "t", "width": 6}\r',
    ], template="{text:>{width}}")
    assert all(isinstance(item, Document) for item in items), items
    assert items[0].request.prompt == [1, 2] and items[1].id == "7"
    assert items[1].request.prompt == "emoji \U0001f600 and caf\u00e9"
    assert items[1].request.priority == 3 and items[1].request.params.max_tokens == 4
    assert items[2].request.prompt == "     t"


def test_several_unknown_fields_are_all_named(tmp_path):
    (item,) = read(tmp_path, [b'{"id": "x", "text": "t", "tempreature": 0, "zz": 1}'],
                   template="{text}")
    assert "'tempreature' (did you mean 'temperature'?)" in item.message
    assert "unknown field 'zz'" in item.message


def test_template_must_be_storable():
    for bad in ("{text}\x00", "{text}\ud800", "{text:{}}"):
        with pytest.raises(ValueError, match="template"):
            check_template(bad)


def test_a_messages_line_becomes_a_chat_job(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    line = json.dumps({"id": "m", "messages": messages, "max_tokens": 3}).encode()
    [doc] = read(tmp_path, [line])
    assert [m.model_dump() for m in doc.request.messages] == messages
    assert doc.request.prompt is None and not doc.request.chat
    assert doc.request.params.max_tokens == 3
    other = json.dumps({"id": "m", "messages": messages[1:], "max_tokens": 3}).encode()
    [changed] = read(tmp_path, [other])
    assert changed.request.idempotency_key != doc.request.idempotency_key


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
RESPONSE_FORMATS = {
    "json_schema": ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
                    {"json": SCHEMA}),
    "json_object": ({"type": "json_object"}, {"json_object": True}),
    "text": ({"type": "text"}, None),
}


def structure(doc):
    so = doc.request.params.structured_outputs
    return None if so is None else {k: v for k, v in so.model_dump().items()
                                    if v not in (None, False)}


@pytest.mark.parametrize("name", RESPONSE_FORMATS)
def test_response_format_becomes_structured_outputs(tmp_path, name):
    response_format, expected = RESPONSE_FORMATS[name]
    line = json.dumps({"id": "x", "text": "t", "response_format": response_format}).encode()
    # A line's own response_format wins over the file's default, "text" included.
    options = JobOptions(defaults={"structured_outputs": {"regex": "[ab]+"}})
    path = tmp_path / "docs.jsonl"
    path.write_bytes(line + b"\n")
    [doc] = read_documents(path, options)
    assert structure(doc) == expected


def test_a_lines_structured_outputs_overrides_the_default(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "t", "structured_outputs": {"choice": ["y"]}})
                    + "\n" + json.dumps({"id": "z", "text": "t"}) + "\n")
    options = JobOptions(defaults={"structured_outputs": {"regex": "[ab]+"}, "max_tokens": 3})
    own, default = read_documents(path, options)
    assert structure(own) == {"choice": ["y"]} and structure(default) == {"regex": "[ab]+"}
    assert own.request.params.max_tokens == 3
    assert own.request.idempotency_key != default.request.idempotency_key


@pytest.mark.parametrize(("line", "words"), [
    ({"response_format": {"type": "xml"}}, "response_format.type: must be 'json_schema'"),
    ({"response_format": "json"}, "response_format: must be an object"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema: must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema: must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format.json_schema.schema: structured_outputs.json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "nom": "a"}}},
     "response_format.json_schema: unknown field(s) ['nom']"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format: unknown"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format: give it or structured_outputs, not both"),
    ({"structured_outputs": {"regex": "a("}}, "params.structured_outputs.regex: "),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "params.structured_outputs.grammar: "),
])
def test_a_bad_structure_is_a_bad_line_naming_the_field(tmp_path, line, words):
    [item] = read(tmp_path, [json.dumps({"id": "x", "text": "t", **line}).encode()],
                  template="{text}")
    assert isinstance(item, BadLine) and words in item.message, item
