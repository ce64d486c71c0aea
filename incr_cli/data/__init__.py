"""data: from the files a team has to token shards: readers (formats), cleaning, dedup, tokenizing and
packing, Chinese word segmentation, tokenizer coverage, and the training reader (``shards``)."""
