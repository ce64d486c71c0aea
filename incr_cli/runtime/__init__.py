"""runtime: the device (CPU, CUDA, precision, threads), distributed training (torchrun) and the FLOP
counts behind MFU.

Why ``flops.py`` imports ``device`` inside one function: the FLOP formulas need no torch (the
benchmark's report reads them); only measuring the CPU's matmul rate does."""
