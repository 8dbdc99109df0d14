"""A system turn on a chat template without a system role (Gemma 2's raises on one) is merged into the first user
turn the way the family does it (Gemma 3's template: system text, a blank line, the user's), for prompts (chat, eval,
serve) and for training rows alike; templates with a system role are left as they are."""

from __future__ import annotations

import copy

import pytest
from jinja2.exceptions import TemplateError

from tests.families import GEMMA2_CHAT_TEMPLATE
from tuneforge.data.tokenize import chat_pieces, fit_to_template, render_prompt

CONVERSATION = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "Bonjour."}]


@pytest.fixture()
def gemma_tokenizer(tokenizer):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = GEMMA2_CHAT_TEMPLATE
    return changed


def test_the_template_itself_refuses_a_system_turn(gemma_tokenizer):
    with pytest.raises(TemplateError, match="System role not supported"):
        gemma_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_a_system_turn_is_merged_into_the_first_user_turn(gemma_tokenizer):
    prompt = render_prompt(gemma_tokenizer, CONVERSATION[:2])
    bos = gemma_tokenizer.bos_token or ""
    assert prompt == f"{bos}<start_of_turn>user\nAnswer in French.\n\nHello?<end_of_turn>\n<start_of_turn>model\n"
    pieces = chat_pieces(gemma_tokenizer, CONVERSATION)
    # (the embedded tokenizer's end-of-turn token is not Gemma's, so the whole rendered answer is the target)
    assert [text for text, answer in pieces if answer] == ["Bonjour.<end_of_turn>\n"]
    assert "".join(text for text, _ in pieces).startswith(prompt)


def test_templates_with_a_system_role_keep_it(tokenizer):
    assert fit_to_template(tokenizer, CONVERSATION) == CONVERSATION
    assert "Answer in French." in render_prompt(tokenizer, CONVERSATION[:2])
    assert "system" in render_prompt(tokenizer, CONVERSATION[:2])
