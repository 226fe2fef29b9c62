"""`gptforge eval`: perplexity / bits per byte, multiple-choice tasks (local files) and the LM Evaluation Harness."""
