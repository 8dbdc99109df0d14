"""Chat-template rendering, label masking and the truncation policy.

A conversation is rendered with the tokenizer's own chat template and cut into pieces: prompt pieces (everything the
model is given) and answer pieces (each assistant turn, through its end-of-turn token, so the model learns to stop).
Each piece is tokenized on its own. That is what inference does too: the prompt is rendered with the generation
prompt and tokenized alone, then the model produces the answer's tokens, so train and inference see the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.data.formats import Example
from tuneforge.errors import DataError

# A plain template for tokenizers that ship none (base models); `eos_token` ends each answer.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    # target[i] is True when token i is a training target (predicted from tokens < i of the same example).
    target: list[bool]
    source: str
    origin: str = ""  # the data source's name (see Example.origin)

    @property
    def num_targets(self) -> int:
        return sum(self.target)

    @property
    def packed_length(self) -> int:
        """Tokens it takes in a packed row (what step plans and token budgets count)."""
        return len(self.input_ids)


@dataclass
class TokenizeReport:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.kept} examples ({self.truncated} truncated, {self.dropped} dropped as over-long)"


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def fit_to_template(tokenizer, messages) -> list[dict]:
    """The conversation as the tokenizer's chat template takes it. Some templates have no system role (Gemma 2's
    raises "System role not supported"); a system turn is then merged into the first user turn the way the family
    does it itself (Gemma 3's template: the system text, a blank line, then the user's), not crashed on."""
    messages = list(messages)
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    if _takes_system_role(tokenizer):
        return messages
    system, user = messages[0], messages[1]
    return [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *messages[2:]]


_SYSTEM_ROLE: dict[str, bool] = {}  # chat template text -> whether it renders a system turn


def _takes_system_role(tokenizer) -> bool:
    template = tokenizer.chat_template
    if template not in _SYSTEM_ROLE:
        from jinja2.exceptions import TemplateError

        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False)
            _SYSTEM_ROLE[template] = True
        except TemplateError:  # the template's own raise_exception(...)
            _SYSTEM_ROLE[template] = False
    return _SYSTEM_ROLE[template]


def render_prompt(tokenizer, messages) -> str:
    """The text a model is given to answer `messages` (which end on a user turn)."""
    return tokenizer.apply_chat_template(fit_to_template(tokenizer, messages), tokenize=False,
                                         add_generation_prompt=True)


def chat_pieces(tokenizer, messages) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_answer) pieces whose concatenation is the full render."""
    messages = fit_to_template(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the rendered text consumed so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise DataError(
                "the chat template does not render conversations prefix by prefix, so answer tokens cannot be "
                "located; use a model whose template does, or set data.train_on_prompt=true"
            )
        pieces.append((prompt[len(done) :], False))
        answer = upto[len(prompt) :]
        # Train through the end-of-turn token; text after it (a newline between turns) is not the model's to say.
        cut = answer.rfind(eos) + len(eos) if eos and eos in answer else len(answer)
        pieces.append((answer[:cut], True))
        if cut < len(answer):
            pieces.append((answer[cut:], False))
        done = upto
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return [(text, is_answer) for text, is_answer in pieces if text]


def tokenize_example(tokenizer, example: Example, train_on_prompt: bool = False) -> TokenizedExample:
    ids: list[int] = []
    target: list[bool] = []
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        target = [True] * len(ids)
    else:
        ids, target, _ = pieces_tokens(tokenizer, chat_pieces(tokenizer, example.messages), train_on_prompt)
    if target:
        target[0] = False  # nothing inside the example predicts its first token
    return TokenizedExample(input_ids=ids, target=target, source=example.source, origin=example.origin)


def pieces_tokens(tokenizer, pieces: list[tuple[str, bool]],
                  train_on_prompt: bool = False) -> tuple[list[int], list[bool], list[int]]:
    """Token ids of `chat_pieces`, each piece tokenized on its own; which are targets; where each piece ends."""
    ids: list[int] = []
    target: list[bool] = []
    ends: list[int] = []
    eos_id = tokenizer.eos_token_id
    for index, (text, is_answer) in enumerate(pieces):
        piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ends_turn = eos_id is not None and piece_ids and piece_ids[-1] == eos_id
        if is_answer and not ends_turn and _last_answer(pieces, index) and eos_id is not None:
            piece_ids = piece_ids + [eos_id]  # a template without end-of-turn token: still learn to stop
        ids += piece_ids
        target += [is_answer or train_on_prompt] * len(piece_ids)
        ends.append(len(ids))
    return ids, target, ends


def _last_answer(pieces: list[tuple[str, bool]], index: int) -> bool:
    return not any(is_answer for _, is_answer in pieces[index + 1 :])


def fit_to_length(example: TokenizedExample, max_length: int, overlong: str) -> TokenizedExample | None:
    """Apply the truncation policy; None means the example is dropped.

    Completion text is cut at the end. A conversation keeps its last answer whole and loses prompt tokens from the
    middle of what precedes it (the template's header and the end of the question survive); earlier answers lose
    their targets, since their context is gone. When the last answer alone does not fit, the example is dropped.
    """
    n = len(example.input_ids)
    if n <= max_length:
        return example
    if overlong == "drop":
        return None
    if all(example.target[1:]) or not any(example.target):  # completion text, or trained on everything
        return TokenizedExample(example.input_ids[:max_length], example.target[:max_length], example.source,
                                example.origin)
    answer_start = _last_answer_start(example.target)
    tail = n - answer_start
    budget = max_length - tail
    if budget < 2:
        return None
    head = budget // 2
    keep = list(range(head)) + list(range(answer_start - (budget - head), n))
    ids = [example.input_ids[i] for i in keep]
    target = [example.target[i] if i >= answer_start else False for i in keep]
    return TokenizedExample(ids, target, example.source, example.origin)


def _last_answer_start(target: list[bool]) -> int:
    end = max(i for i, t in enumerate(target) if t)
    start = end
    while start > 0 and target[start - 1]:
        start -= 1
    return start


def tokenize_all(
    tokenizer, examples: list[Example], max_length: int, overlong: str, train_on_prompt: bool
) -> tuple[list[TokenizedExample], TokenizeReport]:
    report = TokenizeReport()
    kept: list[TokenizedExample] = []
    for example in examples:
        tokenized = tokenize_example(tokenizer, example, train_on_prompt)
        fitted = fit_to_length(tokenized, max_length, overlong)
        if fitted is None:
            report.dropped += 1
            report.dropped_sources.append(example.source)
            continue
        if fitted is not tokenized:
            report.truncated += 1
        if fitted.num_targets == 0:
            report.dropped += 1
            report.dropped_sources.append(example.source)
            continue
        kept.append(fitted)
    report.kept = len(kept)
    return kept, report
