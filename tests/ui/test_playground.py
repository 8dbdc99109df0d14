"""The playground's routes to a model, outside the browser: a prompt-tuning run (not switchable per request, so
loaded whole) answers as `tuneforge chat` does, and both sides of one chat request are answered together."""

from __future__ import annotations

import asyncio

from tests.conftest import EMBEDDED, write_jsonl
from tuneforge.config import load_config
from tuneforge.train.loop import train
from tuneforge.ui.playground import GenerationRequest, Playground


def test_prompt_tuning_run_and_base_answer_like_tuneforge_generation(tmp_path):
    from tuneforge.eval.generation import generate_replies
    from tuneforge.model.trained import load_for_inference

    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Repeat the number {i}.", "output": f"{i} {i}"}
                                                  for i in range(8)])
    run = tmp_path / "prompt-run"
    train(load_config(None, [f"model={EMBEDDED}", "method=prompt", "prompt.num_virtual_tokens=4", f"data.train={data}",
                             f"output_dir={run}", "train.max_steps=2", "train.batch_size=4", "train.lr=0.03",
                             "data.max_length=48"]), show_progress=False)
    conversation = [{"role": "user", "content": "Name a colour."}]
    request = GenerationRequest(messages=conversation, max_new_tokens=8)
    playground = Playground()
    try:
        answers = asyncio.run(_both(playground, [run, EMBEDDED], request))
    finally:
        playground.close()
    expected = [generate_replies(*load_for_inference(str(source)), [conversation], max_new_tokens=8)[0]
                for source in (run, EMBEDDED)]
    assert all(expected) and [a.strip() for a in answers] == expected


async def _both(playground: Playground, models, request: GenerationRequest) -> list[str]:
    return list(await asyncio.gather(*(playground.answer(model, request) for model in models)))
