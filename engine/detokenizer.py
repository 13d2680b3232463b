"""Incremental detokenization and stop-string matching."""

from transformers import PreTrainedTokenizerBase

from engine.sequence import Detokenizer, Sequence

# Tokens decoded before the first output token, so its leading space is right.
_CONTEXT_TOKENS = 5


def start(seq: Sequence) -> None:
    seq.detok = Detokenizer(prefix_offset=max(seq.prompt_len - _CONTEXT_TOKENS, 0),
                            read_offset=seq.prompt_len)


def update(tokenizer: PreTrainedTokenizerBase, seq: Sequence) -> str:
    """Append the newly stable text of `seq` to its output text; return that new text."""
    d = seq.detok
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[d.prefix_offset:d.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[d.prefix_offset:], skip_special_tokens=True)
    # A trailing U+FFFD is an unfinished multi-byte character: wait for more tokens.
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new = full[len(prefix):]
    d.prefix_offset, d.read_offset = d.read_offset, len(ids)
    d.text += new
    return new


def decode_output(tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                  output_token_ids: list[int]) -> str:
    """A whole output's text at once, decoded in the prompt's context as `update` does."""
    context = prompt_token_ids[-_CONTEXT_TOKENS:]
    prefix = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + output_token_ids, skip_special_tokens=True)
    # Like `update`, which never emits an unfinished multi-byte character.
    return full[len(prefix):].rstrip("\ufffd")


def find_stop(seq: Sequence, new_text: str, stops: list[str]) -> str | None:
    """If a stop string now appears, cut the text before it and return the string."""
    if not new_text or not stops:
        return None
    text = seq.detok.text
    # Only the new text, plus enough before it to complete a straddling match.
    window_start = max(len(text) - len(new_text) - max(map(len, stops)) + 1, 0)
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, window_start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return None
    seq.detok.text = text[:best[0]]
    return best[1]
