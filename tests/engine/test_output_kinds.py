"""What each step reports per RequestOutputKind: everything so far (CUMULATIVE), what is
new (DELTA), or nothing until the end (FINAL_ONLY, whose text is decoded once then).

SmolLM2 with its real tokenizer, greedy or seeded, so that runs of different kinds
generate the same tokens and only what is reported can differ.
"""

import itertools

import pytest

from engine import LLM, RequestOutput, RequestOutputKind, SamplingParams

CUMULATIVE, DELTA, FINAL_ONLY = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA,
                                 RequestOutputKind.FINAL_ONLY)
MAX_TOKENS = 15  # five whole emojis of three tokens (see the last test for a cut one)


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), dtype="float32", device="cpu", num_device_blocks=256)


def _chat(llm: LLM, question: str) -> str:
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


_ids = itertools.count()


def _run(llm: LLM, requests: list[tuple[str, SamplingParams]],
         abort_after: dict[int, int] | None = None) -> list[list[RequestOutput]]:
    """Every output each request got, step by step, all requests in one batch.

    `abort_after` maps a request's index to the step after which it is aborted.
    """
    engine = llm.engine
    ids = [f"kinds-{next(_ids)}" for _ in requests]
    for rid, (prompt, params) in zip(ids, requests, strict=True):
        engine.add_request(rid, prompt, params)
    seen: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
    for step in range(200):
        if all(outs and outs[-1].finished for outs in seen.values()):
            return [seen[rid] for rid in ids]
        for i, when in (abort_after or {}).items():
            if when == step:
                engine.abort_request(ids[i])
        for out in engine.step():
            seen[out.request_id].append(out)
    raise AssertionError("requests did not finish")


def _greedy(kind: RequestOutputKind, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                          output_kind=kind, **kw)


def _final(outs: list[RequestOutput]) -> RequestOutput:
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs[-1]


def _near(logprobs: list[dict] | None, approx: bool) -> list[dict] | None:
    """Logprobs as comparable tuples; `approx`: to 1e-4, since requests in other rows of
    one batch may differ in the last float bits (seen on AMD EPYC), tokens and ranks not."""
    if logprobs is None:
        return None
    return [{token: (pytest.approx(lp.logprob, abs=1e-4) if approx else lp.logprob, lp.rank,
                     lp.decoded_token)
             for token, lp in position.items()} for position in logprobs]


def _fields(out: RequestOutput, approx: bool = False) -> list[tuple]:
    """A request's final report; compare `_fields(a) == _fields(b, approx=True)`."""
    cumulative = [c.cumulative_logprob for c in out.outputs]
    if approx:
        cumulative = [None if v is None else pytest.approx(v, abs=1e-4) for v in cumulative]
    return [(c.index, c.text, c.token_ids, cum, _near(c.logprobs, approx), c.finish_reason,
             c.stop_reason) for c, cum in zip(out.outputs, cumulative, strict=True)]


def _prompts(llm: LLM) -> list[str]:
    return ["The capital of France is", "Once upon a time",
            _chat(llm, "Reply with three emojis only.")]


# ---- FINAL_ONLY -------------------------------------------------------------------


def test_final_only_reports_once_what_cumulative_reports_last(llm):
    prompts = _prompts(llm)
    kinds = [(kind, logprobs) for kind in (CUMULATIVE, FINAL_ONLY) for logprobs in (None, 2)]
    requests = [(p, _greedy(kind, logprobs=lp)) for kind, lp in kinds for p in prompts]
    runs = _run(llm, requests)
    cumulative, final_only = runs[:2 * len(prompts)], runs[2 * len(prompts):]
    for cum, fin in zip(cumulative, final_only, strict=True):
        assert len(fin) == 1, "FINAL_ONLY reported before the request finished"
        assert len(cum) == len(_final(cum).outputs[0].token_ids)  # one report a token
        assert _fields(_final(fin)) == _fields(_final(cum), approx=True)
        assert fin[0].prompt_token_ids == cum[0].prompt_token_ids
        assert fin[0].outputs[0].finish_reason in ("stop", "length")


def test_final_only_request_aborted_reports_once(llm):
    prompt = _prompts(llm)[1]
    [outs] = _run(llm, [(prompt, _greedy(FINAL_ONLY))], abort_after={0: 3})
    assert len(outs) == 1 and outs[0].finished
    assert outs[0].outputs[0].finish_reason == "abort"
    assert 0 < len(outs[0].outputs[0].token_ids) < MAX_TOKENS


# ---- DELTA ------------------------------------------------------------------------


def _concat(outs: list[RequestOutput], index: int
            ) -> tuple[str, list[int], list[dict] | None]:
    text, tokens, logprobs = "", [], []
    for out in outs:
        [c] = [c for c in out.outputs if c.index == index]
        text += c.text
        tokens += c.token_ids
        logprobs = None if c.logprobs is None else logprobs + c.logprobs
    return text, tokens, logprobs


def _check_delta(cum: list[RequestOutput], delta: list[RequestOutput]) -> None:
    final = _final(cum)
    assert len(final.outputs) == len(_final(delta).outputs)
    for c in final.outputs:
        text, tokens, logprobs = _concat(delta, c.index)
        assert (text, tokens, _near(logprobs, False)) == (c.text, c.token_ids,
                                                          _near(c.logprobs, True))
        [last] = [d for d in _final(delta).outputs if d.index == c.index]
        assert last.finish_reason == c.finish_reason
        assert last.cumulative_logprob == pytest.approx(c.cumulative_logprob, abs=1e-4)
    for out in delta[:-1]:  # while it runs, a step brings each sequence one token
        assert all(len(c.token_ids) == 1 and c.finish_reason is None
                   or c.finish_reason is not None and not c.token_ids
                   for c in out.outputs)


def test_delta_outputs_add_up_to_the_cumulative_output(llm):
    prompts = _prompts(llm)
    runs = _run(llm, [(p, _greedy(kind, logprobs=2)) for kind in (CUMULATIVE, DELTA)
                      for p in prompts])
    for cum, delta in zip(runs[:len(prompts)], runs[len(prompts):], strict=True):
        _check_delta(cum, delta)


def test_delta_outputs_of_samples_add_up_per_index(llm):
    sampled = {"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": MAX_TOKENS, "logprobs": 2}
    cum, delta = _run(llm, [(_prompts(llm)[1], SamplingParams(output_kind=kind, **sampled))
                            for kind in (CUMULATIVE, DELTA)])
    _check_delta(cum, delta)
    assert len({tuple(c.token_ids) for c in _final(cum).outputs}) == 2  # else n=2 tests nothing


def test_kinds_mixed_in_one_batch_generate_what_each_generates_alone(llm):
    """What is reported (and whether logprobs are asked for) changes no token, whatever
    else shares the step."""
    prompts = _prompts(llm)
    requests = [
        (prompts[0], _greedy(CUMULATIVE, logprobs=2)),
        (prompts[1], SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=MAX_TOKENS,
                                    output_kind=DELTA)),
        (prompts[2], _greedy(FINAL_ONLY, logprobs=0)),
        (prompts[1], SamplingParams(temperature=0.7, seed=12, max_tokens=MAX_TOKENS,
                                    logprobs=1, output_kind=FINAL_ONLY)),
    ]
    together = _run(llm, requests)
    for request, outs in zip(requests, together, strict=True):
        [alone] = _run(llm, [request])
        kind = request[1].output_kind
        assert _tokens(outs, kind) == _tokens(alone, kind), f"{request[1]} generated others"


def _tokens(outs: list[RequestOutput], kind: RequestOutputKind) -> dict[int, list[int]]:
    """Each sequence's generated tokens, from reports of `kind`."""
    return {c.index: _concat(outs, c.index)[1] if kind is DELTA else c.token_ids
            for c in _final(outs).outputs}


def test_cumulative_outputs_are_snapshots(llm):
    """An output handed out earlier does not change as the request goes on."""
    [outs] = _run(llm, [(_prompts(llm)[0], _greedy(CUMULATIVE, logprobs=1))])
    for i, out in enumerate(outs):
        c = out.outputs[0]
        assert len(c.token_ids) == i + 1
        assert len(c.logprobs) == len(c.token_ids)


# ---- stop strings -----------------------------------------------------------------


def _stop_across_tokens(outs: list[RequestOutput]) -> tuple[str, str]:
    """A stop string of the final text that starts in one report and ends in a later one,
    first found where it is; and the text before it."""
    text = _final(outs).outputs[0].text
    ends = sorted({len(o.outputs[0].text) for o in outs})
    for end in ends[len(ends) // 3:]:
        for before, after in ((2, 2), (1, 2), (2, 1), (1, 1)):
            stop = text[end - before:end + after]
            if (len(stop) == before + after and stop.strip() == stop
                    and text.find(stop) == end - before):
                return stop, text[:end - before]
    raise AssertionError(f"no stop string straddles a report boundary in {text!r}")


@pytest.mark.parametrize("prompt_index", [0, 1])
def test_stop_string_text_is_never_retracted(llm, prompt_index):
    prompt = _prompts(llm)[prompt_index]
    [free] = _run(llm, [(prompt, _greedy(CUMULATIVE, max_tokens=24))])
    stop, before = _stop_across_tokens(free)
    requests = [(prompt, _greedy(kind, max_tokens=24, stop=[stop])) for kind in (CUMULATIVE, DELTA)]
    cum, delta = _run(llm, requests)
    final = _final(cum).outputs[0]
    assert (final.text, final.finish_reason, final.stop_reason) == (before, "stop", stop)
    assert stop not in final.text
    free_tokens = _final(free).outputs[0].token_ids
    assert final.token_ids == free_tokens[:len(final.token_ids)]
    texts = [o.outputs[0].text for o in cum]
    for earlier, later in itertools.pairwise(texts):
        assert later.startswith(earlier), f"{earlier!r} was retracted"
    so_far = ""
    for out in delta:
        so_far += out.outputs[0].text
        assert final.text.startswith(so_far), f"{so_far!r} was reported, then cut"
    assert so_far == final.text


# ---- text decoded once at the end -------------------------------------------------


def test_text_decoded_at_the_end_equals_the_incremental_text(llm):
    prompts = _prompts(llm) + [
        _chat(llm, "Say 'good morning' in French."),
        _chat(llm, "Translate to French: The summer is hot."),
        "日本の首都は",
    ]
    requests = [(p, _greedy(kind, max_tokens=24)) for kind in (CUMULATIVE, FINAL_ONLY)
                for p in prompts]
    runs = _run(llm, requests)
    texts = []
    for cum, fin in zip(runs[:len(prompts)], runs[len(prompts):], strict=True):
        assert _fields(_final(fin)) == _fields(_final(cum), approx=True)
        texts.append(_final(cum).outputs[0].text)
    # The cases that make decoding at once differ from decoding as tokens come.
    assert any(t.startswith(" ") for t in texts)
    assert any(any(ord(ch) > 0x2000 for ch in t) for t in texts)  # emojis, CJK


def test_text_cut_inside_a_character_is_the_same_decoded_at_the_end(llm):
    """max_tokens ends the output on a token that holds part of a character's bytes."""
    prompt = "日本の首都は"
    tokenizer = llm.get_tokenizer()
    [free] = _run(llm, [(prompt, _greedy(CUMULATIVE, max_tokens=24))])
    tokens = _final(free).outputs[0].token_ids
    prompt_ids = tokenizer.encode(prompt)
    cuts = [n for n in range(1, len(tokens))
            if tokenizer.decode(prompt_ids + tokens[:n]).endswith("\ufffd")]
    assert cuts, "no token of the output ends inside a character"
    params = [_greedy(kind, max_tokens=cuts[0]) for kind in (CUMULATIVE, FINAL_ONLY)]
    cum, fin = _run(llm, [(prompt, p) for p in params])
    assert _fields(_final(fin)) == _fields(_final(cum), approx=True)
    [generated] = llm.generate([prompt], params[0], use_tqdm=False)
    assert _fields(generated) == _fields(_final(cum), approx=True)


# ---- LLM.generate -----------------------------------------------------------------


def test_generate_returns_what_cumulative_steps_return(llm):
    prompts = _prompts(llm)
    params = [
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=MAX_TOKENS, logprobs=0),
        _greedy(CUMULATIVE, stop=["."], logprobs=1),
        _greedy(CUMULATIVE),
    ]
    generated = llm.generate(prompts, params, use_tqdm=False)
    stepped = [_final(outs) for outs in _run(llm, list(zip(prompts, params, strict=True)))]
    for gen, ref in zip(generated, stepped, strict=True):
        assert gen.finished
        assert (gen.prompt, gen.prompt_token_ids) == (ref.prompt, ref.prompt_token_ids)
        assert _fields(gen) == _fields(ref, approx=True)
    assert params[1].output_kind is CUMULATIVE  # the caller's params are left alone


# ---- parameters -------------------------------------------------------------------


def test_output_kind_must_be_the_enum():
    with pytest.raises(ValueError, match="^output_kind"):
        SamplingParams(output_kind="delta")
    assert SamplingParams().output_kind is CUMULATIVE


def test_cumulative_logprob_only_with_logprobs(llm):
    prompt = _prompts(llm)[1]
    requests = [(prompt, SamplingParams(temperature=t, seed=5, max_tokens=8, logprobs=lp,
                                        output_kind=kind))
                for t in (0, 1.0) for lp in (None, 0) for kind in (CUMULATIVE, DELTA, FINAL_ONLY)]
    runs = _run(llm, requests)
    for (_, params), outs in zip(requests, runs, strict=True):
        for out in outs:
            for c in out.outputs:
                if params.logprobs is None:
                    assert c.cumulative_logprob is None and c.logprobs is None
                else:
                    assert isinstance(c.cumulative_logprob, float)
                    assert all(len(d) == 1 for d in c.logprobs)  # the chosen token alone
        if params.logprobs is not None:
            last = _final(outs).outputs[0]
            _, tokens, logprobs = _concat(outs, 0) if params.output_kind is DELTA else (
                None, last.token_ids, last.logprobs)
            chosen = [d[t].logprob for d, t in zip(logprobs, tokens, strict=True)]
            assert last.cumulative_logprob == pytest.approx(sum(chosen), abs=1e-5)
            assert all(lp <= 0 for lp in chosen)
