"""Structured output (xgrammar) on SmolLM2 in float32 with its real tokenizer: JSON
schemas, regexes, choices, grammars; mixed batches, preemption, n > 1, bad specs."""

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams, StructuredOutputsParams
from engine.cache_engine import CacheEngine
from engine.sampler import Sampler
from engine.sequence import Sequence
from engine.structured_output import Grammar, TokenMasks

SO = StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "items": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 8},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}},
        "paid": {"type": "boolean"},
    },
    "required": ["id", "items", "paid"],
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "country": {"type": "object",
                               "properties": {"code": {"type": "string", "enum": ["FR", "DE",
                                                                                  "US", "JP"]}},
                               "required": ["code"]}},
    "required": ["city", "country"],
}
SCHEMA_PROMPTS = [
    (PERSON, "Describe a user of a web site as JSON with name, age and role."),
    (ORDER, "Write a small shop order as JSON."),
    (CITY, "Name a big city and its country code, as JSON."),
]
# Twenty prompts over the three schemas, each run greedy and sampled.
MANY_SCHEMA_PROMPTS = SCHEMA_PROMPTS + [
    (PERSON, "Invent an administrator account as JSON."),
    (PERSON, "Give a guest visitor's profile in JSON."),
    (PERSON, "JSON for a retired teacher who uses our forum."),
    (PERSON, "A teenager signs up to a game. Their record, as JSON:"),
    (PERSON, "Make up a person and output name, age and role as JSON."),
    (PERSON, "Output one user record as JSON, please."),
    (ORDER, "Someone buys two pencils and a notebook. The order as JSON:"),
    (ORDER, "Create an unpaid order with one item, as JSON."),
    (ORDER, "A paid order of three apples, in JSON."),
    (ORDER, "Record a bookshop order in JSON."),
    (ORDER, "JSON for an order of socks."),
    (CITY, "Where is the Eiffel Tower? Answer as JSON with city and country code."),
    (CITY, "Which city hosts the Brandenburg Gate? JSON please."),
    (CITY, "Give a Japanese city as JSON."),
    (CITY, "A city in the United States, as JSON with its country code."),
    (CITY, "Pick any capital city and return it as JSON."),
    (CITY, "JSON: the city where you would like to live and its country."),
]
MAX_TOKENS = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), dtype="float32", device="cpu", num_device_blocks=256)


def _chat(llm: LLM, text: str) -> str:
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def _greedy(spec: SO | None, max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=spec, **kw)


def test_json_schemas_greedy_and_sampled_validate(llm):
    assert len(MANY_SCHEMA_PROMPTS) == 20
    prompts, params, schemas = [], [], []
    for schema, text in MANY_SCHEMA_PROMPTS:
        for p in (_greedy(SO(json=schema), 96),
                  SamplingParams(temperature=0.8, seed=7, max_tokens=96,
                                 structured_outputs=SO(json=json.dumps(schema)))):
            prompts.append(_chat(llm, text))
            params.append(p)
            schemas.append(schema)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, schema in zip(outs, schemas, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
        assert "\n" not in completion.text  # no free whitespace by default


def test_regex_choice_grammar_and_json_object(llm):
    grammar = 'root ::= "(" item (", " item)* ")"\nitem ::= [a-z]+'
    cases = [
        ("Give me a phone number.", SO(regex=r"\d{3}-\d{4}")),
        ("Write a date.", SO(regex=r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-3]\d")),
        ("Is the review 'I loved it' positive or negative?",
         SO(choice=["positive", "negative", "neutral"])),
        ("Pick a colour.", SO(choice=["dark \"red\"", "light blue"])),
        ("List three fruits.", SO(grammar=grammar)),
        ("Return a JSON object with your name.", SO(json_object=True)),
    ]
    outs = llm.generate([_chat(llm, text) for text, _ in cases],
                        [_greedy(spec, 48) for _, spec in cases], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    assert re.fullmatch(r"\d{3}-\d{4}", texts[0])
    assert re.fullmatch(r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-3]\d", texts[1])
    assert texts[2] in cases[2][1].choice and texts[3] in cases[3][1].choice
    assert re.fullmatch(r"\([a-z]+(, [a-z]+)*\)", texts[4])
    assert isinstance(json.loads(texts[5]), dict)


@pytest.mark.slow
def test_unconstrained_neighbours_are_unchanged(llm):
    plain = [_chat(llm, "Tell me about the sea."), "The capital of France is"]
    alone = llm.generate(plain, _greedy(None, 40), use_tqdm=False)
    mixed = llm.generate(
        [plain[0], _chat(llm, SCHEMA_PROMPTS[0][1]), plain[1], _chat(llm, "A phone number?")],
        [_greedy(None, 40), _greedy(SO(json=PERSON)), _greedy(None, 40),
         SamplingParams(temperature=0.7, seed=1, max_tokens=40,
                        structured_outputs=SO(regex=r"\d{3}-\d{4}"))],
        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids,
                                                       mixed[2].outputs[0].token_ids]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PERSON)
    assert re.fullmatch(r"\d{3}-\d{4}", mixed[3].outputs[0].text)


def test_n_samples_each_follow_the_schema(llm):
    out, = llm.generate([_chat(llm, SCHEMA_PROMPTS[0][1])],
                        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
                                       structured_outputs=SO(json=PERSON)), use_tqdm=False)
    assert len(out.outputs) == 2
    for completion in out.outputs:
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_max_tokens_cuts_mid_structure_and_stop_strings_apply(llm):
    cut, stopped = llm.generate(
        [_chat(llm, SCHEMA_PROMPTS[1][1])] * 2,
        [_greedy(SO(json=ORDER), 6), _greedy(SO(json=ORDER), stop=['"items"'])],
        use_tqdm=False)
    assert cut.outputs[0].finish_reason == "length" and len(cut.outputs[0].token_ids) == 6
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == '"items"'
    assert stopped.outputs[0].text.startswith('{"id": ')


def _tiny_pool_llm(path, mode: str) -> LLM:
    block_bytes = CacheEngine.block_bytes(30, 3, 64, 16, torch.float32)
    return LLM(str(path), dtype="float32", device="cpu", num_device_blocks=12,
               swap_space_gib=64 * block_bytes / 2**30, preemption_mode=mode)


@pytest.fixture(scope="module")
def preemption_case(llm):
    """Prompts, params and the greedy outputs of a pool that never preempts."""
    prompts = [_chat(llm, text) for _, text in SCHEMA_PROMPTS] + [_chat(llm, "Phone?")]
    params = [_greedy(SO(json=schema)) for schema, _ in SCHEMA_PROMPTS]
    params.append(_greedy(SO(regex=r"\+\d{2} \d{3} \d{4} \d{4}")))
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return prompts, params, want


@pytest.mark.parametrize("mode", ["swap", pytest.param("recompute", marks=pytest.mark.slow)])
def test_preemption_keeps_each_matcher_with_its_sequence(preemption_case, smollm2_dir, mode):
    prompts, params, want = preemption_case
    tight = _tiny_pool_llm(smollm2_dir, mode)
    outs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_swapped_out_blocks > 0) == (mode == "swap")
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats.device_blocks_free == stats.device_blocks_total


@pytest.mark.parametrize(("spec", "field"), [
    (SO(json={"type": "nope"}), "structured_outputs.json"),
    (SO(json='{"type": "object", "properties": 3}'), "structured_outputs.json"),
    (SO(regex="a("), "structured_outputs.regex"),
    (SO(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
])
def test_invalid_specs_raise_at_add_request_naming_the_field(llm, spec, field):
    engine = llm.engine
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} is not a valid"):
        engine.add_request("bad", "x", _greedy(spec))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": "[1]"}, "structured_outputs.json"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", ""]}, "structured_outputs.choice"),
    ({"regex": ""}, "structured_outputs.regex"),
    ({"json_object": "yes"}, "structured_outputs.json_object"),
    ({"json_object": True, "any_whitespace": 1}, "structured_outputs.any_whitespace"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} "):
        SO(**kwargs)
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} "):
        SamplingParams(structured_outputs=kwargs)


def test_params_from_a_dict_and_unknown_fields():
    p = SamplingParams(structured_outputs={"regex": "a+"})
    assert p.structured_outputs == SO(regex="a+")
    with pytest.raises(ValueError, match=r"^structured_outputs has unknown fields"):
        SamplingParams(structured_outputs={"regexp": "a+"})


def test_without_a_tokenizer_constrained_requests_are_rejected(make_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(make_checkpoint()), dtype="float32",
                                    device="cpu", num_device_blocks=32))
    with pytest.raises(ValueError, match=r"^structured_outputs needs a tokenizer"):
        engine.add_request("r", [5, 6], _greedy(SO(regex="a")))
    assert not engine.has_unfinished_requests()


def _drain(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return done


def test_requests_behind_a_compiling_grammar_are_admitted_past_it(llm, monkeypatch):
    engine = llm.engine
    real_prepare = engine.structured.prepare
    pending: Future = Future()
    monkeypatch.setattr(engine.structured, "prepare", lambda spec: Grammar(pending))
    engine.add_request("constrained", _chat(llm, "A phone number?"),
                       _greedy(SO(regex=r"\d{3}-\d{4}")))
    monkeypatch.setattr(engine.structured, "prepare", real_prepare)
    engine.add_request("plain", "Once upon a time", _greedy(None, 5))
    for _ in range(5):
        engine.step()
    assert "plain" not in engine.requests  # finished while the grammar compiled
    assert engine.requests["constrained"].seqs[0].num_computed_tokens == 0
    compiled = real_prepare(SO(regex=r"\d{3}-\d{4}"))
    pending.set_result(compiled._future.result())
    out = _drain(engine)["constrained"].outputs[0]
    assert re.fullmatch(r"\d{3}-\d{4}", out.text)


def test_a_grammar_that_fails_to_compile_aborts_its_request_alone(llm, monkeypatch):
    engine = llm.engine
    failed: Future = Future()
    failed.set_exception(RuntimeError("out of memory"))
    monkeypatch.setattr(engine.structured, "prepare", lambda spec: Grammar(failed))
    engine.add_request("doomed", "x", _greedy(SO(regex="a")))
    monkeypatch.undo()
    engine.add_request("fine", "Once upon a time", _greedy(None, 3))
    done = _drain(engine)
    assert done["doomed"].outputs[0].finish_reason == "abort"
    assert "compiling failed: out of memory" in done["doomed"].abort_reason
    assert done["fine"].outputs[0].finish_reason == "length"


def test_each_spec_compiles_once(llm):
    manager = llm.engine.structured
    first = manager.prepare(SO(json=PERSON))
    again = manager.prepare(SO(json=json.dumps(PERSON, indent=2)))  # same schema
    assert first._future is again._future
    assert manager.prepare(SO(json=PERSON, any_whitespace=True))._future is not first._future


# ---- the sampler under masks ----------------------------------------------------------

class _Matcher:
    """Stands in for a grammar matcher: the sampler only asks whether there is one."""


def _bitmask(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    bits = torch.zeros(len(allowed), -(-vocab // 32) * 32, dtype=torch.int64)
    for i, tokens in enumerate(allowed):
        bits[i, tokens] = 1
    words = (bits.reshape(len(allowed), -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_sampler_masks_rows_in_place_of_their_own_and_keeps_the_logits():
    vocab = 40
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 50.0  # every row's unconstrained favourite
    before = logits.clone()
    seqs = [Sequence(i, [1, 2], 2, torch.Generator().manual_seed(i)) for i in range(4)]
    seqs[0].matcher = seqs[2].matcher = _Matcher()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=1.0, seed=2), SamplingParams(temperature=0)]
    masks = TokenMasks([0, 2], _bitmask([[3, 33], [12]], vocab))
    results = Sampler({0})(logits, seqs, params, masks)
    tokens = [r.token_id for r in results]
    assert tokens[0] == (3 if logits[0, 3] > logits[0, 33] else 33)
    assert tokens[2] == 12 and tokens[3] == 7 and tokens[1] == 7
    assert torch.equal(logits, before)


def test_a_grammar_that_allows_only_the_end_wins_over_min_tokens():
    logits = torch.zeros(1, 64)
    seq = Sequence(0, [1, 2], 2)
    seq.matcher = _Matcher()
    p = SamplingParams(temperature=0, min_tokens=5)
    results = Sampler({2})(logits, [seq], [p], TokenMasks([0], _bitmask([[2]], 64)))
    assert results[0].token_id == 2
    results = Sampler({2})(logits, [seq], [p], TokenMasks([0], _bitmask([[2, 9]], 64)))
    assert results[0].token_id == 9
