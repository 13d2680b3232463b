"""Producer-side validation: every rejection names the field."""

import subprocess
import sys
from pathlib import Path

import pytest

from worker.schemas import GenerationParams, InvalidJob, QueueKind, engine_params, parse_job


@pytest.mark.parametrize(("job", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "nul\x00byte"}, "prompt"),
    ({"prompt": "x", "params": {"temperature": -1}}, "params.temperature"),
    ({"prompt": "x", "params": {"top_p": 0}}, "params.top_p"),
    ({"prompt": "x", "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"prompt": "x", "params": {"min_tokens": 9, "max_tokens": 4}}, "min_tokens"),
    ({"prompt": "x", "params": {"top_q": 1}}, "params.top_q"),
    ({"prompt": "x", "queue": "urgent"}, "queue"),
    ({"prompt": "x", "priority": 10}, "priority"),
    ({"prompt": "x", "deadline_s": 0}, "deadline_s"),
    ({"prompt": [1, 2], "chat": True}, "chat"),
    ({"prompt": "x", "params": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
     "params.structured_outputs: structured_outputs must set exactly one"),
    ({"prompt": "x", "params": {"structured_outputs": {"json": "{oops"}}},
     "params.structured_outputs.json: "),
    ({"prompt": "x", "params": {"structured_outputs": {"choice": []}}},
     "params.structured_outputs.choice: "),
    ({"prompt": "x", "params": {"structured_outputs": {"regexp": "a"}}},
     "params.structured_outputs.regexp: "),
    # What the engine's parser refuses at add_request is refused here already.
    ({"prompt": "x", "params": {"structured_outputs": {"json": {"type": "nope"}}}},
     "params.structured_outputs.json: structured_outputs.json is not a valid JSON schema"),
    ({"prompt": "x", "params": {"structured_outputs": {"regex": "a("}}},
     "params.structured_outputs.regex: structured_outputs.regex is not a valid regex"),
    ({"prompt": "x", "params": {"structured_outputs": {"grammar": 'rot ::= "a"'}}},
     "params.structured_outputs.grammar: structured_outputs.grammar is not a valid EBNF"),
])
def test_invalid_job_names_the_field(job, field):
    with pytest.raises(InvalidJob, match=field.replace(".", r"\.")):
        parse_job(job)


def test_valid_job_keeps_engine_names_and_defaults():
    job = parse_job({"prompt": [5, 6], "params": {"temperature": 0, "stop": ["\n"]},
                     "queue": "bulk"})
    assert job.queue is QueueKind.BULK
    assert job.params.model_dump() == {**GenerationParams().model_dump(), "temperature": 0.0,
                                       "stop": ["\n"]}


def test_structured_outputs_is_a_nested_object_the_engine_reads():
    from engine import StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    job = parse_job({"prompt": "x", "params": {"structured_outputs": {"json": schema}}})
    params = job.params.model_dump()
    assert params["structured_outputs"]["json"] == schema
    assert GenerationParams().model_dump()["structured_outputs"] is None
    assert engine_params(params).structured_outputs == StructuredOutputsParams(json=schema)
    other = parse_job({"prompt": "x", "params": {"structured_outputs": {"regex": "a+"}}})
    assert job.fingerprint() != other.fingerprint()


def test_only_a_job_with_a_structure_imports_xgrammar():
    code = ("import sys; from worker.schemas import parse_job; parse_job({'prompt': 'x'}); "
            "assert not {'torch', 'xgrammar'} & set(sys.modules), 'imported too soon'; "
            "parse_job({'prompt': 'x', 'params': {'structured_outputs': {'regex': 'a+'}}}); "
            "assert 'xgrammar' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], check=True)


def test_beam_width_makes_beam_search_params_and_defaults_make_sampling():
    from engine import BeamSearchParams, SamplingParams

    job = parse_job({"prompt": "x", "params": {"beam_width": 3, "max_tokens": 9,
                                               "length_penalty": 0.5, "temperature": 0}})
    assert engine_params(job.params.model_dump()) == BeamSearchParams(
        beam_width=3, max_tokens=9, length_penalty=0.5)
    plain = parse_job({"prompt": "x"}).params.model_dump()
    assert plain["beam_width"] is None and isinstance(engine_params(plain), SamplingParams)
    # A row stored before the beam fields existed still reads as sampling.
    old = {k: v for k, v in plain.items()
           if k not in ("beam_width", "length_penalty", "early_stopping")}
    assert engine_params(old) == SamplingParams()
