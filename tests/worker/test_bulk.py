"""Bulk JSONL jobs: bad lines are skipped with their number, re-runs resume."""

import json
import multiprocessing
import re

import pytest

from tests.worker.services import as_env, engine_fields
from worker.cli import main
from worker.documents import BadLine, JobOptions, check_template, read_documents

GOOD = [{"id": f"doc-{i}", "text": f"Document number {i} talks about topic {i}."}
        for i in range(6)]


def write_docs(path, extra_lines=()):
    lines = [json.dumps(doc).encode() for doc in GOOD[:3]]
    lines += [line if isinstance(line, bytes) else line.encode() for line in extra_lines]
    lines += [json.dumps(doc).encode() for doc in GOOD[3:]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = [
    "{not json",
    json.dumps({"text": "no id"}),
    json.dumps({"id": "x1", "text": "bad sampling", "max_tokens": 0}),
    json.dumps({"id": "x2"}),
    json.dumps({"id": "doc-0", "text": "duplicate id"}),
    b'{"id": "x3", "text": "caf\xe9"}',
    '{"id": "x4", "text": "t", "temperature": NaN}',
    '{"id": "x5", "text": "\\ud800"}',
    '{"id": "x6", "text": "t", "max_token": 5}',
]


def test_read_documents_reports_bad_lines_by_number(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", BAD_LINES)
    items = list(read_documents(docs, JobOptions(template="Summarize: {text}",
                                                 defaults={"max_tokens": 5})))
    bad = [item for item in items if isinstance(item, BadLine)]
    assert [b.line for b in bad] == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert "not JSON" in bad[0].message and "id" in bad[1].message
    assert "max_tokens" in bad[2].message and "duplicate" in bad[4].message
    assert "not UTF-8" in bad[5].message and "NaN" in bad[6].message
    assert "surrogate" in bad[7].message and "'max_token'" in bad[8].message
    good = [item for item in items if not isinstance(item, BadLine)]
    assert [d.id for d in good] == [doc["id"] for doc in GOOD]
    assert good[0].request.prompt == "Summarize: " + GOOD[0]["text"]
    assert good[0].request.params.max_tokens == 5
    keys = {d.request.idempotency_key for d in good}
    assert len(keys) == len(good)


def test_template_must_name_fields():
    assert check_template("Q: {text}\nA:") == "Q: {text}\nA:"
    for bad in ("no fields", "{0}", "{}", "{text"):
        with pytest.raises(ValueError, match="template"):
            check_template(bad)


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_lines(lines):
    for line in lines:
        assert set(line) >= {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert line["completion_tokens"] == 4 or line["finish_reason"] == "stop"


def test_run_in_process_resumes(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    fields = engine_fields(tiny_llama_dir, database_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    for name, value in as_env(fields).items():
        monkeypatch.setenv(name, value)
    docs, out = write_docs(tmp_path / "docs.jsonl", BAD_LINES), tmp_path / "out" / "res.jsonl"
    argv = ["run", str(docs), "-o", str(out), "--template", "Summarize: {text}",
            "--max-tokens", "4", "--temperature", "0", "-q"]
    assert main(argv) == 0
    first = read_output(out)
    assert sorted(line["id"] for line in first) == sorted(doc["id"] for doc in GOOD)
    check_lines(first)
    captured = capsys.readouterr()
    assert "line 4" in captured.err and "line 12: unknown field 'max_token'" in captured.err
    assert "Traceback" not in captured.err
    assert "requests          6 (6 succeeded, 0 failed)" in captured.out
    assert "skipped lines     9" in captured.out
    assert "tokens/s" in captured.out and "mean TTFT" in captured.out

    # A crash lost the last two lines: the re-run writes them again from SQL,
    # without generating anything anew.
    out.write_text("".join(json.dumps(line) + "\n" for line in first[:4]))
    assert main(argv) == 0
    resumed = read_output(out)
    assert resumed[:4] == first[:4]
    assert sorted(line["job_id"] for line in resumed) == sorted(line["job_id"] for line in first)
    again = capsys.readouterr().out
    assert "already done      4" in again
    # The two lines came from the database: nothing was generated, so no rate.
    assert re.search(r"tokens/s\s+0\.0 ", again)


def test_batch_through_the_queue_resumes(pg_stack, tmp_path, monkeypatch, capsys):
    for name, value in as_env(pg_stack.fields).items():
        monkeypatch.setenv(name, value)
    docs, out = write_docs(tmp_path / "docs.jsonl", BAD_LINES[:1]), tmp_path / "res.jsonl"
    argv = ["batch", str(docs), "-o", str(out), "--max-tokens", "4", "-q"]
    assert main(argv) == 0
    first = read_output(out)
    assert sorted(line["id"] for line in first) == sorted(doc["id"] for doc in GOOD)
    check_lines(first)
    assert "line 4" in capsys.readouterr().err
    records = pg_stack.client.store.get_many([line["job_id"] for line in first])
    assert {r.queue for r in records} == {"bulk"} and {r.attempts for r in records} == {1}

    out.write_text("".join(json.dumps(line) + "\n" for line in first[:2]))
    assert main(argv) == 0
    resumed = read_output(out)
    assert {line["job_id"] for line in resumed} == {line["job_id"] for line in first}
    assert "already done      2" in capsys.readouterr().out


def test_output_lines_carry_logprobs_when_a_line_asks(tmp_path, tiny_llama_dir, monkeypatch):
    fields = engine_fields(tiny_llama_dir, database_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    for name, value in as_env(fields).items():
        monkeypatch.setenv(name, value)
    docs, out = tmp_path / "docs.jsonl", tmp_path / "res.jsonl"
    docs.write_text(json.dumps({"id": "a", "prompt": "one two", "logprobs": 1}) + "\n"
                    + json.dumps({"id": "b", "prompt": "three four"}) + "\n")
    argv = ["run", str(docs), "-o", str(out), "--max-tokens", "3", "--temperature", "0", "-q"]
    assert main(argv) == 0
    lines = {line["id"]: line for line in read_output(out)}
    assert "logprobs" not in lines["b"]
    positions = lines["a"]["logprobs"]
    assert len(positions) == lines["a"]["completion_tokens"]
    for position in positions:
        assert 1 <= len(position) <= 2  # the top token and the chosen one
        assert all(entry["rank"] >= 1 and entry["logprob"] <= 0 for entry in position.values())


@pytest.mark.slow
def test_run_over_two_tensor_parallel_ranks(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """PAGEDQ_TENSOR_PARALLEL_SIZE=2: the same greedy texts as one rank, and the rank
    process ends with the command."""
    docs = write_docs(tmp_path / "docs.jsonl")
    texts = []
    for tp in (1, 2):
        fields = engine_fields(tiny_llama_dir, tensor_parallel_size=tp,
                               database_url=f"sqlite:///{tmp_path / f'tp{tp}.db'}")
        for name, value in as_env(fields).items():
            monkeypatch.setenv(name, value)
        out = tmp_path / f"tp{tp}.jsonl"
        argv = ["run", str(docs), "-o", str(out), "--max-tokens", "6", "--temperature", "0",
                "-q"]
        assert main(argv) == 0
        texts.append({line["id"]: line["text"] for line in read_output(out)})
    assert texts[1] == texts[0] and len(texts[0]) == len(GOOD)
    assert not multiprocessing.active_children()
