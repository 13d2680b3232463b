"""When a sequence that was just given a token ends: EOS, a stop token id, a stop string,
`max_tokens` or the model's length."""

from transformers import PreTrainedTokenizerBase

from engine import detokenizer
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus

StopReason = int | str | None


class StopChecker:
    def __init__(self, eos_token_ids: set[int], max_model_len: int,
                 tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer

    def check(self, seq: Sequence, p: SamplingParams, token: int
              ) -> tuple[SequenceStatus | None, StopReason]:
        """Decode the text `token` completes (where the request needs it as it goes) and
        say whether, and why, the sequence stops; a stop string is cut off its text."""
        new_text = detokenizer.update(self.tokenizer, seq) if seq.detok else ""
        num_tokens = len(seq.token_ids)
        num_output_tokens = num_tokens - seq.prompt_len
        if num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return SequenceStatus.FINISHED_STOPPED, None
            if token in p.stop_token_ids:
                return SequenceStatus.FINISHED_STOPPED, token
            if new_text and p.stop:
                matched = detokenizer.find_stop(seq, new_text, p.stop)
                if matched is not None:
                    return SequenceStatus.FINISHED_STOPPED, matched
        if num_output_tokens >= p.max_tokens or num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None, None
