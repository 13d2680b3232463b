"""Structured output from the JSONL CLI: --json-schema, --regex and --choice for the whole
file, a line's own structured_outputs or OpenAI response_format in their place."""

import json
import re

import pytest

from tests.worker.services import as_env, engine_fields
from worker.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def use_model(model_dir, tmp_path, monkeypatch):
    fields = engine_fields(model_dir, database_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    for name, value in as_env(fields).items():
        monkeypatch.setenv(name, value)


def write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusal
        return exc.code


def test_run_with_choice_and_per_line_structures(tmp_path, smollm2_dir, monkeypatch, capsys):
    # A trained model: a random one runs on inside a JSON string until max_tokens.
    use_model(smollm2_dir, tmp_path, monkeypatch)
    docs = write_lines(tmp_path / "docs.jsonl", [
        {"id": "c0", "text": "Is the sky blue?"},
        {"id": "c1", "text": "Is grass red?", "temperature": 1.0, "seed": 3},
        {"id": "r", "text": "Pick a number.", "structured_outputs": {"regex": "[0-9]{2,4}"}},
        {"id": "o", "text": "Reply with a JSON object whose only key is \"name\": a cat's name.",
         "max_tokens": 64,
         "response_format": {"type": "json_object"}},
        {"id": "s", "text": "Is it ok?", "response_format": {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}},
        {"id": "t", "text": "Anything.", "max_tokens": 3, "response_format": {"type": "text"}},
        {"id": "bad", "text": "x", "response_format": {"type": "xml"}},
    ])
    out = tmp_path / "out.jsonl"
    argv = ["run", str(docs), "-o", str(out), "--max-tokens", "24", "--temperature", "0",
            "--chat", "--choice", "yes", "--choice", "no", "-q"]
    assert main(argv) == 0
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"c0", "c1", "r", "o", "s", "t"}
    assert "line 7: response_format.type" in capsys.readouterr().err
    assert {lines["c0"]["text"], lines["c1"]["text"]} <= {"yes", "no"}
    assert re.fullmatch("[0-9]{2,4}", lines["r"]["text"]), lines["r"]
    assert isinstance(json.loads(lines["o"]["text"]), dict), lines["o"]
    assert isinstance(json.loads(lines["s"]["text"])["ok"], bool), lines["s"]
    assert lines["t"]["completion_tokens"] == 3  # unconstrained: the default is overridden


def test_run_with_a_json_schema_file(tmp_path, tiny_llama_dir, monkeypatch):
    use_model(tiny_llama_dir, tmp_path, monkeypatch)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    docs = write_lines(tmp_path / "docs.jsonl",
                       [{"id": i, "prompt": f"Document {i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    assert main(["run", str(docs), "-o", str(out), "--json-schema", str(schema),
                "--max-tokens", "24", "--temperature", "0", "-q"]) == 0
    for line in map(json.loads, out.read_text().splitlines()):
        assert set(json.loads(line["text"])) == {"ok"}, line


@pytest.mark.parametrize(("contents", "words"), [
    (None, "cannot read"),
    ("{not json", "is not JSON"),
    ('{"type": "nope"}', "--json-schema: structured_outputs.json"),
])
def test_a_bad_json_schema_file_stops_the_run_at_start(tmp_path, monkeypatch, capsys,
                                                      contents, words):
    # No engine, no database: the check comes first.
    monkeypatch.setenv("PAGEDQ_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    schema = tmp_path / "schema.json"
    if contents is not None:
        schema.write_text(contents)
    docs = write_lines(tmp_path / "docs.jsonl", [{"id": 1, "prompt": "x"}])
    argv = ["run", str(docs), "-o", str(tmp_path / "out.jsonl"), "--json-schema", str(schema)]
    assert exit_code(argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "jobs.db").exists()


@pytest.mark.parametrize("option", [["--regex", "a("], ["--choice", "a", "--regex", "b"]])
def test_bad_or_conflicting_structure_options_are_refused(tmp_path, monkeypatch, capsys,
                                                         option):
    monkeypatch.setenv("PAGEDQ_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    docs = write_lines(tmp_path / "docs.jsonl", [{"id": 1, "prompt": "x"}])
    argv = ["batch", str(docs), "-o", str(tmp_path / "out.jsonl"), *option]
    assert exit_code(argv) == 2
    assert "regex" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
