"""model: loading and saving versions (weights and tokenizer), the masked-LM heads, vocabulary growth
and fill-mask prediction."""
