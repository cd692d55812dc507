"""GPU kernels (Triton), each beside its PyTorch reference; dispatch.py picks Triton on CUDA and the reference
elsewhere (BRANCHMERGE_KERNELS=reference|triton forces one). merge.py: the TIES / DARE / DELLA per-tensor passes
(drop / trim + rescale, sign election + disjoint mean in one pass). linear_ce.py: linear cross-entropy and
selective log-probs without materialising [tokens, vocab] logits. Nothing here imports models/."""
