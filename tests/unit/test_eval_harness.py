"""gptforge eval with the LM Evaluation Harness (lm-eval): task YAML of our own (local JSON data, no
download) run through our adapter on the checkpoint agrees with lm-eval's own `hf` backend on the exported
Hugging Face model (accuracy, every example's log-likelihoods, rolling perplexity; base and chat
template); bad task names and offline datasets are one-line errors."""

from __future__ import annotations

import json

import pytest

from support.eval_fixtures import reverse_task, sort_task
from gptforge.cli import main
from support.stage_fixtures import sft_reverse_run  # noqa: F401
from support.harness_tasks import write_gen_task_yaml, write_task_yaml

lm_eval = pytest.importorskip("lm_eval")

@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory, sft_reverse_run):
    """-> (include folder, exported HF folder): reverse / sort as harness tasks, a rolling text task."""
    root = tmp_path_factory.mktemp("harness")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, make, n in (("gf_reverse", reverse_task, 24), ("gf_sort", sort_task, 40)):
        path = make(root / f"{name}.jsonl", n)
        write_task_yaml(tasks, name, path)
    write_gen_task_yaml(tasks, "gf_reverse_gen", root / "gf_reverse.jsonl")
    text = root / "gf_text.jsonl"
    lines = ["ROMEO:\nBut soft, what light through yonder window breaks?", "First Citizen:\nBefore we proceed "
             "any further, hear me speak.\n" * 4, "KING HENRY:\nOnce more unto the breach, dear friends."]
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    write_task_yaml(tasks, "gf_text", text, rolling=True)
    hf = root / "hf"
    assert main(["export-hf", "--checkpoint", str(sft_reverse_run), "--out", str(hf)]) == 0
    # a chat model's export stops transformers' generate at the end of a turn as well as at <|endoftext|>
    tok = json.loads((hf / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|endoftext|>"], ids["<|im_end|>"]]
    return tasks, hf


NAMES = ("gf_reverse", "gf_sort", "gf_text", "gf_reverse_gen")


def _ours(run, tasks, tmp_path, chat: str, names=",".join(NAMES)) -> dict:
    out = tmp_path / f"ours_{chat}.json"
    assert main(["eval", "--checkpoint", str(run), "--tasks", names, "--include-path", str(tasks),
                 "--chat", chat, "--out", str(out), "--tensorboard=false", "--batch-size", "5"]) == 0
    return {r["name"]: r for r in json.loads(out.read_text())["results"]}


def _hf(hf, tasks, chat: bool, names=NAMES) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args={"pretrained": str(hf), "device": "cpu", "dtype": "float32"},
                          tasks=list(names), task_manager=TaskManager(include_path=str(tasks)), batch_size=7,
                          apply_chat_template=chat, log_samples=True)
    return res


@pytest.mark.parametrize("chat", ["false", "true"])
def test_adapter_agrees_with_lm_eval_hf_backend_on_the_export(sft_reverse_run, harness_tasks, tmp_path, chat):
    tasks, hf = harness_tasks
    ours = _ours(sft_reverse_run, tasks, tmp_path, chat)
    ref = _hf(hf, tasks, chat == "true")
    for name in ("gf_reverse", "gf_sort"):
        row = ref["results"][name]
        for m in ("acc", "acc_norm"):
            v, se = ours[name]["metrics"][m]["value"], ours[name]["metrics"][m]["stderr"]
            assert v == pytest.approx(row[f"{m},none"], abs=1e-9) and se == pytest.approx(row[f"{m}_stderr,none"])
        theirs = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in ref["samples"][name]}
        mine = {int(k): [r[0] for r in v] for k, v in ours[name]["per_example"].items()}
        assert sorted(mine) == sorted(theirs) and len(mine) == ours[name]["examples"]
        worst = max(abs(a - b) for d in mine for a, b in zip(mine[d], theirs[d]))
        assert worst < 1e-4, (name, worst)
        print(f"{name} chat={chat}: acc {ours[name]['metrics']['acc']['value']:.4f}, largest loglik difference {worst:.2e}")
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["gf_text"]["metrics"][m]["value"] == pytest.approx(ref["results"]["gf_text"][f"{m},none"],
                                                                       rel=1e-5)
    # generation (greedy, stop strings): the same text as transformers' generate, example by example
    gen = {s["doc_id"]: s["filtered_resps"][0] for s in ref["samples"]["gf_reverse_gen"]}
    mine = {int(k): v[0] for k, v in ours["gf_reverse_gen"]["per_example"].items()}
    assert mine == gen and len(mine) == 24
    em = ours["gf_reverse_gen"]["metrics"]["exact_match"]["value"]
    assert em == ref["results"]["gf_reverse_gen"]["exact_match,none"]
    print(f"chat={chat}: generated {sum(len(t) for t in mine.values())} characters, exact_match {em:.3f}; "
          f"e.g. {sorted(mine.items())[:3]}")
    # the SFT model was trained to reverse words as a chat reply: through the template it picks the reversal
    # (and writes it), and it is at chance on a task it never saw
    if chat == "true":
        assert ours["gf_reverse"]["metrics"]["acc"]["value"] >= 0.9 and em >= 0.9
        assert ours["gf_sort"]["metrics"]["acc"]["value"] < 0.5


def test_unknown_and_offline_harness_tasks_are_one_line_errors(sft_reverse_run, tmp_path, capsys, monkeypatch):
    assert main(["eval", "--checkpoint", str(sft_reverse_run), "--tasks", "no_such_task_xyz"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown task no_such_task_xyz" in err and "\n" not in err and "Traceback" not in err
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--checkpoint", str(sft_reverse_run), "--tasks", "arc_easy", "--limit", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "arc_easy" in err and "could not be loaded" in err
