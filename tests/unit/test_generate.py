import torch

from gptforge.cli import main
from gptforge.hf.inference import load_for_inference
from gptforge.model.engine import Engine, Params
from gptforge.model.sampling import sample_next


def test_generate_cli_streams_and_is_seeded(trained_run, capsys):
    args = ["generate", "--checkpoint", str(trained_run), "--prompt", "KING", "--max-new-tokens", "40",
            "--seed", "5", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.startswith("KING") and len(first.rstrip("\n")) == 4 + 40


def test_cache_and_no_cache_agree_greedy(trained_run):
    model, tok, chat = load_for_inference(str(trained_run))
    assert chat is False  # a pretrain run: no chat template
    params, prompt = Params(50, 0.0, stop_ids=frozenset({tok.eos_id})), tok.encode("ROMEO:")
    a = Engine(model, tok).run(prompt, params).text
    b = Engine(model, tok, use_cache=False).run(prompt, params).text  # generate --no-cache
    assert a == b and len(a) == 50


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 2, None, gen)) for _ in range(200)}
    assert picks == {0, 1}
    # p(0) = 0.71, p(1) = 0.26: top_p 0.5 keeps only token 0; 0.9 keeps 0 and 1
    assert {int(sample_next(logits, 1.0, None, 0.5, gen)) for _ in range(100)} == {0}
    assert {int(sample_next(logits, 1.0, None, 0.9, gen)) for _ in range(300)} == {0, 1}
    assert int(sample_next(logits, 0.0, None, None, gen)) == 0


def test_prompt_longer_than_context(trained_run, capsys):
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", "x" * 80]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.strip() == \
        "gptforge: error: the prompt is 80 tokens but the context is 64; shorten the prompt"


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_cache_flag_gives_the_same_seeded_text(trained_run, capsys):
    """--no-cache recomputes the whole sequence each step through the same engine: same seed, same text."""
    args = ["generate", "--checkpoint", str(trained_run), "--prompt", "KING", "--max-new-tokens", "30",
            "--seed", "3", "--temperature", "1.0"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main([*args, "--no-cache"]) == 0
    assert capsys.readouterr().out == cached and len(cached.rstrip("\n")) == 4 + 30
