"""runtime: the device (CPU, CUDA, precision, threads), distributed training (torchrun) and the FLOP
counts behind MFU."""
