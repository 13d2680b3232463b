"""Producer-side validation: every rejection names the field."""

import pytest

from worker.schemas import GenerationParams, InvalidJob, QueueKind, parse_job


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
    from engine import SamplingParams, StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    job = parse_job({"prompt": "x", "params": {"structured_outputs": {"json": schema}}})
    params = job.params.model_dump()
    assert params["structured_outputs"]["json"] == schema
    assert GenerationParams().model_dump()["structured_outputs"] is None
    engine_params = SamplingParams(**params)
    assert engine_params.structured_outputs == StructuredOutputsParams(json=schema)
    other = parse_job({"prompt": "x", "params": {"structured_outputs": {"regex": "a+"}}})
    assert job.fingerprint() != other.fingerprint()
