"""Training: the EMA of weights; the DeepSpeed expert and router loops join here."""
