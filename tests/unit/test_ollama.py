"""`tuneforge export --ollama`: the Modelfile's TEMPLATE, executed by Go's own text/template with the data Ollama
gives it (tests/fixtures/ollama_template/render.go), writes exactly the prompt the Jinja chat template writes, for
each family's kind of template and each shape of chat; the Modelfile names the GGUF beside it and stops on the
end-of-turn token the GGUF names. `ollama` itself is not installable on this machine (no Debian, PyPI or npm
package), so `ollama create` is left to a machine that has it."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_gguf, run_cli
from tests.families import GEMMA2_CHAT_TEMPLATE
from tuneforge.data.tokenize import PLAIN_CHAT_TEMPLATE, fit_to_template

RENDER_GO = ROOT / "tests" / "fixtures" / "ollama_template" / "render.go"

# Meta-Llama-3-8B-Instruct's template as it ships (BOS joined to the first turn, contents trimmed)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Phi-3-mini-4k-instruct's: an end-of-text token closes a chat rendered without the generation prompt
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
TEMPLATES = {"smollm2": None, "plain": PLAIN_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE,
             "gemma2": GEMMA2_CHAT_TEMPLATE, "phi3": PHI3_CHAT_TEMPLATE}

SYSTEM = {"role": "system", "content": "Answer briefly.\nUse French."}
CHATS = [
    [{"role": "user", "content": "Hello there?"}],
    [SYSTEM, {"role": "user", "content": "Who wrote {{Faust}}?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, of course."},
     {"role": "user", "content": "And 3+3,\nplease?"}],
    [SYSTEM, {"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "Lyon."},
     {"role": "user", "content": "Another."}, {"role": "assistant", "content": "Nice."},
     {"role": "user", "content": "One more."}],
]


@pytest.fixture(scope="session")
def go_render(tmp_path_factory) -> Path:
    """render.go built once (Go from Debian's golang-go, which `make test-tools` installs)."""
    go = shutil.which("go")
    assert go, "Go is needed to execute Ollama templates: run `make test-tools` (apt-get install golang-go)"
    out = tmp_path_factory.mktemp("go") / "render"
    subprocess.run([go, "build", "-o", str(out), str(RENDER_GO)], check=True, cwd=out.parent,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(out.parent), "GOCACHE": str(out.parent / "cache"),
                        "GO111MODULE": "off"})
    return out


def ollama_renders(go_render: Path, template: str, chats: list) -> list[str]:
    result = subprocess.run([str(go_render)], input=json.dumps({"template": template, "chats": chats}),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def with_template(tokenizer, template: str | None):
    if template is None:
        return tokenizer
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_the_go_template_writes_what_the_chat_template_writes(tokenizer, go_render, family):
    from tuneforge.deploy.ollama import go_template, turn_text

    chat_tokenizer = with_template(tokenizer, TEMPLATES[family])
    template = go_template(turn_text(chat_tokenizer))
    expected = [chat_tokenizer.apply_chat_template(fit_to_template(chat_tokenizer, chat), tokenize=False,
                                                   add_generation_prompt=True) for chat in CHATS]
    assert ollama_renders(go_render, template, CHATS) == expected


def test_a_last_assistant_turn_is_continued_not_closed(tokenizer, go_render):
    """Ollama continues a chat that ends on an assistant turn (prefill): no end of turn, no new answer prompt."""
    from tuneforge.deploy.ollama import go_template, turn_text

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    [rendered] = ollama_renders(go_render, go_template(turn_text(tokenizer)), [chat])
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert full.startswith(rendered) and rendered.endswith("<|im_start|>assistant\nHel")


def test_templates_an_ollama_template_cannot_express_are_refused(tokenizer):
    from tuneforge.deploy.ollama import turn_text
    from tuneforge.errors import UserError

    # Mistral-style: the system prompt goes into the *last* user turn, so each new turn rewrites an earlier one
    last_turn_system = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.last and messages[0]['role'] == 'system' %}"
        "{{ '[INST] ' + messages[0]['content'] + '\n\n' + m['content'] + ' [/INST]' }}{% else %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% elif m['role'] == 'assistant' %}"
        "{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    numbered = "{% for m in messages %}{{ loop.length }}:{{ m['content'] }};{% endfor %}"
    for template in (last_turn_system, numbered):
        with pytest.raises(UserError, match="^--ollama: .*write the TEMPLATE by hand$"):
            turn_text(with_template(tokenizer, template))


def parse_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert template, text
    rest = text[:template.start()] + text[template.end():]
    commands = [line.split(" ", 1) for line in rest.splitlines() if line.strip()]
    parameters: dict[str, list[str]] = {}
    for command, value in commands:
        if command == "PARAMETER":
            name, argument = value.split(" ", 1)
            parameters.setdefault(name, []).append(json.loads(argument) if argument.startswith('"') else argument)
    return {"from": [v for c, v in commands if c == "FROM"], "template": template.group(1),
            "parameters": parameters, "commands": sorted({c for c, _ in commands})}


def test_export_writes_a_modelfile_beside_the_gguf(tiny_model_dir, tokenizer, go_render, tmp_path):
    from tuneforge.deploy.ollama import go_template, turn_text

    out = tmp_path / "tiny.gguf"
    result = run_cli("export", str(tiny_model_dir), "--quant", "q8_0", "--ollama", "-o", str(out))
    assert result.returncode == 0, result.stderr
    modelfile = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert modelfile["commands"] == ["FROM", "PARAMETER"] and modelfile["from"] == ["./tiny.gguf"]
    assert (tmp_path / modelfile["from"][0]).is_file()
    assert modelfile["template"] == go_template(turn_text(tokenizer))
    chat = CHATS[3]
    assert ollama_renders(go_render, modelfile["template"], [chat]) == [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]
    reader = read_gguf(out)
    eot = int(reader.fields["tokenizer.ggml.eot_token_id"].parts[-1][0])
    assert modelfile["parameters"]["stop"][0] == tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    assert modelfile["parameters"]["num_ctx"] == ["1024"]  # the tiny model's context

    result = run_cli("export", str(tiny_model_dir), "--quant", "q8_0", "--ollama", "-o", str(tmp_path / "b.gguf"))
    assert result.returncode == 2 and "Modelfile already exists; pass --force" in result.stderr
    assert not (tmp_path / "b.gguf").exists()
    result = run_cli("export", str(tiny_model_dir), "--format", "gptq", "--ollama", "-o", str(tmp_path / "q"))
    assert result.returncode == 2 and "--ollama: not an option of --format gptq" in result.stderr
