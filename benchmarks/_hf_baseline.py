"""Configuration (a): Hugging Face ``Trainer`` + ``DataCollatorForLanguageModeling``, as run_mlm.py runs it.

run_mlm.py's settings: AdamW (Trainer's default optimizer), linear schedule, no warm-up, weight decay
0, gradient clipping at 1.0, mlm_probability 0.15 (80/10/10), the ``special_tokens_mask`` carried
in the dataset (run_mlm tokenizes with return_special_tokens_mask=True), no evaluation, no
checkpoints, no reporting integrations, dataloader_num_workers 0, SDPA attention; ``use_cpu`` on
CPU and ``bf16=True`` for the bf16 configuration. Rows are the same packed (N, T) sequences incr
trains on, with no padding.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch


class PackedRows(torch.utils.data.Dataset):
    """(N, T) packed token ids -> run_mlm-style examples (input_ids, attention_mask, special_tokens_mask)."""

    def __init__(self, rows: np.ndarray, special_ids: list[int]):
        self.rows = rows
        self.special = np.asarray(sorted(set(special_ids)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.rows[i], dtype=np.int64))  # (T,)
        special = torch.from_numpy(np.isin(ids.numpy(), self.special).astype(np.int64))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "special_tokens_mask": special}


def run_hf(spec: dict[str, Any], device: torch.device, driver: Any) -> None:
    from _worker import build_model, load_tokenizer
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    tokenizer = load_tokenizer(spec)
    model = build_model(spec)
    rows = np.load(spec["new_rows"], mmap_mode="r")
    dataset = PackedRows(rows, tokenizer.all_special_ids)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            driver.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            driver.step_end()

    with tempfile.TemporaryDirectory(prefix="incr-bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch"], max_steps=driver.total_steps,
            learning_rate=5e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            logging_strategy="steps", logging_steps=500, save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, use_cpu=device.type == "cpu", bf16=spec["precision"] == "bf16",
            seed=spec["seed"], disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[Clock()])
        driver.start(optimizer=args.optim.value if hasattr(args.optim, "value") else str(args.optim),
                     head_positions="all")
        trainer.train()
