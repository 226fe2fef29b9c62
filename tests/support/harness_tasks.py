"""LM Evaluation Harness task YAML over a local JSONL file (no download): a multiple-choice task over our
task format ({"context", "choices", "label"}) or a rolling log-likelihood task over {"text"} lines."""

from __future__ import annotations

from pathlib import Path

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

ROLLING_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_task_yaml(folder: Path, name: str, data: Path, rolling: bool = False) -> Path:
    """-> folder/name.yaml: the harness task `name` over the JSONL file `data` (give folder as include_path)."""
    path = Path(folder) / f"{name}.yaml"
    path.write_text((ROLLING_YAML if rolling else MC_YAML).format(name=name, path=Path(data).resolve()))
    return path

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["<|im_end|>", "\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_gen_task_yaml(folder: Path, name: str, data: Path) -> Path:
    """-> folder/name.yaml: generate a reply to each context of our task format; exact match with the label's
    choice (greedy, at most 8 tokens, stops at <|im_end|> or a newline)."""
    path = Path(folder) / f"{name}.yaml"
    path.write_text(GEN_YAML.format(name=name, path=Path(data).resolve()))
    return path
