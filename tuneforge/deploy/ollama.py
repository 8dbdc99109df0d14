"""`tuneforge export --ollama`: a Modelfile beside the GGUF, so `ollama create NAME -f Modelfile` gives a model that
formats chats as training did and stops where the tuned model stops.

Ollama does not run the Jinja chat template; it runs a Go text/template. Rather than pattern-matching known
families, the translation is read off the template itself: it is rendered for a few conversations of placeholder
turns, and the text around each placeholder is what the Go template writes around each message (the head, each
role's prefix and suffix, the generation prompt). Templates where a turn changes what came before it cannot be
written that way and are refused in one line. tests/unit/test_ollama.py renders the result with Go's own
text/template and compares it with the Jinja template's output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import UserError

# Placeholder contents: no whitespace (templates trim), nothing a template would escape
USER, ASSISTANT, USER_2, SYSTEM = "TfUserOne", "TfAssistantOne", "TfUserTwo", "TfSystemOne"
MAX_CONTEXT = 8192  # num_ctx written: the model's context, capped where a small GPU would run out of KV cache
MODELFILE = "Modelfile"
_BY_HAND = ("--ollama: the chat template {}, which an Ollama template cannot express; export without --ollama and "
            "write the TEMPLATE by hand")


@dataclass(frozen=True)
class TurnText:
    """What a chat template writes around each kind of turn."""

    head: str  # before the first turn when there is no system prompt (BOS, a default system prompt)
    user: tuple[str, str]  # before and after a user turn's content
    assistant: tuple[str, str]
    generation: str  # after the last user turn, where the answer starts
    system: tuple[str, str] | None  # its own block (before, after), replacing `head`; None: merged...
    system_joiner: str | None  # ...into the first user turn as system + joiner + user content


def modelfile_path(gguf_file: Path) -> Path:
    return gguf_file.parent / MODELFILE


def check_modelfile_free(gguf_file: Path, force: bool) -> None:
    path = modelfile_path(gguf_file)
    if path.exists() and not force:
        raise UserError(f"--ollama: {path} already exists; pass --force to replace it")


def modelfile_text(gguf_name: str, tokenizer, generation_config, config) -> str:
    template = go_template(turn_text(tokenizer))
    if '"""' in template:
        raise UserError('--ollama: the chat template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stop_strings(tokenizer, generation_config)]
    lines += [f"PARAMETER {name} {value}" for name, value in parameters(generation_config, config)]
    return "\n".join(lines) + "\n"


def turn_text(tokenizer) -> TurnText:
    from tuneforge.data.tokenize import ensure_chat_template, fit_to_template

    ensure_chat_template(tokenizer)

    def render(messages: list[tuple[str, str]], generation: bool = False) -> str:
        turns = [{"role": role, "content": content} for role, content in messages]
        return tokenizer.apply_chat_template(fit_to_template(tokenizer, turns), tokenize=False,
                                             add_generation_prompt=generation)

    asked = render([("user", USER)], generation=True)
    # What a chat rendered without the answer prompt ends with and one with it does not (Phi-3's end-of-text):
    # Ollama never renders a closed chat, so it is cut off every render below.
    closed = render([("user", USER)])
    trailer = closed[len(os.path.commonprefix([closed, asked])):]

    def open_render(messages: list[tuple[str, str]]) -> str:
        text = render(messages)
        if not text.endswith(trailer):
            raise UserError(_BY_HAND.format("ends a chat in more than one way"))
        return text[:len(text) - len(trailer)]

    one = open_render([("user", USER)])
    two = open_render([("user", USER), ("assistant", ASSISTANT)])
    three = open_render([("user", USER), ("assistant", ASSISTANT), ("user", USER_2)])
    for longer, shorter in ((two, one), (three, two), (asked, one)):
        if not longer.startswith(shorter):
            raise UserError(_BY_HAND.format("changes earlier turns as a conversation grows"))
    user = _around(three[len(two):], USER_2)
    assistant = _around(two[len(one):], ASSISTANT)
    first_user = user[0] + USER + user[1]
    if not one.endswith(first_user):
        raise UserError(_BY_HAND.format("writes the first user turn unlike later ones"))
    head = one[:-len(first_user)]
    with_system = open_render([("system", SYSTEM), ("user", USER)])
    system = joiner = None
    if with_system.endswith(first_user) and SYSTEM in with_system[:-len(first_user)]:
        system = _around(with_system[:-len(first_user)], SYSTEM)
    else:  # no system role: fit_to_template merged it into the first user turn
        merged = head + user[0] + SYSTEM
        if not (with_system.startswith(merged) and with_system.endswith(USER + user[1])):
            raise UserError(_BY_HAND.format("puts a system prompt where no turn boundary is"))
        joiner = with_system[len(merged):-len(USER + user[1])]
    turns = TurnText(head=head, user=user, assistant=assistant, generation=asked[len(one):], system=system,
                     system_joiner=joiner)
    # Read off short chats; checked on a longer one (a template may place the system prompt by the last turn)
    longer = [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("user", USER_2)]
    if render(longer, generation=True) != _written(turns, longer):
        raise UserError(_BY_HAND.format("writes a longer chat unlike its first turns"))
    return turns


def _written(turns: TurnText, chat: list[tuple[str, str]]) -> str:
    """What the Go template below writes for `chat` (ending on a user turn)."""
    system = "\n\n".join(content for role, content in chat if role == "system")
    if turns.system is not None:
        out = turns.system[0] + system + turns.system[1] if system else turns.head
    else:
        out = turns.head
    for role, content in chat:
        if role == "user":
            if system and turns.system is None:
                content, system = system + turns.system_joiner + content, ""
            out += turns.user[0] + content + turns.user[1]
        elif role == "assistant":
            out += turns.assistant[0] + content + turns.assistant[1]
    return out + turns.generation


def _around(text: str, placeholder: str) -> tuple[str, str]:
    if text.count(placeholder) != 1:
        raise UserError(_BY_HAND.format("does not write a turn's content once, as it is"))
    before, after = text.split(placeholder)
    return before, after


def go_template(turns: TurnText) -> str:
    """Ollama's template language is Go's text/template: .System is the system prompt, .Messages the turns (each
    .Role, .Content). No `{{-` trimming: every whitespace character written is one the chat template writes. The
    answer prompt follows only a last user turn (a last assistant turn is continued, as Ollama's own templates do)."""
    text = _literal
    if turns.system is not None:
        out = (f"{{{{ if .System }}}}{text(turns.system[0])}{{{{ .System }}}}{text(turns.system[1])}"
               f"{{{{ else }}}}{text(turns.head)}{{{{ end }}}}")
        user_content = "{{ .Content }}"
    else:
        out = f"{text(turns.head)}{{{{ $system := .System }}}}"
        user_content = (f"{{{{ if $system }}}}{{{{ $system }}}}{text(turns.system_joiner)}{{{{ $system = \"\" }}}}"
                        f"{{{{ end }}}}{{{{ .Content }}}}")
    out += ("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{{{{ if eq .Role \"user\" }}}}{text(turns.user[0])}{user_content}{text(turns.user[1])}"
            f"{{{{ if $last }}}}{text(turns.generation)}{{{{ end }}}}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{text(turns.assistant[0])}{{{{ .Content }}}}"
            f"{{{{ if not $last }}}}{text(turns.assistant[1])}{{{{ end }}}}"
            "{{ end }}{{ end }}")
    return out


def _literal(text: str) -> str:
    # Only "{{" opens an action in Go's text/template; it is written as a string constant
    return text.replace("{{", '{{ "{{" }}')


def stop_strings(tokenizer, generation_config) -> list[str]:
    """The end-of-turn token training ends every answer with, then the generation config's other stop ids."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token and token not in stops:
            stops.append(token)
    return stops


def parameters(generation_config, config) -> list[tuple[str, str]]:
    """num_ctx from the model; sampling settings where the model's generation config sets them (Ollama's own
    defaults otherwise)."""
    out = [("num_ctx", str(min(int(getattr(config, "max_position_embeddings", 2048) or 2048), MAX_CONTEXT)))]
    if generation_config is not None and generation_config.do_sample:
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            value = getattr(generation_config, ours, None)
            if value is not None:
                out.append((theirs, f"{value:g}"))
    penalty = getattr(generation_config, "repetition_penalty", None) if generation_config is not None else None
    if penalty not in (None, 1.0):
        out.append(("repeat_penalty", f"{penalty:g}"))
    return out


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
