"""The presets' block and pretraining recipe are the defaults of `gptforge pretrain`, and a checkpoint written
before them (GPT-2 block, AdamW, cosine; its JSON files without the new keys) resumes exactly as it began."""

import json

from conftest import read_losses
from gptforge.checkpoint import list_checkpoints
from gptforge.cli import main
from gptforge.config.loader import parse_config
from gptforge.train.recipes import SFT, Pretrain

SHAPE = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.d_ff=256", "--model.block_size=64"]
RUN = ["--train.micro_batch=4", "--train.precision=fp32", "--train.eval_every=0", "--train.log_every=5",
       "--train.sample_tokens=0", "--train.progress=false", "--train.tensorboard=false", "--train.warmup_steps=2",
       "--train.lr=3e-3"]
# what `gptforge pretrain` trained before the presets changed: GPT-2's block, AdamW, cosine to 0.1 x lr
OLD = ["--model.arch=gpt2", "--model.qk_norm=false", "--model.bias=true", "--train.optimizer=adamw",
       "--train.schedule=cosine", "--train.min_lr_ratio=0.1"]
NEW_TRAIN_KEYS = ["optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_ns_steps", "muon_adjust_lr",
                  "embed_lr", "head_lr", "scalar_lr"]
NEW_MODEL_KEYS = ["qk_norm", "mlp_act", "zero_init_proj", "logit_softcap"]


def test_pretrain_defaults_are_the_presets_block_and_recipe():
    cfg = parse_config([], Pretrain.defaults)
    m, t = cfg.model, cfg.train
    assert (m.preset, m.arch, m.qk_norm, m.bias, m.tie_embeddings) == ("micro", "llama", True, False, True)
    assert (t.optimizer, t.schedule, t.min_lr_ratio, t.decay_fraction) == ("muon", "wsd", 0.0, 0.4)
    assert (t.lr, t.muon_lr, t.muon_momentum) == (4e-3, 0.03, 0.9)
    assert parse_config(["--model.preset=small"], Pretrain.defaults).train.lr == 2.4e-3  # its own recipe
    # the command line wins over the preset's recipe; SFT and DPO keep their own stage defaults (AdamW)
    assert parse_config(["--train.optimizer=adamw"], Pretrain.defaults).train.optimizer == "adamw"
    sft = parse_config([], SFT.defaults)
    assert (sft.train.optimizer, sft.train.lr, sft.model.qk_norm) == ("adamw", SFT.defaults["train"]["lr"], True)


def test_a_checkpoint_from_before_the_presets_resumes_exactly(tmp_path, char_data):
    full, split = tmp_path / "full", tmp_path / "split"
    common = [f"--data.path={char_data}", *SHAPE, *RUN]
    assert main(["pretrain", *common, *OLD, f"--train.out_dir={full}", "--train.max_steps=12"]) == 0
    assert main(["pretrain", *common, *OLD, f"--train.out_dir={split}", "--train.max_steps=12",
                 "--train.save_every=6", "--train.stop_after=6"]) == 0
    ck = list_checkpoints(split)[-1]
    for name, keys, section in (("config.json", NEW_TRAIN_KEYS, "train"), ("model_config.json", NEW_MODEL_KEYS, None)):
        d = json.loads((ck / name).read_text())  # as an older gptforge wrote them: no such keys
        for k in keys:
            (d[section] if section else d).pop(k, None)
        (ck / name).write_text(json.dumps(d))
    # resumed with today's defaults (Qwen3 block, Muon, WSD) and none of OLD's flags
    assert main(["pretrain", *common, f"--train.out_dir={split}", "--train.max_steps=12", "--train.resume=auto"]) == 0
    a, b = read_losses(full), read_losses(split)
    assert len(a) == len(b) == 12 and a == b  # bitwise: the same block, optimizer and schedule
