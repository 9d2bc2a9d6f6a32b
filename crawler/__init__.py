"""The crawler transformer (PR #1579's 3f+2cx2) and everything around it: data, tokenizer, model,
trainer, quantiser, artifact, evaluation and inference."""
