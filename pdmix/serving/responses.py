"""OpenAI's response bodies and stream chunks for /v1/completions and /v1/chat/completions."""

import time
import uuid

from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (byte-level BPE vocabularies spell them as characters)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece and all(ch in BYTE_OF_CHAR for ch in piece):
        return bytes(BYTE_OF_CHAR[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode()


def token_text(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="backslashreplace")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Format:
    """What one endpoint's bodies look like; one instance per request."""
    prefix = object_name = chunk_object = ""

    def __init__(self, model: str, tokenizer):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.model, self.tokenizer, self.created = model, tokenizer, int(time.time())

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self.envelope(self.object_name, choices), "usage": usage(prompt_tokens, completion_tokens)}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self.envelope(self.chunk_object, []), "usage": usage(prompt_tokens, completion_tokens)}


class CompletionFormat(Format):
    prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def logprobs(self, entries: list, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for token_id, (lp, top) in entries:
            text = token_text(self.tokenizer, token_id)
            tokens.append(text)
            lps.append(lp)
            tops.append({token_text(self.tokenizer, i): v for i, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None = None,
              first: bool = False) -> dict:
        return self.envelope(self.chunk_object, [self.choice(index, text, logprobs, finish_reason)])


class ChatFormat(Format):
    prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def entry(self, token_id: int, lp: float) -> dict:
        b = token_bytes(self.tokenizer, token_id)
        return {"token": b.decode("utf-8", errors="backslashreplace"), "logprob": lp, "bytes": list(b)}

    def logprobs(self, entries: list, offset: int = 0) -> dict:
        return {"content": [{**self.entry(t, lp), "top_logprobs": [self.entry(i, v) for i, v in top]}
                            for t, (lp, top) in entries]}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None = None,
              first: bool = False) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return self.envelope(self.chunk_object, [{"index": index, "delta": delta, "logprobs": logprobs,
                                                   "finish_reason": finish_reason}])
