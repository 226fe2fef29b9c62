"""eval and serve on a GPU (skipped without one): the same log-likelihoods, perplexity and greedy text on
CUDA/ROCm as on the CPU for a trained tiny checkpoint. Run with `python -m pytest -q tests/gpu`."""

import json

import pytest
import torch

from conftest import tiny_args
from gptforge.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]


def test_eval_and_engine_on_gpu_equal_cpu(tmp_path, char_data):
    from gptforge.hf.inference import load_for_inference
    from gptforge.model.engine import Engine, Params

    run = tmp_path / "run"
    assert main(["pretrain", *tiny_args(run, char_data, "--train.max_steps=20")]) == 0
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": c, "choices": ["the king", "a dog", "thee"], "label": 0}) + "\n"
                            for c in ("ROMEO:", "KING HENRY:\nLong live", "First Citizen:\nSpeak,")))
    res = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"{dev}.json"
        assert main(["eval", "--checkpoint", str(run), "--tasks", str(task), "--text", str(char_data),
                     "--text-tokens", "3000", "--device", dev, "--out", str(out), "--tensorboard=false"]) == 0
        res[dev] = json.loads(out.read_text())["results"]
    for a, b in zip(res["cpu"], res["cuda"]):
        for m, v in a["metrics"].items():
            assert abs(v["value"] - b["metrics"][m]["value"]) < 1e-3 * max(1.0, abs(v["value"])), (m, a, b)
    texts = {}
    for dev in ("cpu", "cuda"):
        model, tok, _ = load_for_inference(str(run), dev)
        engine = Engine(model, tok)
        texts[dev] = engine.run(tok.encode("ROMEO:"), Params(max_tokens=20, temperature=0.0))
    assert texts["cpu"] == texts["cuda"], texts
