"""Generated token ids -> text deltas for streaming, ending at the first stop string.

A delta is only sent once it can no longer change: text that could still be the start of a stop string is held
back, and so is a trailing replacement character (half of a multi-byte UTF-8 character split across tokens). The
concatenated deltas are exactly the reply, whether the client streams or not.
"""

from __future__ import annotations


class ReplyText:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was reached; the reply ends before it

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (possibly empty)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # Nothing already sent can be part of a stop string (it would have been held back), so search after it.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            return self._take(end)
        return self._take(self._safe_end())

    def flush(self) -> str:
        """The rest of the reply once generation ended for another reason (end of turn, max_tokens)."""
        return "" if self.stopped else self._take(len(self.text))

    def _safe_end(self) -> int:
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        safe = end
        for stop in self.stop:  # hold back the longest tail that could begin a stop string
            for k in range(min(len(stop) - 1, end - self.sent), 0, -1):
                if self.text[end - k:end] == stop[:k]:
                    safe = min(safe, end - k)
                    break
        return safe

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
