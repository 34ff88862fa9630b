"""Output token ids -> text, a piece at a time, as a client should see it streamed.

Decoding a window of the last few tokens (the approach of Hugging Face's TextStreamer and TGI)
keeps the cost per token constant; a piece whose last character is incomplete (U+FFFD: a
multi-byte UTF-8 character whose bytes have not all arrived) is held back until it is whole.
Text that could be the start of a stop string is held back too, so a stop string is never sent.
"""


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer, self.stop = tokenizer, stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""            # decoded so far, whole characters only
        self.sent = 0             # characters of text already handed out
        self.prefix = self.read = 0  # token window: [prefix, read) is decoded, read.. is new
        self.stopped = False      # a stop string was found; text ends before it

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        """ids: every output token so far; returns the new text that is safe to send."""
        if not self.stopped:
            before, after = self.decode(ids[self.prefix:self.read]), self.decode(ids[self.prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(ids)
        return self.release(final=False)

    def finish(self, ids: list[int]) -> str:
        """The rest of the text once the sequence has ended (an incomplete last character included)."""
        if not self.stopped:
            full = self.decode(ids)
            if full.startswith(self.text):
                self.text = full
        return self.release(final=True)

    def release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # a stop string cannot start before `sent`: it would have been found when that text was held
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
        end = len(self.text) if final or self.stopped else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
